"""LEGEND: adaptive LoRA depth and rank distribution per device.

Liu, Liao, Xu, Xu, Liu, Qian. "Adaptive Parameter-Efficient Federated Fine-Tuning on
Heterogeneous Devices". Section 4: capacity estimation (eq. 8-9), LoRA
configuration by LCD (Algorithm 1, eq. 10-16), layer-wise aggregation (eq. 17), assignment
(eq. 19). Equation numbers are given beside the code that implements them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..devices import step_work_flops
from ..errors import UserError
from ..spec import AdapterState, Ranks
from .aggregation import DeviceUpdate, layerwise_average, select_layers
from .base import Aggregated, Estimate, LoraPlan, Method, MethodContext, MethodInfo, RoundView, Skip, assignment


class PlanError(UserError, ValueError):
    """A LEGEND setting that admits no valid plan (a config problem): the message names the fix."""


# ---------------------------------------------------------------- pure functions
def rank_distribution(num_layers: int, rank_budget: int, rank_step: int) -> list[int]:
    """Alg. 1 line 4: r_l = r_{l-1} + lambda (eq. 10), the largest r_0 with sum r_l <= psi (eq. 11)."""
    ramp = rank_step * num_layers * (num_layers - 1) // 2
    r0 = (rank_budget - ramp) // num_layers
    if r0 < 1:
        need = num_layers + ramp
        raise PlanError(f"rank budget psi={rank_budget} is too small for {num_layers} layers with step "
                        f"lambda={rank_step}: it needs psi >= {need} (raise method.legend.rank_budget or "
                        "lower rank_step)")
    return [r0 + rank_step * l for l in range(num_layers)]


def top_layers(num_layers: int, depth: int) -> list[int]:
    """L_i = [L - k, L - 1]: the top-k transformer layers."""
    return list(range(num_layers - depth, num_layers))


def completion_time(est: Estimate, depth: int, ranks: list[int]) -> float:
    """Eq. 12: t_i = t-hat_i + k_i mu_i + sum_{l in L_i} r_l beta_i."""
    L = len(ranks)
    return est.fixed_s + depth * est.mu + sum(ranks[L - depth:]) * est.beta


def mean_waiting(times: list[float]) -> float:
    """Eq. 13: W = (1/n) sum_i (max_j t_j - t_i)."""
    t_max = max(times)
    return sum(t_max - t for t in times) / len(times)


def depth_gap(num_layers: int, t_max: float, t_min: float) -> int:
    """Alg. 1 line 2: k^h = ceil(L (t^h - t_min) / t^h)."""
    if t_max <= 0:
        return 0
    return int(math.ceil(num_layers * (t_max - t_min) / t_max - 1e-9))


def initial_depth(num_layers: int, gap: int, t_i: float, t_max: float, t_min: float) -> int:
    """Alg. 1 line 3, read as the text says it should work: the fastest device gets L, the
    slowest L - k^h, the others in between in proportion to their time gap to the slowest:
        k_i = L - k^h + round(k^h (t^h - t_i) / (t^h - t_min)).
    (As printed, ceil(k^h (t^h - t_i)/t^h) gives the slowest device depth 0 and the fastest
    less than k^h, which contradicts the text; docs/legend.md says more.)"""
    if t_max <= t_min:
        return num_layers
    return num_layers - gap + int(round(gap * (t_max - t_i) / (t_max - t_min)))


def fits_budget(flops: float, upload_bytes: float, budget: tuple[float, float]) -> bool:
    """Eq. 14-15: computing and communication consumption within the device's budgets."""
    C, B = budget
    return flops <= C and upload_bytes <= B


@dataclass(frozen=True)
class DeviceCost:
    """Per-device cost functions of depth, for the greedy adjustment."""
    time: list[float]       # time[k] for k = 0..L (eq. 12)
    feasible: list[bool]    # feasible[k] under eq. 14-15


