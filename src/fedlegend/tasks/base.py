"""The task contract: encoding, batches, a training loss, and a score of the global model."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data import Encoded, encode


@dataclass(frozen=True)
class Score:
    """How good the global model is on held-out data: `accuracy` drives time-to-target."""
    accuracy: float
    loss: float


class Task(ABC):
    name: str = ""

    @classmethod
    def from_config(cls, data_cfg: Any | None = None) -> "Task":
        """The task with its knobs from the [data] section (default: none)."""
        return cls()

    def encode(self, tokenizer, ds, idx, max_length: int) -> Encoded:
        """Token ids (and what scoring needs) of the examples `idx` of dataset `ds`; by default a
        TextDataset's texts (and pairs) with their labels, as classification encodes them."""
        idx = list(idx)
        pairs = None if getattr(ds, "pairs", None) is None else [ds.pairs[i] for i in idx]
        return encode(tokenizer, [ds.texts[i] for i in idx], [ds.labels[i] for i in idx], max_length, pairs)

    @abstractmethod
    def batch(self, data: Encoded, idx: np.ndarray, pad_id: int) -> dict[str, torch.Tensor]:
        """The model inputs (and targets) of the examples `idx`."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss of one batch (a scalar)."""

    def output_positions(self, batch: dict[str, torch.Tensor]) -> int:
        """Positions per sequence at which `loss` runs the model's output layer (the cost model prices
        the head or lm_head there, devices.output_flops): by default one (a head on the pooled sequence)."""
        return 1

    @abstractmethod
    def score(self, model: nn.Module, data: Encoded, batch_size: int, pad_id: int) -> Score:
        """The model (in eval mode, without grad) scored on `data`; batches go to the model's device."""
