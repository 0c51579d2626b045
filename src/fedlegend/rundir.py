"""A run folder: one experiment from its config to its outputs, and everything about its identity.

Owns: run identity (two configs are the same run when every section the method reads is
equal), the output files (config.toml, partitions.json, records.jsonl, summary.json, the
plot, adapter/), the per-round checkpoint and --resume, and recognising a finished run
(compare --resume). compare.py builds on this module; nothing here imports compare.
"""

from __future__ import annotations

import json
import resource
import shutil
import sys
import time
import tomllib
from pathlib import Path
from typing import Callable

from . import checkpoint
from .checkpoint import CheckpointError
from .config import Config, ConfigError, build_config, dump_config
from .engine import Engine, engine_for
from .engine.local import Snapshot
from .experiment import build_experiment
from .methods import METHODS
from .results import RecordWriter, plot_run, summarize

CHECKPOINT = "checkpoint"   # a folder: checkpoint.json + tensors-*.safetensors (checkpoint.py)
CHECKPOINT_FORMAT = 3   # 3: JSON + safetensors (2: a pickle, checkpoint.pt, no longer read)
LEGACY_CHECKPOINT = "checkpoint.pt"
FRESH_FLAG = "--fresh-on-bad-checkpoint"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # ru_maxrss is KiB on Linux


# ---------------------------------------------------------------- identity
def run_relevant(config: dict) -> dict:
    """A config (parsed TOML) without the [method.*] sections its method does not read: a run
    stays the same run when another method's defaults change or a new method is added."""
    method = dict(config.get("method", {}))
    reg = METHODS.get(method.get("name"))
    keep = {"name": method.get("name")}
    if reg is not None:
        keep[reg.section] = method.get(reg.section)
    return {**config, "method": keep}


def same_run(config_toml: str, cfg: Config) -> bool:
    """Whether a saved config (TOML text) is the same run as `cfg`. The saved one is read through
    today's defaults first, so a knob added since (at its default, the old behaviour) does not make
    a finished run another run; one that no longer validates is another run."""
    try:
        saved = dump_config(build_config(tomllib.loads(config_toml), source="a saved run's config"))
    except (ConfigError, tomllib.TOMLDecodeError):
        return False
    return run_relevant(tomllib.loads(saved)) == run_relevant(tomllib.loads(dump_config(cfg)))


def finished_run(run_dir: Path, cfg: Config) -> dict | None:
    """The summary of a finished run of this config in run_dir, else None (for --resume)."""
    summary, config = run_dir / "summary.json", run_dir / "config.toml"
    if not (summary.exists() and config.exists()) or not same_run(config.read_text(), cfg):
        return None
    return json.loads(summary.read_text())


# ---------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, cfg: Config, snap: Snapshot, wall_clock_s: float) -> None:
    """The round loop's state after a round, into the folder `path` (checkpoint.py: JSON + safetensors,
    the manifest renamed last, so a stop while writing leaves the previous checkpoint whole)."""
    checkpoint.write(path, {"config": dump_config(cfg), "wall_clock_s": wall_clock_s},
                     {"snapshot": {k: v for k, v in vars(snap).items() if k != "devices" or v}},   # devices: if kept
                     CHECKPOINT_FORMAT, label=f"r{snap.round:04d}")


def _bad(path: Path, why: str) -> CheckpointError:
    err = CheckpointError(f"{why}; delete {path} to start the run afresh (or add {FRESH_FLAG} to fedlegend run / compare --resume)")
    err.why = why
    return err


def load_checkpoint(path: Path, cfg: Config) -> tuple[Snapshot, float] | None:
    """(snapshot, wall-clock seconds spent so far) from the checkpoint folder `path` if it is one of
    this run's config; None when there is none, or it is of another config. A corrupt, truncated or
    foreign one (or an old pickle checkpoint.pt beside it) raises CheckpointError: one line naming the
    file and the fix. Never unpickles: the tensors are read by safetensors, the rest is JSON."""
    legacy = path.parent / LEGACY_CHECKPOINT
    if not (path / checkpoint.MANIFEST).exists():
        if legacy.exists():
            raise _bad(legacy, f"{legacy}: a pickle checkpoint of an older fedlegend, which is not loaded "
                       "(unpickling runs code)")
        return None   # none yet (a stop during the first save leaves no manifest)
    try:
        manifest = checkpoint.read_manifest(path, CHECKPOINT_FORMAT)
        if type(manifest.get("config")) is not str or not same_run(manifest["config"], cfg):
            return None
        tree = checkpoint.read_tree(path, manifest)
        snap = tree["snapshot"] if type(tree) is dict else None
        fields = {"round", "clock", "state", "estimates", "method", "records"}
        if type(snap) is not dict or set(snap) - {"devices"} != fields or type(snap["round"]) is not int:
            raise CheckpointError(f"{path / checkpoint.MANIFEST}: holds no round-loop snapshot")
        wall = manifest.get("wall_clock_s")
        if type(wall) not in (int, float):
            raise CheckpointError(f"{path / checkpoint.MANIFEST}: no wall_clock_s")
    except CheckpointError as err:
        raise _bad(path, str(err)) from None
    return Snapshot(**snap), float(wall)


