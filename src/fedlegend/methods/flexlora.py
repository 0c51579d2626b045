"""FlexLoRA: heterogeneous ranks; the server averages full-size products and redistributes by SVD.

Bai, Chen, Qian, Yao, Li. "Federated Fine-tuning of Large Language Models under
Heterogeneous Tasks and Client Resources" (NeurIPS 2024). Each device trains LoRA
at its own rank; the server forms W_i = B_i A_i, averages them weighted by data size, and
factorises the mean by SVD; each device receives the truncation at its rank, which is the
best rank-r_i approximation of the mean (Eckart-Young).
"""

from __future__ import annotations

from .aggregation import product_average_svd
from .base import Aggregated, MethodContext, MethodInfo
from .hetlora import HetLora


class FlexLora(HetLora):
    """Ranks per device from capacity (as HetLoRA); assignment truncates the SVD-ordered global factors."""

    info = MethodInfo("flexlora", "flexlora")

    def __init__(self, ctx: MethodContext, rank_min: int = 2, rank_max: int = 16):
        super().__init__(ctx, rank_min=rank_min, rank_max=rank_max, weighting="samples")

    def aggregate(self, round_, global_state, updates):
        return Aggregated(product_average_svd(global_state, updates, [float(u.samples) for u in updates]))
