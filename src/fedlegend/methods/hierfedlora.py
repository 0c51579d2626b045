"""HierFedLoRA: near-IID device groups, each with its own aggregation frequency and depth.

Liu, Liao, Xu, Xu. "Resource-Efficient Federated Fine-Tuning Large Language Models for
Heterogeneous Data" (arXiv 2503.21213). Devices are partitioned into near-IID
groups; within a global round group g runs tau_g iterations of local training followed by
intra-group aggregation, training the top d_g layers; then the server aggregates the groups.

The seed gives only the abstract; these readings are ours (tested in tests/test_methods.py):
- Grouping: greedy, devices by decreasing data size, each to the group (size-capped at
  ceil(N/G)) whose label distribution after adding it is closest in L1 to the whole fleet's.
  Devices report label counts once (ctx.label_counts), as group-based FL methods do.
- Joint (tau_g, d_g): a group iteration at depth d lasts t_g(d) = max over its devices of
  fixed_i + d mu_i + d r beta_i (the estimates of eq. 8-9). With a common period T (the median
  group's full-depth iteration time) each group takes the (tau, d) maximising tau * d (layer
  updates per global round) under tau * t_g(d) <= T, tau <= max_frequency, d >= min_depth; a
  group that cannot fit even (1, min_depth) gets that and sets the period. Before every device
  has an estimate (the first global round) all groups run (1, L): the profiling round.
- Engine rounds are group iterations ("ticks"): at tick t the groups with tau_g >= t train; the
  others are idle, waiting for the global aggregation after tick max tau. Groups run in parallel,
  so the virtual clock advances by the growth of the slowest group's clock (round_timing, which
  aggregate reports as the round's time and waiting), and
  a global round lasts max_g sum of its iterations. Intra-group aggregation: sample-weighted
  FedAvg of the group's devices (an edge aggregator; its transfer time is not charged).
  Global aggregation: each tensor averaged over the groups that trained it, weighted by the
  samples they trained on in the global round (layers nobody trained keep their value).
- The global adapter (what is evaluated) changes only at global aggregations.
"""

from __future__ import annotations

import math

import numpy as np

from ..spec import AdapterState, Ranks, key_layer
from .aggregation import DeviceUpdate, layerwise_average, select_layers
from .base import Aggregated, Estimate, LoraPlan, Method, MethodContext, MethodInfo, Skip, assignment


def near_iid_groups(label_counts: list[list[int]], num_groups: int) -> list[list[int]]:
    """Greedy near-IID grouping: every group's label distribution close to the fleet's (L1)."""
    counts = np.asarray(label_counts, dtype=float)
    n = len(counts)
    g = max(1, min(num_groups, n))
    cap = math.ceil(n / g)
    target = counts.sum(0) / max(counts.sum(), 1.0)
    sums = np.zeros((g, counts.shape[1]))
    groups: list[list[int]] = [[] for _ in range(g)]
    for i in sorted(range(n), key=lambda i: (-counts[i].sum(), i)):
        best, best_cost = None, None
        for j in range(g):
            if len(groups[j]) >= cap:
                continue
            s = sums[j] + counts[i]
            cost = (np.abs(s / max(s.sum(), 1.0) - target).sum(), len(groups[j]))  # ties: the smaller group
            if best_cost is None or cost < best_cost:
                best, best_cost = j, cost
        groups[best].append(i)
        sums[best] += counts[i]
    return [sorted(x) for x in groups if x]


def iteration_time(group: list[int], estimates: dict[int, Estimate], depth: int, rank: int) -> float:
    """t_g(d): the group's slowest device at depth d (completion time of eq. 12, uniform rank)."""
    return max(estimates[i].fixed_s + depth * estimates[i].mu + depth * rank * estimates[i].beta for i in group)


