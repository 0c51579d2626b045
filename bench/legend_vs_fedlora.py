"""LEGEND vs FedLoRA on the default setting: time to target, traffic, waiting, wall clock, memory.

Run by hand (about 5 minutes per run, 2 runs per seed):
    python bench/legend_vs_fedlora.py --seeds 0,1,2 --out bench/out/default
Prints one row per method and seed, then the ratio FedLoRA / LEGEND of the virtual time to
the target accuracy. The target is the paper's rule (the lowest final accuracy among the
compared runs of a seed) unless --target is given. Each run also writes its full output
folder (records, summary, plot, adapter) under --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def run(method: str, seed: int, out: Path, extra: list[str]) -> dict:
    # A fresh process per run, so peak RSS and wall clock are each run's own.
    cmd = [sys.executable, "-m", "fedlegend.cli", "run", "--method", method, "--seed", str(seed),
           "--out", str(out), "--quiet", *extra]
    subprocess.run(cmd, check=True)
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default="bench/out/default")
    ap.add_argument("--target", type=float, help="fixed target accuracy (default: lowest final accuracy)")
    ap.add_argument("extra", nargs="*", help="more flags for fedlegend run, after --")
    a = ap.parse_args()
    from fedlegend.results import read_records, time_to_target

    rows = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        res = {m: run(m, seed, Path(a.out) / f"{m}-seed{seed}", a.extra) for m in ("legend", "fedlora")}
        target = a.target or min(r["final_accuracy"] for r in res.values())
        for m, s in res.items():
            t, b, rnd = time_to_target(read_records(Path(a.out) / f"{m}-seed{seed}" / "records.jsonl"), target)
            rows.append({"seed": seed, "method": m, "target": target, "time_to_target_s": t, "bytes_to_target": b,
                         "round": rnd, "final_accuracy": s["final_accuracy"], "mean_waiting_s": s["mean_waiting_s"],
                         "virtual_time_s": s["virtual_time_s"], "wall_clock_s": s["wall_clock_s"],
                         "peak_rss_mb": s["peak_rss_mb"]})
    print(f"{'seed':>4} {'method':<8} {'target':>6} {'t_target_s':>10} {'MB_target':>9} {'final':>6} "
          f"{'wait_s':>7} {'wall_s':>7} {'rss_MB':>7}")
    for r in rows:
        t = f"{r['time_to_target_s']:.0f}" if r["time_to_target_s"] is not None else "never"
        mb = f"{r['bytes_to_target'] / 1e6:.1f}" if r["bytes_to_target"] is not None else "-"
        print(f"{r['seed']:>4} {r['method']:<8} {r['target']:>6.3f} {t:>10} {mb:>9} {r['final_accuracy']:>6.3f} "
              f"{r['mean_waiting_s']:>7.2f} {r['wall_clock_s']:>7.0f} {r['peak_rss_mb']:>7.0f}")
    for seed in sorted({r["seed"] for r in rows}):
        by = {r["method"]: r for r in rows if r["seed"] == seed}
        tl, tf = by["legend"]["time_to_target_s"], by["fedlora"]["time_to_target_s"]
        ratio = f"{tf / tl:.2f}x" if tl and tf else "n/a (a method never reached the target)"
        print(f"seed {seed}: FedLoRA / LEGEND time to target = {ratio}")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "bench.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
