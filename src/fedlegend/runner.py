"""One experiment from a config to its output folder: records, config, summary, plot, adapter."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import tomllib
from functools import partial
from pathlib import Path

from .config import Config, dump_config
from .engine.local import Snapshot, run_local
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


CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 1


def save_checkpoint(path: Path, cfg: Config, snap: Snapshot, wall_clock_s: float) -> None:
    """The local loop's state after a round; written to a temporary file and renamed, so a stop
    while writing leaves the previous checkpoint whole."""
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save({"format": CHECKPOINT_FORMAT, "config": dump_config(cfg), "wall_clock_s": wall_clock_s,
                "snapshot": dict(vars(snap))}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, cfg: Config) -> tuple[Snapshot, float] | None:
    """(snapshot, wall-clock seconds spent so far) from a checkpoint of this run's config, else None.
    Unpickles: load only checkpoints fedlegend wrote (the run's own folder)."""
    import torch

    from .compare import run_relevant

    if not path.exists():
        return None
    ck = torch.load(path, weights_only=False)
    if ck.get("format") != CHECKPOINT_FORMAT:
        return None
    if run_relevant(tomllib.loads(ck["config"])) != run_relevant(tomllib.loads(dump_config(cfg))):
        return None
    return Snapshot(**ck["snapshot"]), float(ck["wall_clock_s"])


def run_experiment(cfg: Config, out_dir: str | Path, progress: bool = True, engine=None,
                   resume: bool = False) -> dict:
    """Run `cfg` on its engine (`run.engine`, or `engine(exp, on_record, progress)` when given, e.g. a
    deployed Flower grid) and write everything into out_dir; returns the summary.

    The local engine saves `checkpoint.pt` in out_dir after every round (removed when the run
    ends); with resume, a checkpoint of the same config is continued from its round, and the
    run's records, adapter and summary come out as without the stop."""
    start = time.perf_counter()  # wall clock is reported, never used as simulated time
    if cfg.method.name not in METHODS:
        raise ValueError(f"unknown method {cfg.method.name!r}; registered methods: {', '.join(sorted(METHODS))}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / CHECKPOINT
    loop = engine or engine_for(cfg.run.engine)
    earlier_s = 0.0
    if loop is run_local:
        found = load_checkpoint(ckpt, cfg) if resume else None
        if found is not None:
            snap, earlier_s = found
            print(f"{cfg.method.name}: resuming after round {snap.round} from {ckpt}", file=sys.stderr)
        elif resume and ckpt.exists():
            print(f"{cfg.method.name}: {ckpt} is of another config; starting afresh", file=sys.stderr)
        loop = partial(run_local, resume=found[0] if found else None,
                       on_snapshot=lambda s: save_checkpoint(ckpt, cfg, s, earlier_s + time.perf_counter() - start))
    (out / "config.toml").write_text(dump_config(cfg))
    exp = build_experiment(cfg)
    (out / "partitions.json").write_text(json.dumps({
        "labels": exp.label_names, "sizes": [len(p) for p in exp.parts],
        "label_histograms": exp.label_histograms(),
        "devices": [{"id": d.id, "type": d.type, "wifi_group": d.wifi_group} for d in exp.fleet.devices],
    }, indent=1))
    writer = RecordWriter(out / "records.jsonl")
    try:
        state, records = loop(exp, on_record=writer, progress=progress)
    finally:
        writer.close()
    exp.host.save_pretrained(out / "adapter", state)
    summary = summarize(records, cfg.method.name, cfg.run.target_accuracy, seed=cfg.run.seed,
                        devices=cfg.fleet.devices, wall_clock_s=earlier_s + time.perf_counter() - start,
                        peak_rss_mb=peak_rss_mb())
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_run({cfg.method.name: records}, out / "accuracy_traffic.png", cfg.run.target_accuracy)
    ckpt.unlink(missing_ok=True)
    return summary