def lcd(costs: dict[int, DeviceCost], num_layers: int, min_depth: int = 1,
        epsilon_s: float | None = None, fill_idle: bool = True) -> dict[int, int]:
    """Algorithm 1 (LCD): the depth k_i of every device.

    1. Full-depth completion times t_i (eq. 12 with k = L) give the gap k^h (line 2) and
       each device's initial depth (line 3, see initial_depth).
    2. Greedy adjustment (line 5): lower the depth until eq. 14-15 hold; while the mean
       waiting W (eq. 13) exceeds epsilon, take one layer off the slowest device; then,
       if fill_idle, give a device more layers while it still finishes no later than the
       round's slowest device (it would otherwise wait idle: eq. 13 shrinks, t^h does not grow).
    A device feasible at no depth >= min_depth gets depth 0 (it sits the round out).
    """
    L = num_layers
    if not 1 <= min_depth <= L:
        raise PlanError(f"min_depth={min_depth} must be within 1..{L} (the model has {L} layers)")
    full = {i: c.time[L] for i, c in costs.items()}
    t_max, t_min = max(full.values()), min(full.values())
    gap = min(depth_gap(L, t_max, t_min), L - min_depth)
    depth = {i: max(min_depth, min(L, initial_depth(L, gap, full[i], t_max, t_min))) for i in costs}
    for i, c in costs.items():                       # eq. 14-15
        while depth[i] >= min_depth and not c.feasible[depth[i]]:
            depth[i] -= 1
        if depth[i] < min_depth:
            depth[i] = 0
    active = [i for i in costs if depth[i] > 0]
    if not active:
        return depth

    def times() -> list[float]:
        return [costs[i].time[depth[i]] for i in active]

    if epsilon_s is not None:                         # eq. 13: W <= epsilon
        while mean_waiting(times()) > epsilon_s:
            slowest = max(active, key=lambda i: costs[i].time[depth[i]])
            if depth[slowest] <= min_depth:
                break
            depth[slowest] -= 1
    if fill_idle:
        t_round = max(times())
        for i in active:
            c = costs[i]
            while depth[i] < L and c.feasible[depth[i] + 1] and c.time[depth[i] + 1] <= t_round:
                depth[i] += 1
    return depth


# ---------------------------------------------------------------- the method
class Legend(Method):
    """LEGEND (Liu et al.). Ablations from fig. 13: `full_depth` (w/o LD), `uniform_ranks` (w/o RD).

    Before a device's first status report there is nothing to estimate from, so its first
    round is a profiling round at full depth (the device then reports eq. 8-9's inputs).
    """

    info = MethodInfo("legend", "legend")

    def __init__(self, ctx: MethodContext, rank_budget: int = 48, rank_step: int = 1, rho: float = 0.8,
                 epsilon_s: float | None = None, min_depth: int = 1, fill_idle: bool = True,
                 weighting: str = "mean", uniform_ranks: bool = False, full_depth: bool = False):
        super().__init__(ctx)
        L = self.L
        if min_depth > L:
            raise PlanError(f"min_depth={min_depth} is larger than the model's {L} layers; use 1..{L}")
        self.info = MethodInfo("legend", "legend", rho=rho)
        self.ranks = rank_distribution(L, rank_budget, 0 if uniform_ranks else rank_step)
        self.epsilon_s = epsilon_s
        self.min_depth = min_depth
        self.fill_idle = fill_idle
        self.weighting = weighting
        self.full_depth = full_depth

    def global_ranks(self) -> Ranks:
        return {l: r for l, r in enumerate(self.ranks)}

    def layer_ranks(self, depth: int) -> Ranks:
        return {l: self.ranks[l] for l in top_layers(self.L, depth)}

    def _cost(self, device: int, est: Estimate, budget: tuple[float, float]) -> DeviceCost:
        spec, ctx = self.ctx.spec, self.ctx
        time, feasible = [], []
        for k in range(self.L + 1):
            time.append(completion_time(est, k, self.ranks))
            if k == 0:
                feasible.append(True)
                continue
            ranks = self.layer_ranks(k)
            f, b = step_work_flops(spec, ranks, set(ranks), ctx.batch_size, ctx.nominal_width, ctx.nominal_outputs)
            flops = ctx.steps_of(device) * (f + b)      # the device's steps this round (its epoch, if epochs)
            up = 4 * (sum(r * spec.lora_params_per_rank(l) for l, r in ranks.items()) + spec.head_params())
            feasible.append(fits_budget(flops, up, budget))
        return DeviceCost(time, feasible)

    def depths(self, view: RoundView) -> dict[int, int]:
        """Every device's LoRA depth this round: full depth before its first report, else LCD."""
        known = [i for i in view.devices if i in view.estimates]
        depth = {i: self.L for i in view.devices}
        if known and not self.full_depth:
            costs = {i: self._cost(i, view.estimates[i], view.budget(i)) for i in known}
            depth.update(lcd(costs, self.L, self.min_depth, self.epsilon_s, self.fill_idle))
        return depth

    def configure(self, view, global_state):
        out = {}
        for i, k in self.depths(view).items():
            if k == 0:
                out[i] = Skip("no feasible plan this round")
                continue
            ranks = self.layer_ranks(k)
            out[i] = assignment(LoraPlan(i, ranks), select_layers(global_state, ranks))   # eq. 19
        return out

    def aggregate(self, round_, global_state, updates):
        return Aggregated(layerwise_average(global_state, updates, self.weighting))   # eq. 17
