"""The method contract: plan -> assign -> (local training) -> aggregate, plus shared math.

A method is pure logic over tensors and estimates: no I/O, no engine knowledge, so the
same object runs under the local loop and under Flower.
"""

from __future__ import annotations


import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from ..lora import AdapterState, ModelSpec, Ranks, key_layer, state_bytes


@dataclass(frozen=True)
class LoraPlan:
    """What one device trains in one round: layer -> rank, plus method-specific extras."""
    device: int
    ranks: Ranks
    extras: dict = field(default_factory=dict, hash=False)

    @property
    def depth(self) -> int:
        return len(self.ranks)

    @property
    def layers(self) -> list[int]:
        return sorted(self.ranks)


@dataclass(frozen=True)
class StatusReport:
    """What a device measured in a round (section 4.3)."""
    device: int
    fixed_s: float              # t-hat: forward over the whole model plus download
    backward_per_layer_s: float  # mu-hat: backward time per trained layer
    upload_per_rank_s: float     # beta-hat: upload time of one layer's LoRA per unit rank
    samples: int


@dataclass
class Estimate:
    """The server's moving-average view of one device (eq. 8-9)."""
    fixed_s: float
    mu: float
    beta: float


def moving_average(old: float, new: float, rho: float) -> float:
    """Eq. 8 / 9: x^h = rho * x^{h-1} + (1 - rho) * x-hat^h."""
    return rho * old + (1.0 - rho) * new


class Estimator:
    """Per-device capacity estimates; the first report of a device initialises its estimate."""

    def __init__(self, rho: float = 0.8):
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"rho must be within [0, 1], got {rho}")
        self.rho = rho
        self.estimates: dict[int, Estimate] = {}

    def observe(self, report: StatusReport) -> Estimate:
        old = self.estimates.get(report.device)
        if old is None:
            est = Estimate(report.fixed_s, report.backward_per_layer_s, report.upload_per_rank_s)
        else:
            est = Estimate(moving_average(old.fixed_s, report.fixed_s, self.rho),
                           moving_average(old.mu, report.backward_per_layer_s, self.rho),
                           moving_average(old.beta, report.upload_per_rank_s, self.rho))
        self.estimates[report.device] = est
        return est


@dataclass(frozen=True)
class DeviceUpdate:
    """A device's trained tensors for its plan, and how many samples it trained on."""
    device: int
    state: AdapterState
    samples: int


@dataclass(frozen=True)
class MethodContext:
    """Facts of the experiment a method may plan with (no data, no engine)."""
    spec: ModelSpec
    num_devices: int
    local_steps: int
    batch_size: int
    nominal_width: int   # typical padded sequence length, for FLOP budgets
    seed: int = 0        # for methods that draw at random (FedRA)
    alpha_over_rank: float = 2.0  # LoRA scaling alpha/r: B·A enters the weight as (alpha/r)·B·A
    label_counts: tuple[tuple[int, ...], ...] = ()  # per device, for methods that group by data (HierFedLoRA)


class UpdateRejected(ValueError):
    """A device update that must not reach the global adapter."""


def check_update(update: AdapterState, sent: AdapterState) -> None:
    """Reject an update whose keys or shapes differ from what was sent, or that holds NaN/Inf."""
    if set(update) != set(sent):
        extra, missing = sorted(set(update) - set(sent)), sorted(set(sent) - set(update))
        raise UpdateRejected(f"keys differ from the assigned adapter (unexpected {extra[:3]}, missing {missing[:3]})")
    for k, t in update.items():
        if tuple(t.shape) != tuple(sent[k].shape):
            raise UpdateRejected(f"{k}: shape {tuple(t.shape)} but {tuple(sent[k].shape)} was assigned")
        if not torch.isfinite(t).all():
            raise UpdateRejected(f"{k}: holds NaN or Inf")


def trained_part(payload: AdapterState, plan: LoraPlan) -> AdapterState:
    """The tensors of a payload the device trains and sends back (not those the plan freezes)."""
    frozen = tuple("." + part for part in plan.extras.get("frozen", ()))
    return {k: v for k, v in payload.items() if not (frozen and k.endswith(frozen))}


