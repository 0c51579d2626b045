"""FedEx-LoRA: exact aggregation, the averaging error folded into the frozen weight.

Singhal, Ponkshe, Vepakomma. "FedEx-LoRA: Exact Aggregation for Federated and Efficient
Fine-Tuning of Foundation Models" (ACL 2025). Averaging A and B apart gives mean(B) mean(A),
not mean(B A). FedEx-LoRA keeps the averaged factors and adds the difference,
    residual += s * (sum_k p_k B_k A_k - B_avg A_avg),      s = alpha / r,
to the frozen weight, so W0 + residual + s B_avg A_avg equals the exact weighted average of
the devices' models.

Traffic, counted honestly: the residual is full rank (d_out x d_in per module), and each
device downloads it every round with its LoRA (download_bytes' default counts the dense
tensor: a device that kept last round's weight would download the increment, which is
just as large). Same rank on every device, sample-weighted (p_k), LoRA on all layers.
"""

from __future__ import annotations

import torch

from ..lora import RESIDUAL, AdapterState
from .base import DeviceUpdate, LoraPlan, layerwise_average
from .fedlora import FedLora
from .flora import residuals_of, with_zero_residuals
from .lowrank import lora_pairs, normalized

FROZEN = (RESIDUAL,)


def exact_residual(pairs: list[tuple[torch.Tensor, torch.Tensor]], weights: list[float]) -> torch.Tensor:
    """sum_k w_k B_k A_k - (sum_k w_k B_k)(sum_k w_k A_k), the error of averaging factors apart."""
    a_avg = sum(w * a for w, (a, _) in zip(weights, pairs))
    b_avg = sum(w * b for w, (_, b) in zip(weights, pairs))
    return sum(w * (b @ a) for w, (a, b) in zip(weights, pairs)) - b_avg @ a_avg


class FedExLora(FedLora):
    name = "fedex-lora"

    def init_state(self, state):
        return with_zero_residuals(state)

    def plan(self, round_, devices, estimates, budgets):
        return {i: LoraPlan(i, self.global_ranks(), {"frozen": FROZEN}) for i in devices}

    def assign(self, global_state, plan):
        return {**super().assign(global_state, plan), **residuals_of(global_state, range(self.L))}

    def aggregate(self, global_state: AdapterState, updates: list[DeviceUpdate]) -> AdapterState:
        new = layerwise_average(global_state, updates, self.weighting)  # A_avg, B_avg, head
        for prefix in lora_pairs(global_state):
            holders = [u for u in updates if prefix + ".lora_A" in u.state]
            if not holders:
                continue
            w = normalized([float(u.samples) if self.weighting == "samples" else 1.0 for u in holders])
            pairs = [(u.state[prefix + ".lora_A"], u.state[prefix + ".lora_B"]) for u in holders]
            new[prefix + "." + RESIDUAL] = (global_state[prefix + "." + RESIDUAL]
                                            + self.ctx.alpha_over_rank * exact_residual(pairs, w))
        return new
