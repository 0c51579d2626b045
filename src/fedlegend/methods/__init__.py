"""Registered federated fine-tuning methods, found by name.

Each entry names the config section ([method.SECTION]) its parameters come from, plus
fixed presets (the LEGEND ablations of fig. 13 reuse LEGEND's section).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .base import DeviceUpdate, Estimate, Estimator, LoraPlan, Method, MethodContext, StatusReport
from .fedadapter import FedAdapter
from .fedex_lora import FedExLora
from .fedlora import FedLora
from .fedra import FedRA
from .ffa_lora import FfaLora
from .flexlora import FlexLora
from .flora import FLora
from .hetlora import HetLora
from .hierfedlora import HierFedLora
from .hlora import HLora
from .legend import Legend


@dataclass(frozen=True)
class Registered:
    factory: Callable[..., Method]
    section: str
    preset: dict = field(default_factory=dict)


METHODS: dict[str, Registered] = {
    "legend": Registered(Legend, "legend"),
    "legend-wo-ld": Registered(Legend, "legend", {"full_depth": True}),     # fig. 13: w/o LoRA depth
    "legend-wo-rd": Registered(Legend, "legend", {"uniform_ranks": True}),  # fig. 13: w/o rank distribution
    "fedlora": Registered(FedLora, "fedlora"),
    "hetlora": Registered(HetLora, "hetlora"),
    "flexlora": Registered(FlexLora, "flexlora"),
    "hlora": Registered(HLora, "hlora"),
    "fedra": Registered(FedRA, "fedra"),
    "fedadapter": Registered(FedAdapter, "fedadapter"),   # bottleneck adapters (fedlegend.adapters)
    "ffa-lora": Registered(FfaLora, "fedlora"),   # same rank/weighting knobs as FedLoRA
    "fedex-lora": Registered(FedExLora, "fedlora"),
    "flora": Registered(FLora, "flora"),
    "hierfedlora": Registered(HierFedLora, "hierfedlora"),
}


def make_method(name: str, ctx: MethodContext, sections: dict[str, dict]) -> Method:
    """Build a registered method from the config's method sections ({section: params})."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; registered methods: {', '.join(sorted(METHODS))}")
    reg = METHODS[name]
    return reg.factory(ctx, **{**sections.get(reg.section, {}), **reg.preset})


__all__ = ["METHODS", "make_method", "Method", "MethodContext", "LoraPlan", "DeviceUpdate",
           "Estimate", "Estimator", "StatusReport"]
