"""Final accuracy against the privacy budget: LEGEND and FedLoRA on the default setting with
user-level differential privacy (central noise, client-side clipping; docs/privacy.md) at
target epsilons 1, 3, 8 and without DP, one seed.

Run by hand (a default run takes several minutes on 2 CPU cores; 8 runs):
    OMP_NUM_THREADS=1 python bench/privacy.py --out bench/out/privacy
Runs are resumed or read back from --out (same config), so an interrupted call continues, and
`--methods fedlora` in a second process runs one method alongside (a later full call reads it
back). Prints a table; writes bench.json and each run's folder under --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def run(name: str, over: dict, out: Path) -> dict:
    from fedlegend.config import build_config
    from fedlegend.results import read_records
    from fedlegend.rundir import finished_run, run_experiment

    cfg = build_config({}, over)
    summary = finished_run(out / name, cfg) or run_experiment(cfg, out / name, progress=False, resume=True)
    recs = read_records(out / name / "records.jsonl")
    return {"run": name, "overrides": over, "final_accuracy": summary["final_accuracy"],
            "best_accuracy": summary["best_accuracy"], "rounds": summary["rounds"],
            "epsilon": summary.get("epsilon"), "delta": summary.get("delta"),
            "noise_multiplier": summary.get("noise_multiplier"), "wall_s": summary.get("wall_clock_s"),
            "accuracy_by_round": [(r["round"], r["accuracy"]) for r in recs if r["accuracy"] is not None]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=36, help="the default setting's 36 (fewer to save time)")
    ap.add_argument("--methods", default="legend,fedlora")
    ap.add_argument("--epsilons", default="1,3,8,none", help="target epsilons; 'none' = no DP")
    ap.add_argument("--clip", type=float, default=1.0, help="privacy.clip C")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--out", default="bench/out/privacy")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="more config overrides, e.g. --set fleet.devices=3 (a JSON value or a string)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    base = {"run.seed": a.seed, "run.rounds": a.rounds}
    for kv in a.set:
        key, value = kv.split("=", 1)
        try:
            base[key] = json.loads(value)
        except json.JSONDecodeError:
            base[key] = value
    rows = []
    for method in [m.strip() for m in a.methods.split(",") if m.strip()]:
        for eps in [e.strip() for e in a.epsilons.split(",") if e.strip()]:
            over = {**base, "method.name": method}
            if eps != "none":
                over |= {"privacy.epsilon": float(eps), "privacy.clip": a.clip, "privacy.delta": a.delta}
            rows.append(run(f"{method}-eps{eps}", over, out))
            (out / "bench.json").write_text(json.dumps({"seed": a.seed, "rounds": a.rounds, "runs": rows}, indent=1))
            r = rows[-1]
            print(f"{r['run']:<16} final {r['final_accuracy']:.4f} best {r['best_accuracy']:.4f} "
                  f"sigma {r['noise_multiplier'] or 0:.3f} epsilon {r['epsilon'] or 0:.3f} wall {r['wall_s']:.0f} s",
                  flush=True)
    print(f"\nseed {a.seed}, {a.rounds} rounds, clip {a.clip}, delta {a.delta}")
    print(f"{'method':<10} {'target eps':>10} {'sigma':>7} {'spent eps':>9} {'final acc':>9} {'best acc':>8}")
    for r in rows:
        target = r["overrides"].get("privacy.epsilon")
        print(f"{r['overrides']['method.name']:<10} {target if target else 'no DP':>10} "
              f"{r['noise_multiplier'] or 0:>7.3f} {r['epsilon'] or 0:>9.3f} {r['final_accuracy']:>9.4f} "
              f"{r['best_accuracy']:>8.4f}")


if __name__ == "__main__":
    main()
