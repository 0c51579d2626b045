"""FLoRA: heterogeneous LoRA aggregated by stacking, folded into the frozen weights.

Wang, Shen, Gu, et al. "FLoRA: Federated Fine-Tuning Large Language Models with
Heterogeneous Low-Rank Adaptations" (NeurIPS 2024). Each round the server stacks the
devices' modules, A = [A_1; ...; A_K] and B = [p_1 B_1, ..., p_K B_K], whose product is
exactly sum_k p_k B_k A_k (no cross terms, unlike averaging A and B apart). Devices merge
the stack into their frozen weights and start the next round from a fresh LoRA.

Readings of ours, written here because the paper leaves them to the implementation:
- Ranks per device from capacity, the same rule as HetLoRA (FLoRA allows any ranks).
- Devices are stateless in this harness, so the global state keeps the merged stacks as a
  dense residual per module (W = W0 + residual). What goes on the wire is what FLoRA sends:
  the last round's stacked factors plus the head and the fresh LoRA (the assignment's
  download_bytes), not the dense residual. A device that missed a round would need the stacks it missed; we do
  not charge those (all devices are asked every round).
- The fresh LoRA is peft's initialisation (A Kaiming-uniform, B zero), drawn by the server
  from the experiment seed and round so every device of a round starts from the same A.
- p_k = samples of device k / samples of the round.
"""

from __future__ import annotations

import math

import torch

from ..spec import RESIDUAL, AdapterState, state_bytes
from .aggregation import (average_heads, factors, holders, lora_pairs, normalized, residuals, stack_lora,
                          truncated_assignment)
from .base import Aggregated, Assignment, LoraPlan, MethodContext, MethodInfo
from .hetlora import HetLora


def fresh_lora(state: AdapterState, generator: torch.Generator) -> AdapterState:
    """peft's initialisation of every LoRA pair: A Kaiming-uniform(a=sqrt(5)), B zero."""
    out = dict(state)
    for prefix in lora_pairs(state):
        a = state[prefix + ".lora_A"]
        bound = 1.0 / math.sqrt(a.shape[1])  # kaiming_uniform_(a=sqrt(5)) on fan_in d_in
        out[prefix + ".lora_A"] = (torch.rand(a.shape, generator=generator, dtype=a.dtype) * 2 - 1) * bound
        out[prefix + ".lora_B"] = torch.zeros_like(state[prefix + ".lora_B"])
    return out


class FLora(HetLora):
    info = MethodInfo("flora", "flora", residual=True)

    def __init__(self, ctx: MethodContext, rank_min: int = 2, rank_max: int = 16):
        super().__init__(ctx, rank_min=rank_min, rank_max=rank_max, weighting="samples")
        self.aggregations = 0
        self.stack_bytes: dict[str, int] = {}  # LoRA module -> bytes of its last stacked factors

    def wire_bytes(self, payload: AdapterState) -> int:
        """What goes on the wire: the LoRA and head as they are, each residual as the last round's stack."""
        lora = {k: v for k, v in payload.items() if not k.endswith("." + RESIDUAL)}
        stacks = sum(self.stack_bytes.get(k[: -len(RESIDUAL) - 1], 0) for k in payload if k.endswith("." + RESIDUAL))
        return state_bytes(lora) + stacks

    def configure(self, view, global_state):
        out = {}
        for i, p in self.plans(view).items():
            # HetLoRA's truncation of the (fresh) LoRA, plus the merged weights of the whole model
            payload = {**truncated_assignment(global_state, p.ranks), **residuals(global_state)}
            out[i] = Assignment(LoraPlan(i, p.ranks, (RESIDUAL,)), payload, self.wire_bytes(payload))
        return out

    def aggregate(self, round_, global_state, updates):
        if not updates:
            return Aggregated(global_state)
        new = dict(global_state)
        scale = self.ctx.alpha_over_rank
        for prefix in lora_pairs(global_state):
            hs = holders(updates, prefix + ".lora_A")
            if not hs:
                continue
            a, b = stack_lora([factors(u, prefix) for u in hs], normalized([float(u.samples) for u in hs]))
            self.stack_bytes[prefix] = state_bytes({"a": a, "b": b})
            new[prefix + "." + RESIDUAL] = global_state[prefix + "." + RESIDUAL] + scale * (b @ a)
        new.update(average_heads(global_state, updates))
        self.aggregations += 1
        gen = torch.Generator().manual_seed(self.ctx.seed * 1_000_003 + self.aggregations)
        return Aggregated(fresh_lora(new, gen))
