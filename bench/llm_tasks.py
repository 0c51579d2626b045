"""LEGEND vs FedLoRA on the LM presets (mmlu: multiple choice, math: generation) on SmolLM2-135M:
time to a target both reach, traffic to it, waiting, wall clock; one seed, resumable.

Run by hand (2 CPU cores: each run takes minutes, see docs/tasks.md for the measured figures):
    OMP_NUM_THREADS=2 python bench/llm_tasks.py --presets mmlu,math --devices 3 --rounds 8 --out bench/out/llm
Runs go through `fedlegend compare`'s machinery with resume: a finished run with the same config is
read back, an interrupted one continues from its last round's checkpoint, so a call that was
stopped continues where it was. The target is the paper's rule (the lower final accuracy of the
two methods) unless --target is given; "time to target" is virtual time (the device cost model).
Prints one row per preset and method and writes llm_tasks.json under --out (with the host load).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def bench_preset(preset: str, methods: list[str], seed: int, over: dict, out: Path, target: float | None) -> list[dict]:
    from fedlegend.compare import run_compare
    from fedlegend.config import load_config

    cfg = load_config(None, over, preset=preset)
    t0, load0 = time.time(), os.getloadavg()
    rows = run_compare(cfg, methods, [seed], out / preset, target=target, progress=False, resume=True)
    for r in rows:
        r.update(preset=preset, devices=cfg.fleet.devices, rounds=cfg.run.rounds, local_steps=cfg.train.local_steps,
                 eval_subset=cfg.data.eval_subset, call_wall_s=round(time.time() - t0, 1),
                 load_before=load0, load_after=os.getloadavg())
    return rows


def speedups(rows: list[dict]) -> dict[str, float | None]:
    """FedLoRA's time to target over LEGEND's, per preset (the paper: MMLU 2.3x; GSM8K 54 % less time)."""
    out = {}
    for preset in sorted({r["preset"] for r in rows}):
        t = {r["method"]: r["time_to_target_s"] for r in rows if r["preset"] == preset}
        a, b = t.get("legend"), t.get("fedlora")
        out[preset] = round(b / a, 3) if a and b else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="mmlu,math")
    ap.add_argument("--methods", default="legend,fedlora")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--devices", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--eval-every", type=int, default=2)
    ap.add_argument("--target", type=float, default=None)
    ap.add_argument("--out", default="bench/out/llm")
    a = ap.parse_args()
    out = Path(a.out)
    over = {"fleet.devices": a.devices, "run.rounds": a.rounds, "run.eval_every": a.eval_every}
    rows = []
    for preset in a.presets.split(","):
        rows += bench_preset(preset, a.methods.split(","), a.seed, over, out, a.target)
        for r in rows[-len(a.methods.split(",")):]:
            print(f"{r['preset']:5s} {r['method']:8s} final {r['final_accuracy']} target {r['target_accuracy']} "
                  f"time-to-target {r['time_to_target_s']} s bytes {r['bytes_to_target']} "
                  f"waiting {r['mean_waiting_s']} s wall {r['wall_clock_s']} s load {r['load_after'][0]:.1f}",
                  flush=True)
    result = {"rows": rows, "fedlora_over_legend_time_to_target": speedups(rows), "settings": vars(a)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "llm_tasks.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result["fedlora_over_legend_time_to_target"]))


if __name__ == "__main__":
    main()
