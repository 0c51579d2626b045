"""FFA-LoRA: A frozen at its shared random initialisation, only B (and the head) trained and averaged.

Sun, Qin, Li, Ding. "Improving LoRA in Privacy-preserving Federated Learning" (ICLR 2024).
With every device holding the same A, the average of B_i A equals (mean B_i) A: FedAvg of
B is exact. Devices upload only B and the head. The download still counts A each round (a
stateless device needs it; a device that kept A from its first round would not): a
conservative reading of its traffic.
"""

from __future__ import annotations

from .base import LoraPlan, layerwise_average
from .fedlora import FedLora

FROZEN = ("lora_A",)


class FfaLora(FedLora):
    name = "ffa-lora"

    def plan(self, round_, devices, estimates, budgets):
        return {i: LoraPlan(i, self.global_ranks(), {"frozen": FROZEN}) for i in devices}

    def aggregate(self, global_state, updates):
        # updates hold B and the head only, so A keeps its global (initial) value
        return layerwise_average(global_state, updates, self.weighting)
