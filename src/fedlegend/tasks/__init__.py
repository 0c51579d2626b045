"""Learning tasks, found by name: how a batch becomes a loss and how a model is scored.

A task sees the model (whatever host adapts it) and the encoded data; methods and engines
never do. A new task (multiple choice, generation) is one Task subclass and one entry below.
"""

from __future__ import annotations

from .base import Score, Task
from .classification import Classification

TASKS: dict[str, type[Task]] = {
    "classification": Classification,
}


def build_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; registered tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]()


__all__ = ["TASKS", "Score", "Task", "build_task"]
