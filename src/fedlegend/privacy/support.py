"""Which methods differential privacy covers, and how each weights a device in each tensor.

DP needs the released aggregate to be a sum of bounded per-device contributions with weights
that do not depend on the updates' values (docs/privacy.md). Two shapes of rule qualify:

- "linear": each tensor a weighted average of the (clipped) updates of the devices that
  trained it (LEGEND's eq. 17, FedLoRA, FFA-LoRA, FedRA; HetLoRA's zero-padded average when
  weighted by samples: a padded row adds zeros, the weights are per tensor);
- "product": each LoRA module's sum of weighted products B_i A_i, refactored by SVD
  (FlexLoRA, HLoRA); the noise goes on the dense sum, before the SVD.

Every other method is refused with the reason. A method registered later is refused until
it is added here (DP by default would be a silent false claim).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..methods.aggregation import DeviceUpdate, lora_pairs, rank_of


@dataclass(frozen=True)
class Rule:
    """How the method's aggregate is a sum: `kind` "linear" or "product"; `weight(method, update,
    prefix)` is the device's raw weight in a LoRA module (normalised over the module's holders),
    `head_weight` its weight in the head and any other tensor."""
    kind: str
    weight: Callable[[object, DeviceUpdate], float]
    head_weight: Callable[[object, DeviceUpdate], float]


def _samples(method, u: DeviceUpdate) -> float:
    return float(u.samples)


def _own_weighting(method, u: DeviceUpdate) -> float:
    """The method's `weighting` knob: 'mean' (eq. 17 as printed) or 'samples'."""
    return float(u.samples) if getattr(method, "weighting", "samples") == "samples" else 1.0


def _samples_times_rank(method, u: DeviceUpdate) -> float:
    """HLoRA's n_i * r_i (its rank: the largest of its modules, as hlora.aggregate takes it)."""
    return float(u.samples) * max((rank_of(u.state, p) for p in lora_pairs(u.state)), default=1)


_LAYERWISE = Rule("linear", _own_weighting, _own_weighting)
RULES: dict[str, Rule] = {
    "legend": _LAYERWISE, "legend-wo-ld": _LAYERWISE, "legend-wo-rd": _LAYERWISE,
    "fedlora": _LAYERWISE, "ffa-lora": _LAYERWISE,
    "fedra": Rule("linear", _samples, _samples),
    "hetlora": Rule("linear", _samples, _samples),     # weighting = "samples" only (refusal below)
    "flexlora": Rule("product", _samples, _samples),
    "hlora": Rule("product", _samples_times_rank, _samples),
}

REFUSED: dict[str, str] = {
    "fedex-lora": "its residual sum_k w_k B_k A_k - (sum_k w_k B_k)(sum_k w_k A_k) multiplies different devices' "
                  "factors together, so it is not a sum of per-device contributions",
    "flora": "it sends every device's factors, stacked side by side, to every device: each update is released "
             "as it is, not summed",
    "fedadapter": "its progressive search picks the next adapter configuration from the devices' training losses "
                  "(a data-dependent choice outside the noisy sum)",
    "hierfedlora": "its intra-group aggregates go back to the group's devices every tick without noise (releases "
                   "the noisy global sum does not cover)",
}


def refusal(method: str, params: dict) -> str | None:
    """Why DP cannot cover this method with these parameters (None: it can). `params` are the
    method's [method.SECTION] values."""
    if method in REFUSED:
        return f"method {method!r} cannot run with differential privacy: {REFUSED[method]}"
    if method not in RULES:
        return (f"method {method!r} declares no differential-privacy rule (fedlegend/privacy/support.py); "
                f"methods whose aggregation is a sum: {', '.join(sorted(RULES))}")
    if method == "hetlora" and params.get("weighting", "norm") != "samples":
        return ("method 'hetlora' with weighting = 'norm' weights each device by the norm of its own update "
                "(data-dependent weights, not a fixed-weight sum): set method.hetlora.weighting = 'samples'")
    if method == "hetlora" and params.get("self_pruning", False):
        return ("method 'hetlora' with self_pruning sets each device's next rank from its update's tail energy "
                "(a data-dependent release): set method.hetlora.self_pruning = false")
    return None


def max_share(updates: list[DeviceUpdate], key: str, weight: Callable[[DeviceUpdate], float]) -> float:
    """The largest normalised weight any device has in tensor `key` (0: nobody trained it); a
    zero total gives equal weights, as aggregation.normalized does."""
    ws = [weight(u) for u in updates if key in u.state]
    if not ws:
        return 0.0
    total = sum(ws)
    return max(ws) / total if total > 0 else 1.0 / len(ws)