def remove_checkpoint(path: Path) -> None:
    """The checkpoint folder (and an old checkpoint.pt beside it), once the run has ended."""
    shutil.rmtree(path, ignore_errors=True)
    (path.parent / LEGACY_CHECKPOINT).unlink(missing_ok=True)


# ---------------------------------------------------------------- outputs
def write_partitions(path: Path, exp) -> None:
    path.write_text(json.dumps({
        "labels": exp.label_names, "sizes": [f.samples for f in exp.facts],
        "label_histograms": exp.label_histograms(),
        "devices": [{"id": d.id, "type": d.type, "wifi_group": d.wifi_group} for d in exp.fleet.devices],
    }, indent=1))


def run_experiment(cfg: Config, out_dir: str | Path, progress: bool = True,
                   engine: Engine | Callable | None = None, resume: bool = False,
                   fresh_on_bad_checkpoint: bool = False) -> dict:
    """Run `cfg` on its engine (`run.engine`, or `engine` when given, e.g. a deployed Flower grid:
    an Engine or a plain function (exp, on_record, progress)) and write everything into out_dir;
    returns the summary.

    An engine that supports resume (the local loop, Flower's) saves `checkpoint/` in out_dir after
    every round (removed when the run ends); with resume, a checkpoint of the same config is
    continued from its round, and the run's records, adapter and summary come out as without the
    stop. One of another config is left for a fresh run; a corrupt or foreign one raises
    CheckpointError, or with fresh_on_bad_checkpoint is reported and left for a fresh run."""
    start = time.perf_counter()  # wall clock is reported, never used as simulated time
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / CHECKPOINT
    if engine is None:
        engine = engine_for(cfg.run.engine)
    elif not isinstance(engine, Engine):
        engine = Engine("custom", engine)
    earlier_s, extra = 0.0, {}
    if engine.supports_resume:
        found = None
        if resume:
            try:
                found = load_checkpoint(ckpt, cfg)
            except CheckpointError as err:
                if not fresh_on_bad_checkpoint:
                    raise
                print(f"{cfg.method.name}: {getattr(err, 'why', err)}; starting afresh ({FRESH_FLAG})",
                      file=sys.stderr)
            else:
                if found is not None:
                    print(f"{cfg.method.name}: resuming after round {found[0].round} from {ckpt}", file=sys.stderr)
                    earlier_s = found[1]
                elif (ckpt / checkpoint.MANIFEST).exists():
                    print(f"{cfg.method.name}: {ckpt} is of another config; starting afresh", file=sys.stderr)
        extra = {"resume": found[0] if found else None,
                 "on_snapshot": lambda s: save_checkpoint(ckpt, cfg, s, earlier_s + time.perf_counter() - start)}
    (out / "config.toml").write_text(dump_config(cfg))
    exp = (engine.build or build_experiment)(cfg)   # a deployed server builds from its devices' reports
    write_partitions(out / "partitions.json", exp)
    writer = RecordWriter(out / "records.jsonl")
    try:
        state, records = engine.run(exp, on_record=writer, progress=progress, **extra)
    finally:
        writer.close()
    exp.host.save_pretrained(out / "adapter", state)
    summary = summarize(records, cfg.method.name, cfg.run.target_accuracy, seed=cfg.run.seed,
                        devices=cfg.fleet.devices, wall_clock_s=earlier_s + time.perf_counter() - start,
                        peak_rss_mb=peak_rss_mb())
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_run({cfg.method.name: records}, out / "accuracy_traffic.png", cfg.run.target_accuracy)
    remove_checkpoint(ckpt)
    return summary
