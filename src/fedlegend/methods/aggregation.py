"""The pure aggregation rules every method composes: small functions over adapter states.

No method state, no engine: each rule takes the global adapter and the devices' updates and
returns a new adapter (or a tensor). Orientation (peft, nn.Linear): A is (r, d_in), B is
(d_out, r), the update is B @ A (d_out x d_in). With alpha = c * r the scaling alpha / r = c
is the same at every rank, so products of different ranks add up without rescaling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from ..spec import RESIDUAL, AdapterState, key_layer


@dataclass(frozen=True)
class DeviceUpdate:
    """A device's trained tensors for its plan, and what it reported with them."""
    device: int
    state: AdapterState
    samples: int
    loss: float = float("nan")   # mean training loss of its local steps
    time_s: float = 0.0          # its virtual time this round


# ---------------------------------------------------------------- weights
def normalized(weights: list[float]) -> list[float]:
    """Weights summing to 1; a zero or negative total (nobody trained anything) gives equal weights."""
    total = float(sum(weights))
    if total <= 0:
        return [1.0 / len(weights)] * len(weights)
    return [float(w) / total for w in weights]


def device_weight(update: DeviceUpdate, weighting: str) -> float:
    """'mean': every device counts once (eq. 17 as printed); 'samples': by its sample count (FedAvg)."""
    if weighting == "samples":
        return float(update.samples)
    if weighting == "mean":
        return 1.0
    raise ValueError(f"weighting must be 'mean' or 'samples', got {weighting!r}")


def holders(updates: Iterable[DeviceUpdate], key: str) -> list[DeviceUpdate]:
    """The updates that trained tensor `key`."""
    return [u for u in updates if key in u.state]


def weighted_sum(tensors: Iterable[torch.Tensor], weights: Iterable[float]) -> torch.Tensor:
    return sum(w * t for w, t in zip(weights, tensors))


# ---------------------------------------------------------------- layer-wise rules
def layerwise_average(global_state: AdapterState, updates: list[DeviceUpdate],
                      weighting: str = "mean") -> AdapterState:
    """Eq. 17: each tensor averaged over the devices that trained it; untouched tensors keep
    their global value."""
    new = dict(global_state)
    for key in global_state:
        hs = holders(updates, key)
        if hs:
            new[key] = weighted_sum((u.state[key] for u in hs), normalized([device_weight(u, weighting) for u in hs]))
    return new


def select_layers(global_state: AdapterState, layers: Iterable[int]) -> AdapterState:
    """Eq. 19: the global tensors of the given layers, plus the task head."""
    keep = set(layers)
    return {k: v for k, v in global_state.items() if key_layer(k) is None or key_layer(k) in keep}


def heads(state: AdapterState) -> AdapterState:
    return {k: v for k, v in state.items() if k.startswith("head.")}


def average_heads(global_state: AdapterState, updates: list[DeviceUpdate]) -> AdapterState:
    """Sample-weighted average of the task head's tensors (every device trains the head)."""
    return {k: v for k, v in layerwise_average(heads(global_state), updates, "samples").items()
            if holders(updates, k)}


