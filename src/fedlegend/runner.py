"""One experiment from a config to its output folder: records, config, summary, plot, adapter."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

from .config import Config, dump_config
from .engine.local import run_local
from .experiment import build_experiment
from .methods import METHODS
from .results import RecordWriter, plot_run, summarize


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # ru_maxrss is KiB on Linux


def engine_for(name: str):
    """The round loop of `run.engine`; Flower is imported only when asked for."""
    if name == "flower":
        from .engine.flower import run_flower
        return run_flower
    return run_local


def run_experiment(cfg: Config, out_dir: str | Path, progress: bool = True, engine=None) -> dict:
    """Run `cfg` on its engine (`run.engine`, or `engine(exp, on_record, progress)` when given, e.g. a
    deployed Flower grid) and write everything into out_dir; returns the summary."""
    start = time.perf_counter()  # wall clock is reported, never used as simulated time
    if cfg.method.name not in METHODS:
        raise ValueError(f"unknown method {cfg.method.name!r}; registered methods: {', '.join(sorted(METHODS))}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.toml").write_text(dump_config(cfg))
    exp = build_experiment(cfg)
    (out / "partitions.json").write_text(json.dumps({
        "labels": exp.label_names, "sizes": [len(p) for p in exp.parts],
        "label_histograms": exp.label_histograms(),
        "devices": [{"id": d.id, "type": d.type, "wifi_group": d.wifi_group} for d in exp.fleet.devices],
    }, indent=1))
    writer = RecordWriter(out / "records.jsonl")
    try:
        state, records = (engine or engine_for(cfg.run.engine))(exp, on_record=writer, progress=progress)
    finally:
        writer.close()
    exp.host.save_pretrained(out / "adapter", state)
    summary = summarize(records, cfg.method.name, cfg.run.target_accuracy, seed=cfg.run.seed,
                        devices=cfg.fleet.devices, wall_clock_s=time.perf_counter() - start,
                        peak_rss_mb=peak_rss_mb())
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_run({cfg.method.name: records}, out / "accuracy_traffic.png", cfg.run.target_accuracy)
    return summary
