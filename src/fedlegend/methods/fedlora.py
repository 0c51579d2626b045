"""FedLoRA: the same LoRA rank on every layer of every device, aggregated with FedAvg.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (ICLR 2022) applied to
federated fine-tuning, the naive baseline of LEGEND's evaluation (the LEGEND paper, section 6.1).
"""

from __future__ import annotations

from ..spec import Ranks
from .aggregation import layerwise_average, select_layers
from .base import Aggregated, LoraPlan, Method, MethodContext, MethodInfo, assignment


class FedLora(Method):
    info = MethodInfo("fedlora", "fedlora")
    frozen: tuple[str, ...] = ()   # tensor kinds devices receive but do not train (subclasses)

    def __init__(self, ctx: MethodContext, rank: int = 8, weighting: str = "samples"):
        super().__init__(ctx)
        if rank < 1:
            raise ValueError(f"fedlora rank must be >= 1, got {rank}")
        self.rank = rank
        self.weighting = weighting

    def global_ranks(self) -> Ranks:
        return {l: self.rank for l in range(self.L)}

    def configure(self, view, global_state):
        ranks = self.global_ranks()
        return {i: assignment(LoraPlan(i, ranks, self.frozen), select_layers(global_state, ranks))
                for i in view.devices}

    def aggregate(self, round_, global_state, updates):
        # Every device trains every tensor, so the layer-wise rule reduces to FedAvg.
        return Aggregated(layerwise_average(global_state, updates, self.weighting))
