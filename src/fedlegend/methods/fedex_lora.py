"""FedEx-LoRA: exact aggregation, the averaging error folded into the frozen weight.

Singhal, Ponkshe, Vepakomma. "FedEx-LoRA: Exact Aggregation for Federated and Efficient
Fine-Tuning of Foundation Models" (ACL 2025). Averaging A and B apart gives mean(B) mean(A),
not mean(B A). FedEx-LoRA keeps the averaged factors and adds the difference,
    residual += s * (sum_k p_k B_k A_k - B_avg A_avg),      s = alpha / r,
to the frozen weight, so W0 + residual + s B_avg A_avg equals the exact weighted average of
the devices' models.

Traffic, counted honestly: the residual is full rank (d_out x d_in per module), and each
device downloads it every round with its LoRA (the assignment's wire size counts the dense
tensor: a device that kept last round's weight would download the increment, which is just
as large). Same rank on every device, sample-weighted (p_k), LoRA on all layers.
"""

from __future__ import annotations

from ..spec import RESIDUAL
from .aggregation import (device_weight, exact_residual, factors, holders, layerwise_average, lora_pairs, normalized,
                          residuals)
from .base import Aggregated, MethodInfo, assignment
from .fedlora import FedLora


class FedExLora(FedLora):
    info = MethodInfo("fedex-lora", "fedlora", residual=True)
    frozen = (RESIDUAL,)

    def configure(self, view, global_state):
        # FedLoRA's LoRA and head, plus the merged weights of the whole model
        return {i: assignment(a.plan, {**a.payload, **residuals(global_state)})
                for i, a in super().configure(view, global_state).items()}

    def aggregate(self, round_, global_state, updates):
        new = layerwise_average(global_state, updates, self.weighting)  # A_avg, B_avg, head
        for prefix in lora_pairs(global_state):
            hs = holders(updates, prefix + ".lora_A")
            if not hs:
                continue
            w = normalized([device_weight(u, self.weighting) for u in hs])
            new[prefix + "." + RESIDUAL] = (global_state[prefix + "." + RESIDUAL]
                                            + self.ctx.alpha_over_rank * exact_residual([factors(u, prefix) for u in hs], w))
        return Aggregated(new)
