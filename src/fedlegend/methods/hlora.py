"""HLoRA: heterogeneous ranks from compute capacity and data volume, rank-aware aggregation.

"HLoRA: Efficient Federated Learning System for LLM Heterogeneous Fine-Tuning" (built
on Plato). Our reading of its two mechanisms, as its summary states them:
- rank allocation "based on local computational capacity and data volume": a device's
  rank is r_max times (its speed relative to the fastest) times (its sample count relative
  to the largest partition), clipped to [r_min, r_max];
- "rank-aware heterogeneous parameter aggregation ... weighted aggregation to mitigate the
  bias of padding": aggregate the products B_i A_i (never the zero-padded factors, whose
  padded zeros would drag the high components toward zero), weighted by n_i * r_i so that a
  device's say grows with both its data and the subspace it could fit; SVD back to each rank.
"""

from __future__ import annotations

from .aggregation import lora_pairs, product_average_svd, rank_of
from .base import Aggregated, MethodContext, MethodInfo
from .hetlora import HetLora, rank_by_capacity


class HLora(HetLora):
    info = MethodInfo("hlora", "hlora")

    def __init__(self, ctx: MethodContext, rank_min: int = 2, rank_max: int = 16):
        super().__init__(ctx, rank_min=rank_min, rank_max=rank_max, weighting="samples")
        self.samples: dict[int, int] = {}

    def device_ranks(self, view):
        share = None
        if self.samples:
            top = max(self.samples.values())
            share = {i: self.samples[i] / top for i in self.samples}
        return rank_by_capacity(view.devices, view.estimates, self.L, self.rank_min, self.rank_max, share)

    def aggregate(self, round_, global_state, updates):
        for u in updates:
            self.samples[u.device] = u.samples
        weights = [u.samples * max(rank_of(u.state, p) for p in lora_pairs(u.state)) for u in updates]
        return Aggregated(product_average_svd(global_state, updates, weights))
