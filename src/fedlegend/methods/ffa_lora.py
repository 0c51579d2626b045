"""FFA-LoRA: A frozen at its shared random initialisation, only B (and the head) trained and averaged.

Sun, Qin, Li, Ding. "Improving LoRA in Privacy-preserving Federated Learning" (ICLR 2024).
With every device holding the same A, the average of B_i A equals (mean B_i) A: FedAvg of
B is exact. Devices upload only B and the head (updates hold no A, so A keeps its global,
initial value under FedLoRA's layer-wise rule). The download still counts A each round (a
stateless device needs it; a device that kept A from its first round would not): a
conservative reading of its traffic.
"""

from __future__ import annotations

from .base import MethodInfo
from .fedlora import FedLora


class FfaLora(FedLora):
    info = MethodInfo("ffa-lora", "fedlora")
    frozen = ("lora_A",)