def frequency_and_depth(t_of_depth, period: float, num_layers: int, max_frequency: int,
                        min_depth: int) -> tuple[int, int]:
    """The (tau, d) with the most layer updates tau * d such that tau * t(d) <= period."""
    best = (1, min_depth)
    best_score = None
    for d in range(min_depth, num_layers + 1):
        t = t_of_depth(d)
        tau = min(max_frequency, int(period // t)) if t > 0 else max_frequency
        if tau < 1:
            continue
        score = (tau * d, d)  # ties: the deeper configuration (fewer intra-group syncs)
        if best_score is None or score > best_score:
            best, best_score = (tau, d), score
    return best


class HierFedLora(Method):
    info = MethodInfo("hierfedlora", "hierfedlora")

    def __init__(self, ctx: MethodContext, groups: int = 3, rank: int = 8, max_frequency: int = 4, min_depth: int = 1):
        super().__init__(ctx)
        if not 1 <= min_depth <= self.L:
            raise ValueError(f"hierfedlora min_depth must be within 1..{self.L}, got {min_depth}")
        self.num_groups, self.rank, self.max_frequency, self.min_depth = groups, rank, max_frequency, min_depth
        self.groups: list[list[int]] = []
        self.group_of: dict[int, int] = {}
        self.tau: dict[int, int] = {}
        self.depth: dict[int, int] = {}
        self.tick = 0                                  # group iteration within the global round
        self.group_state: dict[int, AdapterState] = {}
        self.group_samples: dict[int, int] = {}
        self.group_layers: dict[int, set[int]] = {}
        self.clock: dict[int, float] = {}              # virtual time of each group in the global round

    def global_ranks(self) -> Ranks:
        return {l: self.rank for l in range(self.L)}

    def _form_groups(self, devices: list[int]) -> None:
        counts = self.ctx.label_counts
        if len(counts) < len(devices):  # no label counts: round-robin (still deterministic)
            self.groups = [devices[j::self.num_groups] for j in range(min(self.num_groups, len(devices)))]
        else:
            self.groups = [[devices[i] for i in grp] for grp in near_iid_groups([counts[d] for d in devices],
                                                                                    self.num_groups)]
        self.group_of = {i: g for g, grp in enumerate(self.groups) for i in grp}

    def _choose(self, estimates: dict[int, Estimate]) -> None:
        L = self.L
        if not all(i in estimates for grp in self.groups for i in grp):
            self.tau = {g: 1 for g in range(len(self.groups))}
            self.depth = {g: L for g in range(len(self.groups))}
            return
        full = [iteration_time(grp, estimates, L, self.rank) for grp in self.groups]
        period = float(np.median(full))
        for g, grp in enumerate(self.groups):
            self.tau[g], self.depth[g] = frequency_and_depth(
                lambda d, grp=grp: iteration_time(grp, estimates, d, self.rank), period, L,
                self.max_frequency, self.min_depth)

    def _start_global_round(self, estimates: dict[int, Estimate]) -> None:
        self.tick = 0
        self._choose(estimates)
        self.group_state, self.group_samples, self.group_layers = {}, {}, {}
        self.clock = {g: 0.0 for g in range(len(self.groups))}

    def idle_reason(self, device: int) -> str:
        g = self.group_of.get(device)
        if g is None:
            return "not in any group"
        return f"group {g} finished its {self.tau[g]} iteration(s); waits for the global aggregation"

    def configure(self, view, global_state):
        if not self.groups:
            self._form_groups(list(view.devices))
        if self.tick >= max(self.tau.values(), default=0):   # a new global round (also after a lost one)
            self._start_global_round(view.estimates)
        self.tick += 1
        out = {}
        for i in view.devices:
            g = self.group_of.get(i)
            if g is None or self.tau[g] < self.tick:
                out[i] = Skip(self.idle_reason(i))
                continue
            ranks = {l: self.rank for l in range(self.L - self.depth[g], self.L)}
            # a group's devices start from the group's model of its previous iteration
            out[i] = assignment(LoraPlan(i, ranks), select_layers(self.group_state.get(g, global_state), ranks))
        return out

    def round_timing(self, times: dict[int, float]) -> tuple[float, dict[int, float]]:
        """(growth of the slowest group's clock, each device's waiting) of this tick."""
        by_group: dict[int, list[int]] = {}
        for i in times:
            by_group.setdefault(self.group_of[i], []).append(i)
        before = max(self.clock.values(), default=0.0)
        waits = {}
        for g, devs in by_group.items():
            t = max(times[i] for i in devs)
            self.clock[g] = self.clock.get(g, 0.0) + t
            waits.update({i: t - times[i] for i in devs})
        after = max(self.clock.values(), default=0.0)
        if self.tick >= max(self.tau.values(), default=0):   # last tick: every group waits for the slowest
            for g, devs in by_group.items():
                waits.update({i: waits[i] + after - self.clock[g] for i in devs})
        return after - before, waits

    def aggregate(self, round_, global_state, updates):
        round_time, waits = self.round_timing({u.device: u.time_s for u in updates})
        # also without updates: on a global round's last tick the groups' earlier work is merged
        return Aggregated(self._merge(global_state, updates), round_time, waits)

    def _merge(self, global_state: AdapterState, updates: list[DeviceUpdate]) -> AdapterState:
        by_group: dict[int, list[DeviceUpdate]] = {}
        for u in updates:
            by_group.setdefault(self.group_of[u.device], []).append(u)
        for g, ups in by_group.items():   # intra-group aggregation (sample-weighted FedAvg)
            self.group_state[g] = layerwise_average(self.group_state.get(g, global_state), ups, "samples")
            self.group_samples[g] = self.group_samples.get(g, 0) + sum(u.samples for u in ups)
            self.group_layers.setdefault(g, set()).update(key_layer(k) for u in ups for k in u.state)
        if self.tick < max(self.tau.values(), default=0):
            return global_state
        # global aggregation: each tensor over the groups that trained it
        group_updates = [DeviceUpdate(g, {k: v for k, v in st.items() if key_layer(k) in self.group_layers[g]},
                                      self.group_samples[g]) for g, st in self.group_state.items()]
        self.group_state = {}
        return layerwise_average(global_state, group_updates, "samples")
