"""The [method] section of the config and each method's own [method.NAME] knobs (config.py holds
the rest; split off so each file stays readable). Every section forbids unknown keys."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .methods import check_method, method_list


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LegendConfig(Section):
    rank_budget: int = Field(48, ge=1, description="psi: total rank over all layers (eq. 11)")
    rank_step: int = Field(1, ge=0, description="lambda: rank increase per layer toward the output")
    rho: float = Field(0.8, ge=0, le=1, description="moving-average weight of the old estimate (eq. 8-9)")
    epsilon_s: float | None = Field(None, gt=0, description="waiting threshold on W (eq. 13); null disables")
    min_depth: int = Field(1, ge=1)
    fill_idle: bool = Field(True, description="greedy: deepen a device while its time stays under the round time")
    weighting: Literal["mean", "samples"] = Field("mean", description="eq. 17 plain mean (paper) or sample-weighted")
    uniform_ranks: bool = Field(False, description="ablation w/o RD: same rank on every layer")
    full_depth: bool = Field(False, description="ablation w/o LD: every device at depth L")


class FedLoraConfig(Section):
    rank: int = Field(8, ge=1, description="the same rank on every layer of every device")
    weighting: Literal["mean", "samples"] = "samples"


class HetLoraConfig(Section):
    rank_min: int = Field(2, ge=1, description="rank of the slowest devices")
    rank_max: int = Field(16, ge=1, description="rank of the fastest device (and of the global adapter)")
    weighting: Literal["norm", "samples"] = Field("norm", description="norm: the paper's sparsity-weighted average")
    self_pruning: bool = False
    prune_threshold: float = Field(0.05, ge=0, lt=1, description="prune when the last ranks carry less than this share")
    prune_step: int = Field(1, ge=1)


class RankRangeConfig(Section):
    rank_min: int = Field(2, ge=1)
    rank_max: int = Field(16, ge=1)


class FedRAConfig(Section):
    rank: int = Field(8, ge=1)
    min_layers: int = Field(1, ge=1, description="layers of the slowest device")


class HierFedLoraConfig(Section):
    groups: int = Field(3, ge=1, description="near-IID device groups (each with its own depth and frequency)")
    rank: int = Field(8, ge=1, description="LoRA rank of every trained layer")
    max_frequency: int = Field(4, ge=1, description="most intra-group aggregations of a group per global round")
    min_depth: int = Field(1, ge=1, description="depth of the slowest group")


class FedAdapterConfig(Section):
    init_depth: int = Field(2, ge=1, description="adapter depth (top layers) at the start of the progressive search")
    init_width: int = Field(8, ge=1, description="adapter bottleneck width at the start")
    depth_step: int = Field(2, ge=1, description="the deeper trial configuration: depth + this")
    width_factor: int = Field(2, ge=2, description="the wider trial configuration: width * this")
    max_width: int = Field(64, ge=1, description="widest adapter (and the global adapter's width)")
    trial_rounds: int = Field(3, ge=2, description="rounds per trial period; the server upgrades at its end")
    search: bool = Field(True, description="false: train (init_depth, init_width) throughout, no trials")
    weighting: Literal["mean", "samples"] = "samples"


class MethodConfig(Section):
    name: str = Field("legend", description="registered method: " + method_list())
    legend: LegendConfig = Field(default_factory=LegendConfig)
    fedlora: FedLoraConfig = Field(default_factory=FedLoraConfig)
    hetlora: HetLoraConfig = Field(default_factory=HetLoraConfig)
    flexlora: RankRangeConfig = Field(default_factory=RankRangeConfig)
    hlora: RankRangeConfig = Field(default_factory=RankRangeConfig)
    flora: RankRangeConfig = Field(default_factory=RankRangeConfig)
    hierfedlora: HierFedLoraConfig = Field(default_factory=HierFedLoraConfig)
    fedra: FedRAConfig = Field(default_factory=FedRAConfig)
    fedadapter: FedAdapterConfig = Field(default_factory=FedAdapterConfig)

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        return check_method(name)
