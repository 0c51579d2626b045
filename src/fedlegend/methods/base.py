"""The method contract, in the spirit of Flower's strategy: `configure` and `aggregate`.

A method says what each device gets this round (`configure`) and how the devices' replies
become the new global adapter (`aggregate`); its static facts are one `MethodInfo`. It is
pure logic over tensors and estimates: no I/O, no engine knowledge, so the same object runs
under the local loop and under Flower. The pure aggregation rules it composes live in
methods/aggregation.py.

    configure(view, global_state) -> {device: Assignment | Skip}
    aggregate(round, global_state, updates) -> Aggregated(state, round_time_s=None, waiting_s=None)
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from ..spec import AdapterState, ModelSpec, Ranks, key_layer, state_bytes
from .aggregation import DeviceUpdate


# ---------------------------------------------------------------- what a method says
@dataclass(frozen=True)
class MethodInfo:
    """Static facts of a method: its name, the [method.SECTION] its knobs come from, the adapter
    host its devices train (hosts.HOSTS), the server's moving-average weight rho (eq. 8-9), and
    whether its global adapter carries a dense residual per module (folded into the frozen
    weights: FLoRA, FedEx-LoRA)."""
    name: str
    section: str
    host: str = "lora"
    rho: float = 0.8
    residual: bool = False


@dataclass(frozen=True)
class LoraPlan:
    """What one device trains in one round: layer -> rank (or adapter width). `frozen` names the
    tensor kinds it receives but does not train (FFA-LoRA: "lora_A"; FLoRA, FedEx-LoRA: "residual")."""
    device: int
    ranks: Ranks
    frozen: tuple[str, ...] = ()

    @property
    def depth(self) -> int:
        return len(self.ranks)

    @property
    def layers(self) -> list[int]:
        return sorted(self.ranks)


@dataclass(frozen=True)
class Assignment:
    """What the server sends one device: its plan, the tensors it starts from, and the bytes that
    go on the wire for them (FLoRA's stacks are smaller than the dense residuals they rebuild)."""
    plan: LoraPlan
    payload: AdapterState
    download_bytes: int

    @property
    def device(self) -> int:
        return self.plan.device


@dataclass(frozen=True)
class Skip:
    """A device that sits this round out, and why (recorded as a 'skipped' event)."""
    reason: str


@dataclass(frozen=True)
class Aggregated:
    """The new global adapter; a method with its own clock (HierFedLoRA's parallel groups) also
    says how long the round lasted and how long each device waited (default: the slowest device's
    time, and each device's gap to it)."""
    state: AdapterState
    round_time_s: float | None = None
    waiting_s: dict[int, float] | None = None


# ---------------------------------------------------------------- what a method is told
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
class RoundView:
    """What the server knows when it configures a round: the fleet's device ids, its estimates of
    them (eq. 8-9; none before a device's first report) and their budgets (C_i, B_i of eq. 14-15)."""
    round: int
    devices: list[int]
    estimates: dict[int, Estimate] = field(default_factory=dict)
    budgets: dict[int, tuple[float, float]] = field(default_factory=dict)

    def budget(self, device: int) -> tuple[float, float]:
        return self.budgets.get(device, (float("inf"), float("inf")))


@dataclass(frozen=True)
class MethodContext:
    """Facts of the experiment a method may plan with (no data, no engine)."""
    spec: ModelSpec
    num_devices: int
    local_steps: tuple[int, ...]   # optimizer steps of each device per round (its epoch when train.local_steps = 0)
    batch_size: int
    nominal_width: int   # typical padded sequence length, for FLOP budgets
    nominal_outputs: int | None = None   # typical output-layer positions per sequence (None: devices.output_flops')
    seed: int = 0        # for methods that draw at random (FedRA, FLoRA, FedAdapter)
    alpha_over_rank: float = 2.0  # LoRA scaling alpha/r: B·A enters the weight as (alpha/r)·B·A
    label_counts: tuple[tuple[int, ...], ...] = ()  # per device, for methods that group by data (HierFedLoRA)

    def steps_of(self, device: int) -> int:
        return self.local_steps[device]


# ---------------------------------------------------------------- validation of replies
class UpdateRejected(ValueError):
    """A device update that must not reach the global adapter."""


# The tensor kinds whose size along one axis is the layer's rank (LoRA) or width (bottleneck adapter):
# key suffix -> that axis. A LoRA A is (r, d_in), B is (d_out, r); an adapter's down (w, d) + (w,), up (d, w).
RANK_AXES = {"lora_A": 0, "lora_B": 1, "adapter.down.weight": 0, "adapter.down.bias": 0, "adapter.up.weight": 1}


def rank_axis(key: str) -> int | None:
    """The axis of a canonical key's tensor that carries its layer's rank (or width); None if none does."""
    return next((axis for suffix, axis in RANK_AXES.items() if key.endswith("." + suffix)), None)


def max_update_bytes(sent: AdapterState) -> int:
    """The most bytes a device may send back: exactly the tensors it was assigned to train (keys and
    shapes fixed by its plan, at the dtype it was sent)."""
    return state_bytes(sent)


def check_update(update: AdapterState, sent: AdapterState, plan: LoraPlan | None = None) -> None:
    """Reject, with the reason, an update that must not reach the global adapter.

    `sent` is what the device was assigned to train and send back (`trained_part(payload, plan)`).
    In this order, an update is rejected when it
      - is not a dict of named tensors (dense, strided torch tensors);
      - sends back a tensor its plan freezes (plan.frozen: FFA-LoRA's lora_A, a residual), a tensor
        of a layer its plan does not assign (not in plan.ranks), an unknown key, or misses a key;
      - is oversized: more bytes than max_update_bytes(sent) (a larger tensor or dtype), checked
        before any value is read;
      - has a tensor whose dtype is not the one sent, whose rank axis (the rank rule, explicit:
        RANK_AXES, LoRA A rows, B columns, adapter widths) is not plan.ranks[layer], or whose shape
        is not the one sent;
      - holds NaN or Inf.
    Without a plan only the keys, dtypes, shapes, size and values are checked against `sent`.
    """
    if not isinstance(update, dict):
        raise UpdateRejected(f"not a dict of tensors but a {type(update).__name__}")
    for k, t in update.items():
        if not isinstance(k, str):
            raise UpdateRejected(f"key {k!r} is a {type(k).__name__}, not a tensor name")
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.is_quantized:
            raise UpdateRejected(f"{k}: a {type(t).__name__ if not isinstance(t, torch.Tensor) else t.layout}, "
                                 "not a dense tensor")
    if plan is not None:
        frozen = sorted(k for k in update if any(k.endswith("." + part) for part in plan.frozen))
        if frozen:
            raise UpdateRejected(f"sends back tensors its plan freezes ({', '.join(plan.frozen)}): {frozen[:3]}")
        unassigned = sorted(k for k in update if k not in sent and (l := _layer_of(k)) is not None
                            and l not in plan.ranks)
        if unassigned:
            raise UpdateRejected(f"tensors of layers its plan does not assign (plan: {plan.layers}): {unassigned[:3]}")
    if set(update) != set(sent):
        extra, missing = sorted(set(update) - set(sent)), sorted(set(sent) - set(update))
        raise UpdateRejected(f"keys differ from the assigned adapter (unexpected {extra[:3]}, missing {missing[:3]})")
    size, limit = state_bytes(update), max_update_bytes(sent)   # before any value is read
    if size > limit:
        big = next((k for k, t in update.items() if t.numel() * t.element_size() > sent[k].numel()
                    * sent[k].element_size()), None)
        why = (f" ({big}: shape {tuple(update[big].shape)} {update[big].dtype}, but {tuple(sent[big].shape)} "
               f"{sent[big].dtype} was assigned)") if big else ""
        raise UpdateRejected(f"oversized: {size} bytes, but its plan allows at most {limit}{why}")
    for k, t in update.items():
        if t.dtype != sent[k].dtype:
            raise UpdateRejected(f"{k}: dtype {t.dtype} but {sent[k].dtype} was sent")
        if plan is not None and (axis := rank_axis(k)) is not None:   # the rank rule, before the shape
            layer = _layer_of(k)
            want = plan.ranks.get(layer) if layer is not None else None
            if want is None or t.dim() <= axis or t.shape[axis] != want:
                raise UpdateRejected(f"{k}: rank {tuple(t.shape)[axis] if t.dim() > axis else None} along axis "
                                     f"{axis}, but its plan assigns layer {layer} rank {want}")
        if tuple(t.shape) != tuple(sent[k].shape):
            raise UpdateRejected(f"{k}: shape {tuple(t.shape)} but {tuple(sent[k].shape)} was assigned")
        if not torch.isfinite(t).all():
            raise UpdateRejected(f"{k}: holds NaN or Inf")


def _layer_of(key: str) -> int | None:
    """The transformer layer of a canonical key, None for a head key or a key that names no layer number."""
    try:
        return key_layer(key)
    except (ValueError, IndexError):
        return None   # "layers.<not a number>...": an unknown key, rejected as such


def trained_part(payload: AdapterState, plan: LoraPlan) -> AdapterState:
    """The tensors of a payload the device trains and sends back (not those the plan freezes)."""
    frozen = tuple("." + part for part in plan.frozen)
    return {k: v for k, v in payload.items() if not (frozen and k.endswith(frozen))}


# ---------------------------------------------------------------- the contract
class Method(ABC):
    """A federated fine-tuning method. Subclasses set `info` and implement the two calls."""

    info: MethodInfo

    def __init__(self, ctx: MethodContext):
        self.ctx = ctx

    @property
    def L(self) -> int:
        return self.ctx.spec.num_layers

    @abstractmethod
    def global_ranks(self) -> Ranks:
        """Rank (or width) of each layer in the global adapter."""

    @abstractmethod
    def configure(self, view: RoundView, global_state: AdapterState) -> dict[int, Assignment | Skip]:
        """What every device of the fleet gets this round: an Assignment, or a Skip with its reason."""

    @abstractmethod
    def aggregate(self, round_: int, global_state: AdapterState, updates: list[DeviceUpdate]) -> Aggregated:
        """The new global adapter from this round's accepted updates (possibly none: every device
        failed), with the round's time and waiting if the method keeps its own clock."""

    def state_dict(self) -> dict:
        """The server-side state the method carries from round to round (for a checkpoint): a copy
        of every attribute but the immutable context and info. A method holding something a deep
        copy cannot capture overrides this and load_state_dict."""
        return copy.deepcopy({k: v for k, v in vars(self).items() if k not in ("ctx", "info")})

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict returned, so the next round plans as the uninterrupted run would."""
        vars(self).update(copy.deepcopy(state))


def assignment(plan: LoraPlan, payload: AdapterState) -> Assignment:
    """An Assignment whose wire size is its payload's (every method but FLoRA)."""
    return Assignment(plan, payload, state_bytes(payload))
