"""FedRA: a random allocation of layers to each device every round.

Su, Zhang, Wang, et al. "FedRA: A Random Allocation Strategy for Federated Tuning to
Unleash the Power of Heterogeneous Clients" (ECCV 2024). Each round every device gets a
random subset of the layers, as many as its capacity allows (its depth from estimated speed,
the fastest device training all L layers); the server averages each layer over the devices
that trained it (the same layer-wise rule as LEGEND's eq. 17). The random draw comes from
(seed, round), so runs repeat.
"""

from __future__ import annotations

import numpy as np

from ..spec import Ranks
from .aggregation import layerwise_average, select_layers
from .base import Aggregated, LoraPlan, Method, MethodContext, MethodInfo, assignment
from .hetlora import rank_by_capacity


class FedRA(Method):
    info = MethodInfo("fedra", "fedra")

    def __init__(self, ctx: MethodContext, rank: int = 8, min_layers: int = 1):
        super().__init__(ctx)
        if not 1 <= min_layers <= self.L:
            raise ValueError(f"fedra min_layers={min_layers} must be within 1..{self.L}")
        self.rank, self.min_layers, self.seed = rank, min_layers, ctx.seed

    def global_ranks(self) -> Ranks:
        return {l: self.rank for l in range(self.L)}

    def configure(self, view, global_state):
        # capacity -> number of layers, using the same speed ranking as the rank-based methods
        counts = rank_by_capacity(view.devices, view.estimates, self.L, self.min_layers, self.L)
        out = {}
        for i in view.devices:
            rng = np.random.default_rng([self.seed, 11, view.round, i])
            layers = sorted(rng.choice(self.L, size=counts[i], replace=False).tolist())
            ranks = {l: self.rank for l in layers}
            out[i] = assignment(LoraPlan(i, ranks), select_layers(global_state, ranks))
        return out

    def aggregate(self, round_, global_state, updates):
        return Aggregated(layerwise_average(global_state, updates, "samples"))
