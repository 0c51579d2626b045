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

from ..spec import Ranks
from .aggregation import factors, lora_pairs, rank_of, truncated_assignment, zero_pad_average
from .base import Aggregated, Estimate, LoraPlan, Method, MethodContext, MethodInfo, RoundView, assignment


def norm_weight(update, prefix: str) -> float:
    """The paper's sparsity weight of a device for one module: the Frobenius norm of its B A."""
    a, b = factors(update, prefix)
    return float(torch.linalg.matrix_norm(b @ a))


def samples_weight(update, prefix: str) -> float:
    return float(update.samples)


def rank_by_capacity(devices: list[int], estimates: dict[int, Estimate], num_layers: int,
                     r_min: int, r_max: int, share: dict[int, float] | None = None) -> dict[int, int]:
    """A LoRA rank per device from its estimated speed: the fastest gets r_max, a device k
    times slower about r_max / k (never below r_min). Devices not yet estimated get r_max
    (their first round profiles them). `share` optionally scales the rank by a second
    factor in (0, 1] (HLoRA: the device's data volume relative to the largest)."""
    times = {i: estimates[i].fixed_s + num_layers * estimates[i].mu + num_layers * r_max * estimates[i].beta
             for i in devices if i in estimates}
    t_min = min(times.values()) if times else 1.0
    ranks = {}
    for i in devices:
        frac = t_min / times[i] if i in times and times[i] > 0 else 1.0
        if share is not None:
            frac *= share.get(i, 1.0)
        ranks[i] = int(max(r_min, min(r_max, round(r_max * frac))))
    return ranks


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
    """Ranks per device from capacity, LoRA on all layers, zero-pad averaging, truncated assignment.
    FlexLoRA, HLoRA and FLoRA keep the rank allocation and change the aggregation."""

    info = MethodInfo("hetlora", "hetlora")

    def __init__(self, ctx: MethodContext, rank_min: int = 2, rank_max: int = 16, weighting: str = "norm",
                 self_pruning: bool = False, prune_threshold: float = 0.05, prune_step: int = 1):
        super().__init__(ctx)
        if not 1 <= rank_min <= rank_max:
            raise ValueError(f"{self.info.name} needs 1 <= rank_min <= rank_max, got {rank_min}, {rank_max}")
        self.rank_min, self.rank_max = rank_min, rank_max
        self.weighting = weighting
        self.self_pruning, self.prune_threshold, self.prune_step = self_pruning, prune_threshold, prune_step
        self.pruned: dict[int, int] = {}   # device -> rank cap after self-pruning

    def global_ranks(self) -> Ranks:
        return {l: self.rank_max for l in range(self.L)}

    def device_ranks(self, view: RoundView) -> dict[int, int]:
        ranks = rank_by_capacity(view.devices, view.estimates, self.L, self.rank_min, self.rank_max)
        return {i: min(r, self.pruned.get(i, r)) for i, r in ranks.items()}

    def plans(self, view: RoundView) -> dict[int, LoraPlan]:
        return {i: LoraPlan(i, {l: r for l in range(self.L)}) for i, r in self.device_ranks(view).items()}

    def configure(self, view, global_state):
        return {i: assignment(p, truncated_assignment(global_state, p.ranks)) for i, p in self.plans(view).items()}

    def aggregate(self, round_, global_state, updates):
        if self.self_pruning:
            for u in updates:
                r = max(rank_of(u.state, p) for p in lora_pairs(u.state))
                if r - self.prune_step >= self.rank_min and tail_energy(u.state, self.prune_step) < self.prune_threshold:
                    self.pruned[u.device] = r - self.prune_step
        weight = norm_weight if self.weighting == "norm" else samples_weight
        return Aggregated(zero_pad_average(global_state, updates, weight))
