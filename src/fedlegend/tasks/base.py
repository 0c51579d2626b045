"""The task contract: batches, a training loss, and a score of the global model."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..data import Encoded


@dataclass(frozen=True)
class Score:
    """How good the global model is on held-out data: `accuracy` drives time-to-target."""
    accuracy: float
    loss: float


class Task(ABC):
    name: str = ""

    @abstractmethod
    def batch(self, data: Encoded, idx: np.ndarray, pad_id: int) -> dict[str, torch.Tensor]:
        """The model inputs (and targets) of the examples `idx`."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss of one batch (a scalar)."""

    @abstractmethod
    def score(self, model: nn.Module, data: Encoded, batch_size: int, pad_id: int) -> Score:
        """The model (in eval mode, without grad) scored on `data`."""
