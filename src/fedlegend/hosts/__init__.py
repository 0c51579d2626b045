"""Adapter hosts, found by name: what kind of trainable module a method puts on the model.

A method names its host in its MethodInfo (`host`); the experiment builds it here. A new
adapter kind is one AdapterHost subclass (hosts/base.py) and one entry below.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..spec import ModelSpec, Ranks
from .base import AdapterHost
from .bottleneck import BottleneckHost
from .lora import LoraHost

# name -> (model, spec, global layout, lora_alpha_over_rank, lora_dropout) -> host
HOSTS: dict[str, Callable[[torch.nn.Module, ModelSpec, Ranks, float, float], AdapterHost]] = {
    "lora": lambda model, spec, ranks, alpha_over_rank, dropout: LoraHost(model, spec, ranks, alpha_over_rank,
                                                                          dropout),
    "bottleneck": lambda model, spec, ranks, alpha_over_rank, dropout: BottleneckHost(model, spec, ranks),
}


def build_host(kind: str, model: torch.nn.Module, spec: ModelSpec, global_ranks: Ranks,
               alpha_over_rank: float = 2.0, dropout: float = 0.0) -> AdapterHost:
    if kind not in HOSTS:
        raise ValueError(f"unknown adapter host {kind!r}; registered hosts: {', '.join(sorted(HOSTS))}")
    return HOSTS[kind](model, spec, global_ranks, alpha_over_rank, dropout)


__all__ = ["AdapterHost", "BottleneckHost", "HOSTS", "LoraHost", "build_host"]
