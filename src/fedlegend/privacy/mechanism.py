"""The Gaussian mechanism over heterogeneous adapters: clip on the device, noise on each sum.

A device's update is everything it trained minus what it was sent (Delta_i = trained - payload),
as one vector over all its tensors, clipped to L2 norm C. The server's aggregate is then a sum
of per-device contributions; it adds N(0, (sigma * S_k)^2) to every element of every tensor k
it releases, where S_k is the largest contribution one device can make to k per unit of its
clipped update (docs/privacy.md derives S_k for each rule):

- linear rules: S_k = C * max_i w_ik (w_ik: device i's normalised weight in tensor k);
- product rules (sum of B_i A_i): S_m = C_prod * max_i w_im, C_prod = C * max(1, sqrt(2) K + C / 2),
  K the largest spectral norm of any payload factor (public: the payloads come from the released
  global adapter).

Either way one device moves the whole released vector by at most sigma standard deviations
(Mahalanobis norm <= 1 / sigma), so a round is ONE Gaussian mechanism of noise multiplier sigma,
however many layers it touches: no budget split across layers.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..methods.aggregation import DeviceUpdate, factors, lora_pairs, normalized, rank_of, svd_factors, weighted_sum
from ..spec import AdapterState
from .support import Rule, max_share


def update_norm(state: AdapterState, payload: AdapterState) -> float:
    """||trained - payload|| over every tensor the device trained, as one vector."""
    sq = sum(float((v.double() - payload[k].double()).pow(2).sum()) for k, v in state.items())
    return math.sqrt(sq)


def clip_update(state: AdapterState, payload: AdapterState, clip: float) -> AdapterState:
    """payload + Delta * min(1, C / ||Delta||): the device's whole update scaled into the C-ball."""
    norm = update_norm(state, payload)
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    if scale == 1.0:
        return dict(state)
    return {k: payload[k] + (v - payload[k]) * scale for k, v in state.items()}


def gaussian_like(t: torch.Tensor, std: float, gen: torch.Generator) -> torch.Tensor:
    """N(0, std^2) noise of t's shape and dtype, drawn in float64 from `gen` (reproducible)."""
    return (torch.randn(t.shape, generator=gen, dtype=torch.float64) * std).to(t.dtype)


def local_noise(state: AdapterState, std: float, gen: torch.Generator) -> AdapterState:
    """Local DP: the device adds N(0, std^2) to its (clipped) update before it leaves."""
    return {k: v + gaussian_like(v, std, gen) for k, v in sorted(state.items())}


def linear_stds(rule: Rule, method, updates: list[DeviceUpdate], keys, sensitivity: float,
                noise_multiplier: float) -> dict[str, float]:
    """sigma * C * max_i w_ik for every tensor some device trained (a linear rule: LoRA and head alike)."""
    out = {}
    for k in keys:
        share = max_share(updates, k, lambda u: rule.weight(method, u))
        if share > 0:
            out[k] = noise_multiplier * sensitivity * share
    return out


def noisy_linear(agg: AdapterState, stds: dict[str, float], gen: torch.Generator) -> AdapterState:
    """The released aggregate: the method's weighted average plus each tensor's noise."""
    out = dict(agg)
    for k in sorted(stds):
        out[k] = agg[k] + gaussian_like(agg[k], stds[k], gen)
    return out


def spectral_bound(payloads: list[AdapterState]) -> float:
    """K: the largest spectral norm of any LoRA factor the devices were sent (public)."""
    k = 0.0
    for p in payloads:
        for prefix in lora_pairs(p):
            for t in (p[prefix + ".lora_A"], p[prefix + ".lora_B"]):
                k = max(k, float(torch.linalg.matrix_norm(t.double(), ord=2)))
    return k


def product_sensitivity(clip: float, k: float) -> float:
    """C_prod: ||B A - B0 A0||_F <= (sqrt(2) K + C/2) ||Delta_m|| per module (docs/privacy.md), and a
    head tensor moves by at most its share of Delta, so the whole vector moves by <= C * max(1, .)."""
    return clip * max(1.0, math.sqrt(2.0) * k + clip / 2.0)


def noisy_products(global_state: AdapterState, updates: list[DeviceUpdate], weight: Callable[[DeviceUpdate], float],
                   sensitivity: float, noise_multiplier: float, gen: torch.Generator) -> AdapterState:
    """FlexLoRA / HLoRA under DP: sum_i w_i B_i A_i + N(0, (sigma C_prod max_i w_i)^2) per module,
    then the SVD at the global rank (post-processing: it spends no budget). Only the LoRA pairs;
    the heads are a linear rule (`noisy_linear`)."""
    new = {}
    for prefix in lora_pairs(global_state):
        hs = [u for u in updates if prefix + ".lora_A" in u.state]
        if not hs:
            continue
        ws = normalized([weight(u) for u in hs])
        delta = weighted_sum((factors(u, prefix)[1] @ factors(u, prefix)[0] for u in hs), ws)
        delta = delta + gaussian_like(delta, noise_multiplier * sensitivity * max(ws), gen)
        new[prefix + ".lora_A"], new[prefix + ".lora_B"] = svd_factors(delta, rank_of(global_state, prefix))
    return new
