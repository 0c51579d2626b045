"""What evaluation costs and what cheaper evaluations would change: one trained adapter scored on the
default test set (1,500 examples) as the run scores it, and by variants that cut CPU but move numbers.

Run by hand (needs a LoRA run's exported adapter folder, e.g. runs/legend-seed0/adapter):
    OMP_NUM_THREADS=1 python bench/eval_variants.py runs/legend-seed0/adapter --reps 2

Variants, each timed in CPU-seconds of this process (time.process_time) and scored (accuracy, loss):
  fp32     what `fedlegend run` does: test set sorted by length, batches of train.eval_batch_size
  bf16     the same under bf16 autocast (run.eval_precision = "bf16")
  merged   fp32 with the LoRA products folded into the frozen weights, on a COPY of the model (folding in
           place and unfolding is not exact: W + BA - BA moves W's last bits)
  buckets  fp32 in batches of exactly one length (no padding at all; more, smaller batches)
The variants are interleaved, --reps times. Writes JSON (--out).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch


def bucketed(data, pad_id: int, max_batch: int):
    """Batches of examples of one length each (at most max_batch), shortest first."""
    from fedlegend.data import collate

    order = sorted(range(len(data)), key=lambda i: len(data.ids[i]))
    i = 0
    while i < len(order):
        j = i
        while j < len(order) and j - i < max_batch and len(data.ids[order[j]]) == len(data.ids[order[i]]):
            j += 1
        idx = order[i:j]
        i = j
        yield collate([data.ids[k] for k in idx], data.labels[idx], pad_id,
                      None if data.type_ids is None else [data.type_ids[k] for k in idx])


def score(model, batches, n: int) -> tuple[float, float]:
    correct, loss_sum = 0, 0.0
    with torch.no_grad():
        for b in batches:
            out = model(**b)
            loss_sum += float(out.loss) * len(b["labels"])
            correct += int((out.logits.argmax(-1) == b["labels"]).sum())
    return correct / n, loss_sum / n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("adapter", type=Path, help="a LoRA run's adapter folder (PEFT format)")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--subset", type=int, default=0, help="score only this many test examples (0: all)")
    ap.add_argument("--out", type=Path, default=Path("bench/out/eval_variants.json"))
    a = ap.parse_args(argv)

    from fedlegend.config import build_config
    from fedlegend.data import eval_batches
    from fedlegend.experiment import build_experiment

    cfg = build_config({}, {"run.threads": 1, **({"data.eval_subset": a.subset} if a.subset else {})})
    exp = build_experiment(cfg)
    peft = exp.host.peft
    peft.load_adapter(str(a.adapter), adapter_name="trained")
    peft.set_adapter("trained")
    model = exp.host.model.eval()
    merged = copy.deepcopy(model)
    merged.merge_adapter()   # a copy: the run's model is never folded
    data, bs = exp.test, cfg.train.eval_batch_size
    std, bk = list(eval_batches(data, bs, exp.pad_id)), list(bucketed(data, exp.pad_id, bs))
    tokens = {name: int(sum(b["input_ids"].numel() for b in bb)) for name, bb in (("fp32", std), ("buckets", bk))}
    real = int(sum(len(x) for x in data.ids))

    def bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return score(model, std, len(data))

    variants = {"fp32": lambda: score(model, std, len(data)), "bf16": bf16,
                "merged": lambda: score(merged, std, len(data)), "buckets": lambda: score(model, bk, len(data))}
    rows: dict[str, dict] = {}
    for _ in range(a.reps):
        for name, fn in variants.items():
            c = time.process_time()
            acc, loss = fn()
            t = time.process_time() - c
            r = rows.setdefault(name, {"cpu_s": [], "accuracy": acc, "loss": loss})
            r["cpu_s"].append(t)
            print(f"{name:8s} {t:6.2f} cpu-s  accuracy {acc:.6f}  loss {loss:.10f}", flush=True)
    print(f"tokens: {real} real; padded batches {tokens['fp32']} ({len(std)} batches); buckets {tokens['buckets']} "
          f"({len(bk)} batches)")
    base = rows["fp32"]
    for name, r in rows.items():
        r["median_cpu_s"] = float(np.median(r["cpu_s"]))
        r["cpu_vs_fp32"] = r["median_cpu_s"] / float(np.median(base["cpu_s"]))
        r["accuracy_change"] = r["accuracy"] - base["accuracy"]
        r["loss_change"] = r["loss"] - base["loss"]
        print(f"{name:8s} median {r['median_cpu_s']:.2f} cpu-s ({r['cpu_vs_fp32']:.2f}x fp32)  accuracy "
              f"{r['accuracy_change']:+.4f}  loss {r['loss_change']:+.2e}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"bench": "eval_variants", "adapter": str(a.adapter), "examples": len(data),
                                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "tokens": tokens,
                                 "real_tokens": real, "variants": rows}, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
