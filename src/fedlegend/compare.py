"""`fedlegend compare`: several methods on the same partitions, seeds and fleet; the paper's figures.

For each seed every method runs with the same config (so the same data split, partitions,
fleet and initialisation); the target accuracy is the paper's rule (the lowest final
accuracy among the compared methods of that seed) unless one is given.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from .config import Config
from .results import plot_accuracy, pyplot, read_records, save, time_to_target
from .rundir import finished_run, run_experiment

CSV_FIELDS = ["method", "seed", "target_accuracy", "final_accuracy", "time_to_target_s", "bytes_to_target",
              "mean_waiting_s", "virtual_time_s", "wall_clock_s"]


def run_compare(cfg: Config, methods: list[str], seeds: list[int], out_dir: str | Path,
                target: float | None = None, progress: bool = True, resume: bool = False,
                fresh_on_bad_checkpoint: bool = False) -> list[dict]:
    """Every method on every seed; with resume, a run whose folder holds a finished run of the
    same config is read back instead of run again, and an unfinished one continues from its
    last round's checkpoint (a long compare survives an interruption). A corrupt or foreign
    checkpoint stops the compare with its error, or with fresh_on_bad_checkpoint is reported and
    that run starts afresh."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in seeds:
        summaries = {}
        for m in methods:
            run_cfg = cfg.model_copy(deep=True)
            run_cfg.method.name = m
            run_cfg.run.seed = seed
            done = finished_run(out / f"{m}-seed{seed}", run_cfg) if resume else None
            summaries[m] = done or run_experiment(run_cfg, out / f"{m}-seed{seed}", progress=progress, resume=resume,
                                                  fresh_on_bad_checkpoint=fresh_on_bad_checkpoint)
        rows.extend(rows_for_seed(out, seed, summaries, target))
    write_outputs(out, rows, methods, seeds)
    return rows


def rows_for_seed(out: Path, seed: int, summaries: dict[str, dict], target: float | None) -> list[dict]:
    finals = [s["final_accuracy"] for s in summaries.values() if s["final_accuracy"] is not None]
    tgt = target if target is not None else min(finals)
    rows = []
    for m, s in summaries.items():
        t, b, _ = time_to_target(read_records(out / f"{m}-seed{seed}" / "records.jsonl"), tgt)
        rows.append({"method": m, "seed": seed, "target_accuracy": tgt, "final_accuracy": s["final_accuracy"],
                     "time_to_target_s": t, "bytes_to_target": b, "mean_waiting_s": s["mean_waiting_s"],
                     "virtual_time_s": s["virtual_time_s"], "wall_clock_s": s["wall_clock_s"]})
    return rows


def _mean_std(values: list) -> tuple[float | None, float | None]:
    v = [x for x in values if x is not None]
    if not v:
        return None, None
    return float(np.mean(v)), float(np.std(v))


def markdown_table(rows: list[dict], methods: list[str]) -> str:
    """Mean +- std per method over seeds, and each method's ratio to LEGEND (method / legend)."""
    keys = [("final_accuracy", "final acc", 100, "{:.1f}"), ("time_to_target_s", "time to target (s)", 1, "{:.0f}"),
            ("bytes_to_target", "traffic to target (MB)", 1e-6, "{:.1f}"), ("mean_waiting_s", "mean waiting (s)", 1, "{:.2f}")]
    ref = {k: _mean_std([r[k] for r in rows if r["method"] == "legend"])[0] for k, *_ in keys}
    head = "| method | " + " | ".join(f"{label} | x LEGEND" for _, label, _, _ in keys) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(keys))]
    for m in methods:
        cells = [m]
        for k, _, scale, fmt in keys:
            mean, std = _mean_std([r[k] for r in rows if r["method"] == m])
            missing = sum(1 for r in rows if r["method"] == m and r[k] is None)
            if mean is None:
                cells += ["never", "-"]
                continue
            cell = f"{fmt.format(mean * scale)} ± {fmt.format(std * scale)}" + (f" ({missing} never)" if missing else "")
            ratio = f"{mean / ref[k]:.2f}" if ref.get(k) else "-"
            cells += [cell, ratio]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(out: Path, rows: list[dict], methods: list[str], seeds: list[int]) -> None:
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in CSV_FIELDS})
    table = markdown_table(rows, methods)
    (out / "table.md").write_text(table + "\n")
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    plot_compare(out, rows, methods, seeds)
    print(table)


def plot_compare(out: Path, rows: list[dict], methods: list[str], seeds: list[int]) -> None:
    """The paper's figures from a compare: fig. 7 (accuracy vs time, first seed), figs. 8, 11, 12
    (time, traffic, waiting: mean ± std over seeds) and, with LEGEND's ablations, fig. 13."""
    plt = pyplot()
    seed = seeds[0]

    def records(m: str) -> list[dict]:
        return read_records(out / f"{m}-seed{seed}" / "records.jsonl")

    fig, ax = plt.subplots(figsize=(6, 4))                      # fig. 7: accuracy vs time
    tgt = next(r["target_accuracy"] for r in rows if r["seed"] == seed)
    plot_accuracy(ax, {m: records(m) for m in methods}, tgt, title=f"Accuracy vs time (seed {seed})")
    save(fig, out / "fig7_accuracy_vs_time.png")

    for key, scale, label, name in (("time_to_target_s", 1, "time to target (s)", "fig8_time_to_target"),
                                    ("bytes_to_target", 1e-6, "traffic to target (MB)", "fig11_traffic_to_target"),
                                    ("mean_waiting_s", 1, "mean waiting per round (s)", "fig12_waiting")):
        fig, ax = plt.subplots(figsize=(6, 4))
        means, stds = [], []
        for m in methods:
            mean, std = _mean_std([r[key] for r in rows if r["method"] == m])
            means.append((mean or 0.0) * scale)
            stds.append((std or 0.0) * scale)
        ax.bar(methods, means, yerr=stds, capsize=4, color="tab:blue")
        ax.set(ylabel=label, title=f"{label}, mean ± std over {len(seeds)} seed(s)")
        ax.tick_params(axis="x", rotation=30)
        save(fig, out / f"{name}.png")

    ablations = [m for m in ("legend", "legend-wo-ld", "legend-wo-rd") if m in methods]
    if len(ablations) > 1:                                       # fig. 13
        fig, ax = plt.subplots(figsize=(6, 4))
        plot_accuracy(ax, {m: records(m) for m in ablations}, title="Ablation: LoRA depth / rank distribution")
        save(fig, out / "fig13_ablation.png")
