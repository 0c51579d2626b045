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
  the last round's stacked factors plus the head and the fresh LoRA (download_bytes), not
  the dense residual. A device that missed a round would need the stacks it missed; we do
  not charge those (all devices are asked every round).
- The fresh LoRA is peft's initialisation (A Kaiming-uniform, B zero), drawn by the server
  from the experiment seed and round so every device of a round starts from the same A.
- p_k = samples of device k / samples of the round.
"""

from __future__ import annotations

import math

import torch

from ..lora import RESIDUAL, AdapterState, residual_key, state_bytes
from .base import DeviceUpdate, LoraPlan, MethodContext
from .hetlora import HetLora
from .lowrank import average_heads, lora_pairs, normalized, truncate

FROZEN = (RESIDUAL,)


def stack_lora(pairs: list[tuple[torch.Tensor, torch.Tensor]], weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """FLoRA's stacking: A_s = [A_1; ...; A_K] (sum r_k, d_in), B_s = [w_1 B_1, ..., w_K B_K]
    (d_out, sum r_k), so B_s @ A_s = sum_k w_k B_k A_k for any ranks r_k."""
    a = torch.cat([a for a, _ in pairs], 0)
    b = torch.cat([w * b for w, (_, b) in zip(weights, pairs)], 1)
    return a, b


def with_zero_residuals(state: AdapterState) -> AdapterState:
    """Add a zero residual (d_out, d_in) beside every LoRA pair that has none yet."""
    out = dict(state)
    for prefix in lora_pairs(state):
        key = prefix + "." + RESIDUAL
        if key not in out:
            a, b = state[prefix + ".lora_A"], state[prefix + ".lora_B"]
            out[key] = a.new_zeros(b.shape[0], a.shape[1])
    return out


def residuals_of(state: AdapterState, layers) -> AdapterState:
    """The residuals of the given layers (all layers: the frozen model a device runs)."""
    keep = set(layers)
    return {k: v for k, v in state.items() if k.endswith("." + RESIDUAL) and int(k.split(".")[1]) in keep}


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
    name = "flora"

    def __init__(self, ctx: MethodContext, rank_min: int = 2, rank_max: int = 16):
        super().__init__(ctx, rank_min=rank_min, rank_max=rank_max, weighting="samples")
        self.aggregations = 0
        self.stack_bytes: dict[str, int] = {}  # LoRA module -> bytes of its last stacked factors

    def init_state(self, state):
        return with_zero_residuals(state)

    def plan(self, round_, devices, estimates, budgets):
        return {i: LoraPlan(i, p.ranks, {"frozen": FROZEN}) for i, p in super().plan(round_, devices, estimates, budgets).items()}

    def assign(self, global_state, plan):
        # HetLoRA's truncation of the (fresh) LoRA, plus the merged weights of the whole model
        return {**super().assign(global_state, plan), **residuals_of(global_state, range(self.L))}

    def download_bytes(self, payload, plan):
        lora = {k: v for k, v in payload.items() if not k.endswith("." + RESIDUAL)}
        stacks = sum(self.stack_bytes.get(k[: -len(RESIDUAL) - 1], 0) for k in payload if k.endswith("." + RESIDUAL))
        return state_bytes(lora) + stacks

    def aggregate(self, global_state, updates: list[DeviceUpdate]):
        new = dict(global_state)
        scale = self.ctx.alpha_over_rank
        for prefix in lora_pairs(global_state):
            holders = [u for u in updates if prefix + ".lora_A" in u.state]
            if not holders:
                continue
            w = normalized([float(u.samples) for u in holders])
            a, b = stack_lora([(u.state[prefix + ".lora_A"], u.state[prefix + ".lora_B"]) for u in holders], w)
            self.stack_bytes[prefix] = state_bytes({"a": a, "b": b})
            new[prefix + "." + RESIDUAL] = global_state[prefix + "." + RESIDUAL] + scale * (b @ a)
        new.update(average_heads(global_state, updates, [float(u.samples) for u in updates]))
        self.aggregations += 1
        gen = torch.Generator().manual_seed(self.ctx.seed * 1_000_003 + self.aggregations)
        return fresh_lora(new, gen)
