"""HetLoRA: a LoRA rank per device from its capacity, LoRA on all layers.

Cho, Liu, Joshi, et al. "Heterogeneous LoRA for Federated Fine-tuning of On-Device
Foundation Models" (EMNLP 2024). Aggregation: zero-pad every device's A and B to the
largest rank, take the weighted average, and give each device the truncation at its rank.
Weights: the paper's sparsity-weighted aggregation (each device weighted by the Frobenius
norm of its update B A, per LoRA module) or by sample count. Rank self-pruning (optional):
a device whose last `prune_step` rank components carry less than `prune_threshold` of its
update's norm gets that many fewer ranks from the next round on.
"""

from __future__ import annotations

import torch

from ..lora import AdapterState, Ranks
from .base import DeviceUpdate, LoraPlan, Method, MethodContext
from .lowrank import average_heads, lora_pairs, normalized, rank_by_capacity, rank_of, truncate, zero_pad


def hetlora_average(global_state: AdapterState, updates: list[DeviceUpdate], weighting: str = "norm") -> AdapterState:
    """Zero-pad to the global rank, weighted average; layers nobody trained keep their value."""
    new = dict(global_state)
    for prefix in lora_pairs(global_state):
        r = rank_of(global_state, prefix)
        holders = [u for u in updates if prefix + ".lora_A" in u.state]
        if not holders:
            continue
        if weighting == "norm":
            w = [float(torch.linalg.matrix_norm(u.state[prefix + ".lora_B"] @ u.state[prefix + ".lora_A"]))
                 for u in holders]
        else:
            w = [float(u.samples) for u in holders]
        w = normalized(w)
        padded = [zero_pad(u.state[prefix + ".lora_A"], u.state[prefix + ".lora_B"], r) for u in holders]
        new[prefix + ".lora_A"] = sum(wi * a for wi, (a, _) in zip(w, padded))
        new[prefix + ".lora_B"] = sum(wi * b for wi, (_, b) in zip(w, padded))
    new.update(average_heads(global_state, updates, [float(u.samples) for u in updates]))
    return new


def tail_energy(update: AdapterState, drop: int) -> float:
    """Share of the update's norm carried by its last `drop` rank components (all modules)."""
    total = tail = 0.0
    for prefix in lora_pairs(update):
        a, b = update[prefix + ".lora_A"], update[prefix + ".lora_B"]
        r = a.shape[0]
        total += float(torch.linalg.matrix_norm(b @ a))
        if drop < r:
            tail += float(torch.linalg.matrix_norm(b[:, r - drop:] @ a[r - drop:]))
    return tail / total if total > 0 else 0.0


class HetLora(Method):
    name = "hetlora"

    def __init__(self, ctx: MethodContext, rank_min: int = 2, rank_max: int = 16, weighting: str = "norm",
                 self_pruning: bool = False, prune_threshold: float = 0.05, prune_step: int = 1):
        super().__init__(ctx)
        if not 1 <= rank_min <= rank_max:
            raise ValueError(f"hetlora needs 1 <= rank_min <= rank_max, got {rank_min}, {rank_max}")
        self.rank_min, self.rank_max = rank_min, rank_max
        self.weighting = weighting
        self.self_pruning, self.prune_threshold, self.prune_step = self_pruning, prune_threshold, prune_step
        self.pruned: dict[int, int] = {}   # device -> rank cap after self-pruning

    def global_ranks(self) -> Ranks:
        return {l: self.rank_max for l in range(self.L)}

    def device_ranks(self, devices, estimates) -> dict[int, int]:
        ranks = rank_by_capacity(devices, estimates, self.L, self.rank_min, self.rank_max)
        return {i: min(r, self.pruned.get(i, r)) for i, r in ranks.items()}

    def plan(self, round_, devices, estimates, budgets):
        return {i: LoraPlan(i, {l: r for l in range(self.L)}) for i, r in self.device_ranks(devices, estimates).items()}

    def assign(self, global_state, plan):
        out = {k: v for k, v in global_state.items() if k.startswith("head.")}
        for prefix in lora_pairs(global_state):
            layer = int(prefix.split(".")[1])
            if layer in plan.ranks:
                a, b = truncate(global_state[prefix + ".lora_A"], global_state[prefix + ".lora_B"], plan.ranks[layer])
                out[prefix + ".lora_A"], out[prefix + ".lora_B"] = a, b
        return out

    def aggregate(self, global_state, updates):
        if self.self_pruning:
            for u in updates:
                r = max(rank_of(u.state, p) for p in lora_pairs(u.state))
                if r - self.prune_step >= self.rank_min and tail_energy(u.state, self.prune_step) < self.prune_threshold:
                    self.pruned[u.device] = r - self.prune_step
        return hetlora_average(global_state, updates, self.weighting)
