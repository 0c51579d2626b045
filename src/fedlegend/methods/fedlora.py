"""FedLoRA: the same LoRA rank on every layer of every device, aggregated with FedAvg.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (ICLR 2022) applied to
federated fine-tuning, the naive baseline of LEGEND's evaluation (seed 003, section 6.1).
"""

from __future__ import annotations

from ..lora import AdapterState, Ranks
from .base import DeviceUpdate, LoraPlan, Method, MethodContext, layerwise_average


class FedLora(Method):
    name = "fedlora"

    def __init__(self, ctx: MethodContext, rank: int = 8, weighting: str = "samples"):
        super().__init__(ctx)
        if rank < 1:
            raise ValueError(f"fedlora rank must be >= 1, got {rank}")
        self.rank = rank
        self.weighting = weighting

    def global_ranks(self) -> Ranks:
        return {l: self.rank for l in range(self.L)}

    def plan(self, round_, devices, estimates, budgets):
        return {i: LoraPlan(i, self.global_ranks()) for i in devices}

    def aggregate(self, global_state: AdapterState, updates: list[DeviceUpdate]) -> AdapterState:
        # Every device trains every tensor, so the layer-wise rule reduces to FedAvg.
        return layerwise_average(global_state, updates, self.weighting)