def layerwise_average(global_state: AdapterState, updates: list[DeviceUpdate],
                      weighting: str = "mean") -> AdapterState:
    """Eq. 17: each tensor averaged over the devices that trained it; untouched tensors keep
    their global value. weighting='samples' weights each device by its sample count (FedAvg)."""
    if weighting not in ("mean", "samples"):
        raise ValueError(f"weighting must be 'mean' or 'samples', got {weighting!r}")
    new = dict(global_state)
    for key in global_state:
        holders = [u for u in updates if key in u.state]
        if not holders:
            continue
        w = torch.tensor([float(u.samples) if weighting == "samples" else 1.0 for u in holders])
        w = w / w.sum()
        new[key] = sum(wi * u.state[key] for wi, u in zip(w, holders))
    return new


def select_layers(global_state: AdapterState, layers: set[int] | list[int]) -> AdapterState:
    """Eq. 19: the global tensors of the given layers, plus the task head."""
    keep = set(layers)
    return {k: v for k, v in global_state.items() if key_layer(k) is None or key_layer(k) in keep}


class Method(ABC):
    """A federated fine-tuning method. Subclasses set `name` and implement the three steps."""

    name: str = ""
    rho: float = 0.8  # moving-average weight the server's Estimator uses for this method (eq. 8-9)
    host_kind: str = "lora"  # which module a device trains: "lora" (peft LoRA) or "bottleneck" (FedAdapter)

    def __init__(self, ctx: MethodContext):
        self.ctx = ctx

    @property
    def L(self) -> int:
        return self.ctx.spec.num_layers

    @abstractmethod
    def global_ranks(self) -> Ranks:
        """Rank of each layer's LoRA in the global adapter."""

    @abstractmethod
    def plan(self, round_: int, devices: list[int], estimates: dict[int, Estimate],
             budgets: dict[int, tuple[float, float]]) -> dict[int, LoraPlan]:
        """The plan of every participating device for this round."""

    def assign(self, global_state: AdapterState, plan: LoraPlan) -> AdapterState:
        """What the device receives (default: eq. 19, the global tensors of its layers)."""
        return select_layers(global_state, plan.ranks)

    @abstractmethod
    def aggregate(self, global_state: AdapterState, updates: list[DeviceUpdate]) -> AdapterState:
        """The new global adapter from the accepted updates."""

    def init_state(self, state: AdapterState) -> AdapterState:
        """The initial global adapter from the host's fresh one (residual methods add zeros)."""
        return state

    def round_timing(self, times: dict[int, float]) -> tuple[float, dict[int, float]]:
        """(virtual duration of the round, waiting of each device) from the devices' times.
        Default: a synchronous round lasts as long as its slowest device; the rest wait for it."""
        t = max(times.values(), default=0.0)
        return t, {i: t - ti for i, ti in times.items()}

    def idle_reason(self, device: int) -> str:
        """Why the plan of this round has no entry for a device (recorded as a 'skipped' event)."""
        return "no feasible plan this round"

    def download_bytes(self, payload: AdapterState, plan: LoraPlan) -> int:
        """Bytes a device downloads for its payload. Default: every tensor of the payload; a
        method whose devices could rebuild part of it from less (FLoRA) says what goes on the wire."""
        return state_bytes(payload)

    def state_dict(self) -> dict:
        """The server-side state the method carries from round to round (for a checkpoint): a copy
        of every attribute but the immutable context. A method holding something a deep copy
        cannot capture overrides this and load_state_dict."""
        return copy.deepcopy({k: v for k, v in vars(self).items() if k != "ctx"})

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict returned, so the next round plans as the uninterrupted run would
        (attributes set lazily, e.g. by the first plan(), come back too)."""
        vars(self).update(copy.deepcopy(state))

    def observe_round(self, round_: int, rows: list[dict]) -> None:
        """What the server saw of the round's accepted devices (their record rows: id, loss, time_s,
        samples, ...), called just before aggregate. Default: nothing (FedAdapter's search uses it)."""
