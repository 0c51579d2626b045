"""Local training throughput at each depth 1..L: ours (client.train_local through the host) against
a bare torch + peft loop doing the same work, and both against the machine's matmul limit.

Run by hand (about 2 minutes on a 2-core CPU at the defaults):
    OMP_NUM_THREADS=2 python bench/throughput.py --out bench/out/throughput.json
    python bench/throughput.py --device cuda --steps 20 --repeats 5     # on a GPU machine

What is compared, for each depth d (LEGEND's plan: the top d layers, ranks from Alg. 1 line 4 at
the default psi = 48, lambda = 1), `--repeats` device rounds of `--steps` local steps each:
  ours   train_local on the experiment's host (the same call the engines make: activate the layout,
         load the payload, AdamW steps, read the trained tensors back);
  bare   one peft LoRA model of that layout, an AdamW loop over the same batches (same examples,
         same padded widths: both draw them from the same seeded stream, as planned_work does).
The two alternate round by round (and which goes first), so a load change on a shared machine hits
both alike.

FLOPs counted are only those the work needs: devices.step_work_flops (forward through every
layer, backward from the head down to the lowest trained layer), the cost model that prices
virtual time. The matmul limit is measured in the same run: fp32 (or --precision) torch.mm at the
model's shapes ([tokens x hidden] times the attention projections and the two FFN matrices, tokens
= the batches' mean batch x width), weighted as one layer mixes them; the best of several timings.
Every rate is given twice: per wall-clock second, and per CPU-second of this process (all its
threads; time.process_time), which other jobs on a shared machine skew far less. Prints one row
per depth and writes JSON (figures, machine, threads, load average).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_limit(hidden: int, intermediate: int, tokens: int, device: torch.device, dtype=torch.float32,
                 seconds: float = 0.5) -> dict:
    """GFLOP/s of torch.mm at a layer's shapes, and the layer mix's (4 h x h projections, h x i, i x h)."""
    shapes = {"h_h": (hidden, hidden, 4), "h_i": (hidden, intermediate, 1), "i_h": (intermediate, hidden, 1)}
    out, flops_total, time_total, cpu_total = {}, 0.0, 0.0, 0.0
    for name, (k, n, count) in shapes.items():
        a = torch.randn(tokens, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        flops = 2.0 * tokens * k * n
        for _ in range(3):
            torch.mm(a, b)   # warm-up
        best = best_cpu = float("inf")
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            reps = 20
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(reps):
                torch.mm(a, b)
            sync(device)
            best = min(best, (time.perf_counter() - t0) / reps)
            best_cpu = min(best_cpu, (time.process_time() - c0) / reps)
        out[name] = flops / best / 1e9
        flops_total += count * flops
        time_total += count * best
        cpu_total += count * best_cpu
    out["layer_mix"] = flops_total / time_total / 1e9
    out["layer_mix_per_cpu_s"] = flops_total / cpu_total / 1e9   # GFLOP per CPU-second (all threads)
    out["tokens"] = tokens
    return out


def round_batches(exp, steps: int, batch_size: int, seed: int) -> list[dict]:
    """The batches train_local draws from a device stream seeded by `seed` (its first draw seeds
    torch, then sample_batches), built the same way for the bare loop."""
    from fedlegend.data import sample_batches

    rng = np.random.default_rng(seed)
    rng.integers(2**62)
    data = exp.train
    lengths = [len(x) for x in data.ids]
    idx = sample_batches(len(data), steps, batch_size, rng, lengths)
    return [exp.task.batch(data, i, exp.pad_id) for i in idx]


def bare_model(exp, ranks: dict[int, int], device: torch.device):
    """A fresh base model with one peft LoRA adapter of layout `ranks` (same rank pattern, alpha, head)."""
    from peft import get_peft_model

    from fedlegend.assets import resolve_model
    from fedlegend.hosts.lora import lora_config
    from fedlegend.models import build_model

    cfg = exp.cfg
    asset = resolve_model(cfg.model.name, cfg.model.path, cfg.model.target_modules)
    torch.manual_seed(0)
    model = build_model(asset.kind, asset.path, num_labels=len(exp.label_names), dropout=cfg.model.dropout)
    peft = get_peft_model(model, lora_config(exp.spec, ranks, cfg.model.lora_alpha_over_rank, cfg.model.lora_dropout))
    return peft.to(device)


def bare_round(model, batches, lr: float, device: torch.device, precision: str) -> float:
    """One device round of the bare loop: AdamW over the trainable tensors; returns the mean loss."""
    from fedlegend.execution import autocast, to_device

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for batch in batches:
        batch = to_device(batch, device)
        with autocast(device, precision):
            loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
    return float(np.mean(losses))


def measure(exp, depths: list[int], steps: int, repeats: int, precision: str, progress: bool = True) -> list[dict]:
    from tqdm.auto import tqdm

    from fedlegend.client import step_shape, train_local
    from fedlegend.devices import step_work_flops
    from fedlegend.execution import model_device
    from fedlegend.methods.base import LoraPlan
    from fedlegend.methods.legend import rank_distribution, top_layers

    cfg, spec = exp.cfg, exp.spec
    device = model_device(exp.host.model)
    L = spec.num_layers
    dist = rank_distribution(L, cfg.method.legend.rank_budget, cfg.method.legend.rank_step)
    bs = cfg.train.batch_size
    rows = []
    for d in tqdm(depths, desc="depths", disable=not progress):
        ranks = {l: dist[l] for l in top_layers(L, d)}
        plan = LoraPlan(0, ranks)
        bare = bare_model(exp, ranks, device)
        ours_s = bare_s = ours_cpu = bare_cpu = flops = 0.0
        shapes_all = []
        for rep in range(repeats + 1):   # rep 0 warms both up (layout creation, allocator)
            seed = 1000 * d + rep
            batches = round_batches(exp, steps, bs, seed)
            def ours():
                return train_local(exp.host, exp.task, plan, exp.initial_state, exp.train, steps=steps,
                                   batch_size=bs, lr=cfg.train.lr, rng=np.random.default_rng(seed),
                                   pad_id=exp.pad_id, precision=precision)

            first_bare = rep % 2 == 1   # alternate who goes first: neither always gets the warm caches
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            if first_bare:
                bare_round(bare, batches, cfg.train.lr, device, precision)
            else:
                res = ours()
            sync(device)
            t1, c1 = time.perf_counter(), time.process_time()
            if first_bare:
                res = ours()
            else:
                bare_round(bare, batches, cfg.train.lr, device, precision)
            sync(device)
            t2, c2 = time.perf_counter(), time.process_time()
            if first_bare:   # (t0, t1) timed the bare loop: swap so that (t0, t1) is ours
                t0, t1, t2 = t0, t0 + (t2 - t1), t2
                c0, c1, c2 = c0, c0 + (c2 - c1), c2
            shapes = [step_shape(exp.task, b) for b in batches]
            if res.batch_shapes != shapes:
                raise RuntimeError(f"depth {d}: ours and the bare loop ran different batches")
            if rep == 0:
                continue
            ours_s += t1 - t0
            bare_s += t2 - t1
            ours_cpu += c1 - c0
            bare_cpu += c2 - c1
            shapes_all += shapes
            flops += sum(sum(step_work_flops(spec, ranks, set(ranks), b, w, o)) for b, w, o in shapes)
        del bare
        n = steps * repeats
        rows.append({"depth": d, "ranks": [ranks[l] for l in sorted(ranks)], "steps": n,
                     "mean_tokens_per_step": float(np.mean([b * w for b, w, _ in shapes_all])),
                     "gflop": flops / 1e9, "ours_s_per_step": ours_s / n, "bare_s_per_step": bare_s / n,
                     "ours_gflops": flops / ours_s / 1e9, "bare_gflops": flops / bare_s / 1e9,
                     "ours_over_bare": bare_s / ours_s, "ours_gflops_per_cpu_s": flops / ours_cpu / 1e9,
                     "bare_gflops_per_cpu_s": flops / bare_cpu / 1e9})
    return rows


def build(device: str, precision: str, overrides: dict | None = None):
    from fedlegend.config import build_config
    from fedlegend.experiment import build_experiment

    cfg = build_config({}, {"run.device": device, "run.precision": precision, **(overrides or {})})
    return build_experiment(cfg)


def run(device: str = "auto", precision: str = "fp32", steps: int = 5, repeats: int = 3,
        depths: list[int] | None = None, overrides: dict | None = None, progress: bool = True) -> dict:
    from fedlegend.execution import model_device

    load_before = os.getloadavg()
    exp = build(device, precision, overrides)
    dev = model_device(exp.host.model)
    depths = depths or list(range(1, exp.spec.num_layers + 1))
    rows = measure(exp, depths, steps, repeats, precision, progress)
    tokens = int(round(np.mean([r["mean_tokens_per_step"] for r in rows])))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    limit = matmul_limit(exp.spec.hidden, exp.spec.intermediate, tokens, dev, dtype)
    for r in rows:
        r["ours_fraction_of_limit"] = r["ours_gflops"] / limit["layer_mix"]
        r["bare_fraction_of_limit"] = r["bare_gflops"] / limit["layer_mix"]
        r["ours_fraction_of_limit_cpu_time"] = r["ours_gflops_per_cpu_s"] / limit["layer_mix_per_cpu_s"]
    return {"bench": "throughput", "model": exp.cfg.model.name, "device": str(dev), "precision": precision,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.processor() or
            platform.machine(), "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_before": load_before, "load_after": os.getloadavg(), "batch_size": exp.cfg.train.batch_size,
            "matmul_limit_gflops": limit, "depths": rows}


def print_table(res: dict) -> None:
    lim = res["matmul_limit_gflops"]
    print(f"{res['model']} on {res['device']} ({res['precision']}, {res['threads']} threads), "
          f"batch {res['batch_size']}; load {res['load_before'][0]:.2f} -> {res['load_after'][0]:.2f}")
    print(f"matmul limit at {lim['tokens']} tokens: layer mix {lim['layer_mix']:.1f} GFLOP/s "
          f"(h x h {lim['h_h']:.1f}, h x i {lim['h_i']:.1f}, i x h {lim['i_h']:.1f})")
    print(f"  per CPU-second (robust to other load): layer mix {lim['layer_mix_per_cpu_s']:.1f} GFLOP/cpu-s")
    print("depth  ranks              ms/step ours  bare   GFLOP/s ours  bare   ours/bare  ours/limit  "
          "(per cpu-s: ours  bare  ours/limit)")
    for r in res["depths"]:
        print(f"{r['depth']:>5}  {str(r['ranks']):<18} {1000 * r['ours_s_per_step']:>9.1f} "
              f"{1000 * r['bare_s_per_step']:>6.1f} {r['ours_gflops']:>12.1f} {r['bare_gflops']:>6.1f} "
              f"{r['ours_over_bare']:>10.2f} {r['ours_fraction_of_limit']:>11.1%}  "
              f"{r['ours_gflops_per_cpu_s']:>16.1f} {r['bare_gflops_per_cpu_s']:>5.1f} "
              f"{r['ours_fraction_of_limit_cpu_time']:>10.1%}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=5, help="local steps per device round (default: the default run's)")
    ap.add_argument("--repeats", type=int, default=3, help="timed device rounds per depth (after one warm-up)")
    ap.add_argument("--depths", default="", help="comma-separated depths (default 1..L)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's, OMP_NUM_THREADS)")
    ap.add_argument("--model", help="a registered model (default minilm-l6)")
    ap.add_argument("--out", type=Path, default=Path("bench/out/throughput.json"))
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    over = {"model.name": a.model} if a.model else {}
    if a.threads:
        over["run.threads"] = a.threads
    depths = [int(x) for x in a.depths.split(",") if x.strip()] or None
    res = run(a.device, a.precision, a.steps, a.repeats, depths, over)
    print_table(res)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
