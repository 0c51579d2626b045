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


def check_fits(task: str, model_kind: str, model_name: str = "") -> None:
    """A task the model can do: multiple choice and generation read a causal LM's next-token logits;
    classification runs on an encoder's head or on a decoder's last token (models.LastTokenClassifier)."""
    from ..errors import UserError

    model = f"model {model_name!r}" if model_name else "the model"
    if model_kind != "decoder" and task != "classification":
        raise UserError(f"data.task {task!r} needs a decoder (causal LM), and {model} is an encoder: use "
                        "model.name = 'smollm2-135m' or a local causal-LM folder")


def build_task(name: str, data_cfg=None) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; registered tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name].from_config(data_cfg)


__all__ = ["TASKS", "Score", "Task", "build_task", "check_fits"]
