"""Engines run an Experiment's rounds: the local loop on the virtual clock, or Flower.

An engine is a function (exp, on_record=None, progress=True, ...) -> (final adapter, records)
and says what it supports; the run folder (rundir.py) asks it, never compares identities.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Engine:
    name: str
    run: Callable
    supports_resume: bool = False   # run(..., resume=Snapshot | None, on_snapshot=callback)
    build: Callable | None = None   # cfg -> Experiment; None: experiment.build_experiment (everything in process)


def _run_local(*args, **kwargs):
    from .local import run_local
    return run_local(*args, **kwargs)


def _run_flower(*args, **kwargs):
    from .flower import run_flower   # Flower (and Ray) are imported only when asked for
    return run_flower(*args, **kwargs)


ENGINES: dict[str, Engine] = {
    "local": Engine("local", _run_local, supports_resume=True),
    "flower": Engine("flower", _run_flower, supports_resume=True),
}


def engine_for(name: str) -> Engine:
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; registered engines: {', '.join(sorted(ENGINES))}")
    return ENGINES[name]
