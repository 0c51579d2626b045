"""FlexLoRA: heterogeneous ranks; the server averages full-size products and redistributes by SVD.

Bai, Chen, Qian, Yao, Li. "Federated Fine-tuning of Large Language Models under
Heterogeneous Tasks and Client Resources" (NeurIPS 2024; seed 002). Each device trains LoRA
at its own rank; the server forms W_i = B_i A_i, averages them weighted by data size, and
factorises the mean by SVD; each device receives the truncation at its rank, which is the
best rank-r_i approximation of the mean (Eckart-Young).
"""

from __future__ import annotations

from ..lora import AdapterState, Ranks
from .base import DeviceUpdate, LoraPlan, Method, MethodContext
from .hetlora import HetLora
from .lowrank import average_heads, lora_pairs, normalized, rank_of, svd_factors


def product_average_svd(global_state: AdapterState, updates: list[DeviceUpdate], weights: list[float]) -> AdapterState:
    """sum_i w_i B_i A_i per LoRA module, refactored at the global rank by SVD."""
    new = dict(global_state)
    for prefix in lora_pairs(global_state):
        pairs = [(w, u) for w, u in zip(weights, updates) if prefix + ".lora_A" in u.state]
        if not pairs:
            continue
        ws = normalized([w for w, _ in pairs])
        delta = sum(w * (u.state[prefix + ".lora_B"] @ u.state[prefix + ".lora_A"]) for w, (_, u) in zip(ws, pairs))
        new[prefix + ".lora_A"], new[prefix + ".lora_B"] = svd_factors(delta, rank_of(global_state, prefix))
    new.update(average_heads(global_state, updates, [float(u.samples) for u in updates]))
    return new


class FlexLora(HetLora):
    """Ranks per device from capacity (as HetLoRA); assignment truncates the SVD-ordered global factors."""

    name = "flexlora"

    def __init__(self, ctx: MethodContext, rank_min: int = 2, rank_max: int = 16):
        super().__init__(ctx, rank_min=rank_min, rank_max=rank_max, weighting="samples")

    def aggregate(self, global_state, updates):
        return product_average_svd(global_state, updates, [float(u.samples) for u in updates])
