"""Shared low-rank math for heterogeneous-rank methods (HetLoRA, FlexLoRA, HLoRA).

Orientation (peft, nn.Linear): A is (r, d_in), B is (d_out, r), the update is B @ A with
shape (d_out, d_in). With alpha = c * r the scaling alpha / r = c is the same at every
rank, so products of different ranks add up without rescaling.
"""

from __future__ import annotations

import torch

from ..lora import AdapterState
from .base import DeviceUpdate, Estimate


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


def lora_pairs(state: AdapterState) -> list[str]:
    """Prefixes 'layers.{l}.{module}' of the LoRA pairs in a state."""
    return sorted(k[: -len(".lora_A")] for k in state if k.endswith(".lora_A"))


def rank_of(state: AdapterState, prefix: str) -> int:
    return int(state[prefix + ".lora_A"].shape[0])


def normalized(weights: list[float]) -> list[float]:
    total = float(sum(weights))
    if total <= 0:
        return [1.0 / len(weights)] * len(weights)
    return [w / total for w in weights]


def average_heads(global_state: AdapterState, updates: list[DeviceUpdate], weights: list[float]) -> AdapterState:
    """Weighted average of the task head's tensors (every device trains the head)."""
    out = {}
    for key in global_state:
        if key.startswith("head."):
            holders = [(w, u) for w, u in zip(weights, updates) if key in u.state]
            if holders:
                ws = normalized([w for w, _ in holders])
                out[key] = sum(w * u.state[key] for w, (_, u) in zip(ws, holders))
    return out


def rank_by_capacity(devices: list[int], estimates: dict[int, Estimate], num_layers: int,
                     r_min: int, r_max: int, share: dict[int, float] | None = None) -> dict[int, int]:
    """A LoRA rank per device from its estimated speed: the fastest gets r_max, a device k
    times slower about r_max / k (never below r_min). Devices not yet estimated get r_max
    (their first round profiles them). `share` optionally scales the rank by a second
    factor in (0, 1] (HLoRA: the device's data volume relative to the largest)."""
    times = {i: estimates[i].fixed_s + num_layers * estimates[i].mu + num_layers * r_max * estimates[i].beta
             for i in devices if i in estimates}
    t_min = min(times.values()) if times else 1.0
    ranks = {}
    for i in devices:
        frac = t_min / times[i] if i in times and times[i] > 0 else 1.0
        if share is not None:
            frac *= share.get(i, 1.0)
        ranks[i] = int(max(r_min, min(r_max, round(r_max * frac))))
    return ranks
