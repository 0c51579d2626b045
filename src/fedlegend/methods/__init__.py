"""Registered federated fine-tuning methods, found by name.

Each entry names the config section ([method.SECTION]) its parameters come from, plus
fixed presets (the LEGEND ablations of fig. 13 reuse LEGEND's section). This registry is
the one list of methods: the config validates `method.name` against it (check_method) and
the CLI's help and configs/default.toml are generated from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

from ..errors import MethodNameError
from .aggregation import DeviceUpdate
from .base import (Aggregated, Assignment, Estimate, Estimator, LoraPlan, Method, MethodContext, MethodInfo,
                   RoundView, Skip, StatusReport)
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
    preset: dict = field(default_factory=dict)
    paper: str = ""

    @property
    def section(self) -> str:
        return self.factory.info.section


METHODS: dict[str, Registered] = {
    "legend": Registered(Legend, paper="Liu et al., adaptive LoRA depth and rank distribution (LEGEND)"),
    "legend-wo-ld": Registered(Legend, {"full_depth": True}, "LEGEND without LoRA depth (fig. 13 ablation)"),
    "legend-wo-rd": Registered(Legend, {"uniform_ranks": True}, "LEGEND without rank distribution (fig. 13)"),
    "fedlora": Registered(FedLora, paper="LoRA (Hu et al., ICLR 2022) with FedAvg"),
    "hetlora": Registered(HetLora, paper="HetLoRA (Cho et al., EMNLP 2024)"),
    "flexlora": Registered(FlexLora, paper="FlexLoRA (Bai et al., NeurIPS 2024)"),
    "hlora": Registered(HLora, paper="HLoRA (heterogeneous ranks, rank-aware aggregation)"),
    "fedra": Registered(FedRA, paper="FedRA (Su et al., ECCV 2024)"),
    "fedadapter": Registered(FedAdapter, paper="FedAdapter (Cai et al., MobiCom 2023)"),
    "ffa-lora": Registered(FfaLora, paper="FFA-LoRA (Sun et al., ICLR 2024)"),
    "fedex-lora": Registered(FedExLora, paper="FedEx-LoRA (Singhal et al., ACL 2025)"),
    "flora": Registered(FLora, paper="FLoRA (Wang et al., NeurIPS 2024)"),
    "hierfedlora": Registered(HierFedLora, paper="HierFedLoRA (Liu et al., arXiv 2503.21213)"),
}


def check_method(name: str) -> str:
    """The one check of a method name: registered, or a MethodNameError (a UserError and a ValueError,
    so the config's pydantic validator reports it on method.name) listing those that are."""
    if name not in METHODS:
        raise MethodNameError(f"unknown method {name!r}; registered methods: {', '.join(sorted(METHODS))}")
    return name


def method_list() -> str:
    """The registered methods in words, for help texts (legend first, shared sections named)."""
    names = ["legend"] + sorted(set(METHODS) - {"legend"})
    shared = [n for n in names if METHODS[n].section != n and not n.startswith(METHODS[n].section)]
    return ", ".join(names) + "".join(f"; {n} uses [method.{METHODS[n].section}]" for n in shared)


def make_method(name: str, ctx: MethodContext, sections: dict[str, dict]) -> Method:
    """Build a registered method from the config's method sections ({section: params})."""
    reg = METHODS[check_method(name)]
    method = reg.factory(ctx, **{**sections.get(reg.section, {}), **reg.preset})
    if method.info.name != name:   # a preset of another method (the LEGEND ablations)
        method.info = replace(method.info, name=name)
    return method


__all__ = ["METHODS", "check_method", "make_method", "method_list", "Method", "MethodContext", "MethodInfo",
           "LoraPlan", "Assignment", "Skip", "Aggregated", "RoundView", "DeviceUpdate", "Estimate", "Estimator",
           "StatusReport"]
