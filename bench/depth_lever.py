"""The depth-lever question (issue 15): does LEGEND's lead over FedLoRA grow with the number of layers?

Reads the run folders of `fedlegend compare --methods legend,fedlora` (or the records kept in
docs/results/depth-lever/) on two or more models (the same
fleet, schedule and seeds) and prints, per model and seed, LEGEND's lead over FedLoRA:
- time to target by the paper's rule (target = the lower final accuracy of the two; FedLoRA's time
  over LEGEND's), traffic to it and mean waiting (LEGEND's over FedLoRA's);
- the clock after the last round (FedLoRA's virtual time over LEGEND's: the per-round lead alone);
- the time-to-target ratio swept over targets (every evaluated accuracy level both runs reach, from
  --lowest up; its median per seed), since
  the paper's rule puts the target on whatever plateau the lower run ends on, and which round first
  touches a plateau is decided by a few test examples.
Writes depth_lever.json, depth_lever.csv and depth_lever.png (ratio against target, one line per model
and seed) into --out.

    python bench/depth_lever.py --runs minilm-l6=docs/results/depth-lever/minilm-l6 \
        mpnet-base=docs/results/depth-lever/mpnet-base --seeds 0,1,2 --out bench/out/depth-lever
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from fedlegend.results import pyplot, read_records, save, time_to_target


def final_accuracy(records: list[dict]) -> float:
    return [r["accuracy"] for r in records if r["accuracy"] is not None][-1]


def lead(legend: list[dict], fedlora: list[dict], target: float) -> dict:
    """LEGEND against FedLoRA at one target: FedLoRA's time over LEGEND's, LEGEND's bytes over FedLoRA's."""
    (tl, bl, rl), (tf, bf, rf) = time_to_target(legend, target), time_to_target(fedlora, target)
    return {"target": target, "legend_s": tl, "fedlora_s": tf, "legend_round": rl, "fedlora_round": rf,
            "time_x": tf / tl if tl and tf else None, "traffic_x": bl / bf if bl and bf else None}


def reached_levels(legend: list[dict], fedlora: list[dict], lowest: float) -> list[float]:
    """Every evaluated accuracy level from `lowest` up to the lower of the two best, as targets."""
    top = min(max(r["accuracy"] for r in rs if r["accuracy"] is not None) for rs in (legend, fedlora))
    levels = {r["accuracy"] for rs in (legend, fedlora) for r in rs if r["accuracy"] is not None}
    return sorted(a for a in levels if lowest <= a <= top)


def run_records(folder: Path, method: str, seed: int) -> list[dict]:
    """A run's records from a compare folder (METHOD-seedS/records.jsonl) or from the copies kept under
    docs/results (METHOD-seedS-records.jsonl)."""
    run = folder / f"{method}-seed{seed}" / "records.jsonl"
    return read_records(run if run.exists() else folder / f"{method}-seed{seed}-records.jsonl")


def one_seed(run_dir: Path, seed: int, lowest: float) -> dict:
    legend, fedlora = run_records(run_dir, "legend", seed), run_records(run_dir, "fedlora", seed)
    rule = min(final_accuracy(legend), final_accuracy(fedlora))   # the paper's target rule
    at_rule = lead(legend, fedlora, rule)
    return {
        "seed": seed, "final_legend": final_accuracy(legend), "final_fedlora": final_accuracy(fedlora),
        **{f"rule_{k}": v for k, v in at_rule.items()},
        "clock_x": fedlora[-1]["virtual_time_s"] / legend[-1]["virtual_time_s"],
        "waiting_x": (np.mean([r["mean_waiting_s"] for r in legend]) / np.mean([r["mean_waiting_s"] for r in fedlora])),
        "traffic_total_x": (sum(r["bytes_up"] + r["bytes_down"] for r in legend)
                            / sum(r["bytes_up"] + r["bytes_down"] for r in fedlora)),
        "sweep": (sweep := [lead(legend, fedlora, t) for t in reached_levels(legend, fedlora, lowest)]),
        "sweep_median_x": float(np.median([x["time_x"] for x in sweep if x["time_x"]])) if sweep else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", nargs="+", required=True, metavar="MODEL=DIR",
                    help="a compare folder per model holding legend-seedS/ and fedlora-seedS/")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--lowest", type=float, default=0.70, help="the lowest target of the sweep (default 0.70)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    results = {}
    for spec in a.runs:
        model, _, folder = spec.partition("=")
        if not folder:
            ap.error(f"--runs {spec!r}: give MODEL=DIR, e.g. mpnet-base=runs/lever/mpnet-base")
        results[model] = [one_seed(Path(folder), s, a.lowest) for s in seeds]
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "depth_lever.json").write_text(json.dumps(results, indent=1))
    fields = ["model", "seed", "final_legend", "final_fedlora", "rule_target", "rule_legend_round", "rule_fedlora_round",
              "rule_time_x", "rule_traffic_x", "sweep_median_x", "clock_x", "waiting_x", "traffic_total_x"]
    with open(a.out / "depth_lever.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for model, rows in results.items():
            for r in rows:
                w.writerow({"model": model, **{k: r[k] for k in fields[1:]}})
    print("| model | seed | final LEGEND / FedLoRA | target (rule) | rounds to it (L / F) | time x | traffic x "
          "| time x, median over targets | clock x (last round) | waiting x |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model, rows in results.items():
        for r in rows:
            tx = f"{r['rule_time_x']:.2f}" if r["rule_time_x"] else "-"
            bx = f"{r['rule_traffic_x']:.2f}" if r["rule_traffic_x"] else "-"
            print(f"| {model} | {r['seed']} | {100 * r['final_legend']:.1f} / {100 * r['final_fedlora']:.1f} % "
                  f"| {100 * r['rule_target']:.1f} % | {r['rule_legend_round']} / {r['rule_fedlora_round']} | {tx} "
                  f"| {bx} | {r['sweep_median_x']:.2f} | {r['clock_x']:.2f} | {r['waiting_x']:.2f} |")
        mean = lambda k: np.mean([r[k] for r in rows if r[k] is not None])   # noqa: E731
        print(f"| {model} | mean | | | | {mean('rule_time_x'):.2f} | {mean('rule_traffic_x'):.2f} "
              f"| {mean('sweep_median_x'):.2f} | {mean('clock_x'):.2f} | {mean('waiting_x'):.2f} |")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (model, rows) in enumerate(results.items()):
        for r, style in zip(rows, ["-", "--", ":", "-."] * len(rows)):
            pts = [(100 * s["target"], s["time_x"]) for s in r["sweep"] if s["time_x"]]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, ls=style, color=f"C{i}", alpha=0.8,
                        label=f"{model}, seed {r['seed']}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set(xlabel="target accuracy (%)", ylabel="time to target: FedLoRA / LEGEND",
           title="LEGEND's lead against the target")
    ax.legend(fontsize=7)
    save(fig, a.out / "depth_lever.png")
    print(f"wrote {a.out}/depth_lever.json, .csv, .png")


if __name__ == "__main__":
    main()
