"""Registered federated fine-tuning methods, found by name."""

from __future__ import annotations

from typing import Callable

from .base import DeviceUpdate, Estimate, Estimator, LoraPlan, Method, MethodContext, StatusReport
from .fedlora import FedLora
from .legend import Legend

# name -> class; its parameters come from the config section [method.NAME]
METHODS: dict[str, Callable[..., Method]] = {
    "legend": Legend,
    "fedlora": FedLora,
}


def make_method(name: str, ctx: MethodContext, params: dict) -> Method:
    """Build a registered method with its config section's parameters."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; registered methods: {', '.join(sorted(METHODS))}")
    return METHODS[name](ctx, **params)


__all__ = ["METHODS", "make_method", "Method", "MethodContext", "LoraPlan", "DeviceUpdate",
           "Estimate", "Estimator", "StatusReport"]
