"""LEGEND under faults: accuracy at equal virtual time with 0 %, 10 % and 30 % drop-outs
(fleet.dropout_rate) and with a straggler cutoff (fleet.cutoff_s) that cuts the slowest ~10 %
of device-rounds.

Run by hand (the default setting takes about 4 minutes per run on 2 CPU cores; 4 runs):
    OMP_NUM_THREADS=1 python bench/faults.py --rounds 20 --out bench/out/faults
Runs are resumed or read back from --out (same config), so an interrupted call continues, and
`--only-rates --rates 0.3` in a second process runs a drop-out rate alongside.
The cutoff is calibrated on the fault-free run: the --cut-quantile (0.9) quantile of its
device-rounds' times. "Equal virtual time" is the shortest run's final virtual clock T; each
run's accuracy at T is that of its last evaluation at or before T (evaluations every
--eval-every rounds and at the last). Prints a table; writes bench.json and each run's folder
under --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def run(name: str, over: dict, out: Path) -> dict:
    from fedlegend.config import build_config
    from fedlegend.results import read_records
    from fedlegend.rundir import finished_run, run_experiment

    # a finished run with the same config is read back, an interrupted one continues from its checkpoint
    cfg = build_config({}, over)
    summary = finished_run(out / name, cfg) or run_experiment(cfg, out / name, progress=False, resume=True)
    recs = read_records(out / name / "records.jsonl")
    kinds = [e["kind"] for r in recs for e in r["events"]]
    device_rounds = sum(len(r["devices"]) for r in recs) + sum(k in ("dropped", "cut-off", "rejected") for k in kinds)
    return {"run": name, "overrides": over, "records": recs, "final_accuracy": summary["final_accuracy"],
            "virtual_time_s": recs[-1]["virtual_time_s"], "mean_round_s": float(np.mean([r["round_time_s"] for r in recs])),
            "dropped": kinds.count("dropped"), "cut_off": kinds.count("cut-off"), "rejected": kinds.count("rejected"),
            "device_rounds": device_rounds, "wall_s": summary.get("wall_clock_s"),
            "device_times": [d["time_s"] for r in recs for d in r["devices"]]}


def accuracy_at(recs: list[dict], t: float) -> tuple[float | None, float | None, int | None]:
    """(accuracy, its virtual time, its round) of the last evaluation at or before virtual time t."""
    evals = [r for r in recs if r["accuracy"] is not None and r["virtual_time_s"] <= t + 1e-9]
    return (evals[-1]["accuracy"], evals[-1]["virtual_time_s"], evals[-1]["round"]) if evals else (None, None, None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=36)
    ap.add_argument("--eval-every", type=int, default=3)
    ap.add_argument("--rates", default="0.1,0.3", help="drop-out rates besides 0")
    ap.add_argument("--cut-quantile", type=float, default=0.9, help="the cutoff: this quantile of the 0 %% run's "
                                                                     "device-round times (0 skips the cutoff run)")
    ap.add_argument("--out", default="bench/out/faults")
    ap.add_argument("--only-rates", action="store_true", help="run only the --rates runs, no table (to run them in a "
                                                              "second process; a later full call reads them back)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="more config overrides, e.g. --set fleet.devices=3 (a JSON value or a string)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    base = {"method.name": "legend", "run.seed": a.seed, "run.rounds": a.rounds, "run.eval_every": a.eval_every}
    for kv in a.set:
        key, value = kv.split("=", 1)
        try:
            base[key] = json.loads(value)
        except json.JSONDecodeError:
            base[key] = value
    if a.only_rates:
        for rate in [float(x) for x in a.rates.split(",") if x]:
            run(f"dropout-{rate:g}", {**base, "fleet.dropout_rate": rate}, out)
        return
    runs = [run("dropout-0", base, out)]
    cutoff = None
    if a.cut_quantile > 0:
        cutoff = float(np.quantile(runs[0]["device_times"], a.cut_quantile))
        runs.append(run(f"cutoff-q{a.cut_quantile:g}", {**base, "fleet.cutoff_s": cutoff}, out))
    for rate in [float(x) for x in a.rates.split(",") if x]:
        runs.append(run(f"dropout-{rate:g}", {**base, "fleet.dropout_rate": rate}, out))
        (out / "bench.json").write_text(json.dumps({"partial": True, "runs": [
            {k: v for k, v in r.items() if k not in ("records", "device_times")} for r in runs]}, indent=1))

    t_equal = min(r["virtual_time_s"] for r in runs)
    rows = []
    for r in runs:
        acc, at, rnd = accuracy_at(r["records"], t_equal)
        rows.append({k: v for k, v in r.items() if k not in ("records", "device_times")} |
                    {"accuracy_at_equal_time": acc, "eval_time_s": at, "eval_round": rnd,
                     "lost_share": (r["dropped"] + r["cut_off"]) / max(r["device_rounds"], 1)})
    print(f"seed {a.seed}, {a.rounds} rounds, equal virtual time T = {t_equal:.0f} s"
          + (f", cutoff {cutoff:.2f} s" if cutoff else ""))
    print(f"{'run':<14} {'acc@T':>6} {'(round)':>7} {'final':>6} {'vtime_s':>8} {'round_s':>7} {'lost':>6} "
          f"{'drop':>5} {'cut':>4} {'wall_s':>6}")
    for r in rows:
        acc = f"{r['accuracy_at_equal_time']:.4f}" if r["accuracy_at_equal_time"] is not None else "-"
        print(f"{r['run']:<14} {acc:>6} {r['eval_round'] or '-':>7} {r['final_accuracy']:>6.4f} "
              f"{r['virtual_time_s']:>8.0f} {r['mean_round_s']:>7.2f} {r['lost_share']:>6.1%} {r['dropped']:>5} "
              f"{r['cut_off']:>4} {r['wall_s']:>6.0f}")
    (out / "bench.json").write_text(json.dumps({"seed": a.seed, "rounds": a.rounds, "eval_every": a.eval_every,
                                                "equal_time_s": t_equal, "cutoff_s": cutoff, "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