# ---------------------------------------------------------------- element-wise (bottleneck widths)
def pad_to(t: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(t zero-padded into the leading corner of `shape`, the 0/1 mask of where t lies)."""
    if tuple(t.shape) == tuple(shape):
        return t, torch.ones_like(t)
    out = torch.zeros(shape, dtype=t.dtype)
    mask = torch.zeros(shape, dtype=t.dtype)
    idx = tuple(slice(0, n) for n in t.shape)
    out[idx] = t
    mask[idx] = 1.0
    return out, mask


def elementwise_average(global_state: AdapterState, updates: list[DeviceUpdate],
                        weighting: str = "samples") -> AdapterState:
    """Each element averaged over the devices that trained it (their slices zero-padded into the
    global shape); untouched elements keep their value."""
    new = dict(global_state)
    for key, g in global_state.items():
        hs = holders(updates, key)
        if not hs:
            continue
        num = torch.zeros_like(g)
        den = torch.zeros_like(g)
        for u in hs:
            w = device_weight(u, weighting)
            t, m = pad_to(u.state[key].to(g.dtype), tuple(g.shape))
            num += w * t
            den += w * m
        new[key] = torch.where(den > 0, num / den.clamp(min=1e-12), g)
    return new


# ---------------------------------------------------------------- low-rank factors
def lora_pairs(state: AdapterState) -> list[str]:
    """Prefixes 'layers.{l}.{module}' of the LoRA pairs in a state."""
    return sorted(k[: -len(".lora_A")] for k in state if k.endswith(".lora_A"))


def rank_of(state: AdapterState, prefix: str) -> int:
    return int(state[prefix + ".lora_A"].shape[0])


def factors(update: DeviceUpdate, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of one LoRA module of an update."""
    return update.state[prefix + ".lora_A"], update.state[prefix + ".lora_B"]


def zero_pad(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad A with zero rows and B with zero columns up to `rank`; B @ A is unchanged."""
    r = a.shape[0]
    if r > rank:
        raise ValueError(f"cannot pad rank {r} down to {rank}")
    a_p = torch.cat([a, a.new_zeros(rank - r, a.shape[1])], 0)
    b_p = torch.cat([b, b.new_zeros(b.shape[0], rank - r)], 1)
    return a_p, b_p


def truncate(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `rank` components: rows of A, columns of B."""
    return a[:rank].clone(), b[:, :rank].clone()


def truncated_assignment(global_state: AdapterState, ranks: dict[int, int]) -> AdapterState:
    """The head plus every LoRA pair of the plan's layers truncated to the layer's rank (HetLoRA's
    assignment; for SVD-ordered factors the best rank-r approximation, Eckart-Young)."""
    out = heads(global_state)
    for prefix in lora_pairs(global_state):
        layer = key_layer(prefix)
        if layer in ranks:
            out[prefix + ".lora_A"], out[prefix + ".lora_B"] = truncate(
                global_state[prefix + ".lora_A"], global_state[prefix + ".lora_B"], ranks[layer])
    return out


def svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r factorisation of delta (Eckart-Young): A = sqrt(S) Vh, B = U sqrt(S).

    The square root is split evenly so A and B have the same scale (neither factor starts
    near zero for the next round of local training). Components come in decreasing order
    of singular value, so truncate(A, B, r') is the best rank-r' approximation too.
    """
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, s.shape[0])
    root = s[:k].sqrt()
    a = root[:, None] * vh[:k]
    b = u[:, :k] * root[None, :]
    if k < rank:  # delta has lower rank than asked: pad with zero components
        a, b = zero_pad(a, b, rank)
    return a, b


def zero_pad_average(global_state: AdapterState, updates: list[DeviceUpdate],
                     weight_of) -> AdapterState:
    """HetLoRA: every holder's A and B zero-padded to the global rank and averaged with weights
    weight_of(update, prefix); modules nobody trained keep their value; heads by samples."""
    new = dict(global_state)
    for prefix in lora_pairs(global_state):
        hs = holders(updates, prefix + ".lora_A")
        if not hs:
            continue
        w = normalized([weight_of(u, prefix) for u in hs])
        padded = [zero_pad(*factors(u, prefix), rank_of(global_state, prefix)) for u in hs]
        new[prefix + ".lora_A"] = weighted_sum((a for a, _ in padded), w)
        new[prefix + ".lora_B"] = weighted_sum((b for _, b in padded), w)
    new.update(average_heads(global_state, updates))
    return new


def product_average_svd(global_state: AdapterState, updates: list[DeviceUpdate],
                        weights: list[float]) -> AdapterState:
    """FlexLoRA / HLoRA: sum_i w_i B_i A_i per LoRA module (never the padded factors),
    refactored at the global rank by SVD; heads by samples."""
    new = dict(global_state)
    for prefix in lora_pairs(global_state):
        pairs = [(w, u) for w, u in zip(weights, updates) if prefix + ".lora_A" in u.state]
        if not pairs:
            continue
        ws = normalized([w for w, _ in pairs])
        delta = weighted_sum((factors(u, prefix)[1] @ factors(u, prefix)[0] for _, u in pairs), ws)
        new[prefix + ".lora_A"], new[prefix + ".lora_B"] = svd_factors(delta, rank_of(global_state, prefix))
    new.update(average_heads(global_state, updates))
    return new


def stack_lora(pairs: list[tuple[torch.Tensor, torch.Tensor]], weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """FLoRA's stacking: A_s = [A_1; ...; A_K] (sum r_k, d_in), B_s = [w_1 B_1, ..., w_K B_K]
    (d_out, sum r_k), so B_s @ A_s = sum_k w_k B_k A_k for any ranks r_k."""
    a = torch.cat([a for a, _ in pairs], 0)
    b = torch.cat([w * b for w, (_, b) in zip(weights, pairs)], 1)
    return a, b


def exact_residual(pairs: list[tuple[torch.Tensor, torch.Tensor]], weights: list[float]) -> torch.Tensor:
    """FedEx-LoRA: sum_k w_k B_k A_k - (sum_k w_k B_k)(sum_k w_k A_k), the error of averaging
    factors apart."""
    a_avg = weighted_sum((a for a, _ in pairs), weights)
    b_avg = weighted_sum((b for _, b in pairs), weights)
    return weighted_sum((b @ a for a, b in pairs), weights) - b_avg @ a_avg


# ---------------------------------------------------------------- residuals folded into the frozen weights
def with_zero_residuals(state: AdapterState) -> AdapterState:
    """Add a zero residual (d_out, d_in) beside every LoRA pair that has none yet."""
    out = dict(state)
    for prefix in lora_pairs(state):
        key = prefix + "." + RESIDUAL
        if key not in out:
            a, b = state[prefix + ".lora_A"], state[prefix + ".lora_B"]
            out[key] = a.new_zeros(b.shape[0], a.shape[1])
    return out


def residuals(state: AdapterState) -> AdapterState:
    """Every residual of a state (the frozen model a device runs)."""
    return {k: v for k, v in state.items() if k.endswith("." + RESIDUAL)}
