"""Learning tasks, found by name: how examples are encoded, how a batch becomes a loss and how a
model is scored.

A task sees the model (whatever host adapts it) and the encoded data; methods and engines
never do. A new task is one Task subclass and one entry below.
"""

from __future__ import annotations

from .base import Score, Task
from .classification import Classification
from .generation import Generation
from .multiple_choice import MultipleChoice

TASKS: dict[str, type[Task]] = {
    "classification": Classification,
    "multiple-choice": MultipleChoice,
    "generation": Generation,
}


def build_task(name: str, data_cfg=None) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; registered tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name].from_config(data_cfg)


__all__ = ["TASKS", "Score", "Task", "build_task"]
