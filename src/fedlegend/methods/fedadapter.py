"""FedAdapter: bottleneck adapters on the top layers, with a progressive (depth, width) search.

Cai, Wu, Wang, Lin, Xu. "FedAdapter: Efficient Federated Learning for Modern NLP" (MobiCom
2023, there named AdaFL; arXiv 2205.10162). Devices train bottleneck adapters (our module:
fedlegend.hosts.bottleneck, see there why not a library) on the top `depth` transformer layers, of
bottleneck `width`, plus the task head. The configuration is upgraded progressively (shallow
and narrow first, deeper and wider later) by sideline trials: every `trial_rounds` rounds
the server splits the devices into trial groups that train the current configuration, a
deeper one and a wider one, and switches to the configuration that progressed best.

Readings chosen where the paper leaves a choice open (or where our harness differs):
- Trial groups: three, of (nearly) equal size, the devices shuffled by a generator keyed by
  (seed, period) and dealt round-robin: current (depth, width), deeper (depth + depth_step,
  width), wider (depth, width * width_factor). A candidate past the caps (depth L,
  max_width) is not tried; with fewer devices than candidates, the later candidates get none.
- Each trial group trains its own copy of the model for the whole period, started from the
  global adapter at the period's start (the paper runs the trial configurations as parallel
  sideline training). At the period's end the winner's model becomes the global adapter and
  every device continues from it; the other groups' work is discarded (the cost of the
  trials that LEGEND's section 7 points at). Between period ends the global adapter
  (evaluated, exported) is the current configuration group's model.
- Progress: what the server sees of a device each round is its reported training loss and
  time. Per group and round: the sample-weighted mean loss of its devices and the round time
  of the group alone (its slowest member). A group's progress is the training-loss decrease
  per virtual second: minus the least-squares slope of its loss against its cumulative time
  over the period (>= 2 rounds needed). The server upgrades to the group with the largest
  progress; a tie or a better current group keeps the configuration. The paper compares the
  trial groups' model accuracy gain per unit time; we use the training loss because the
  server holds no data of its own (the loss is what devices report).
- Once neither upgrade is possible, every device trains the current configuration.
- Global adapter: every layer at max_width (global_ranks). A configuration of (k, w)
  uses layers L-k..L-1 and the first w hidden units of each adapter (down.weight[:w],
  down.bias[:w], up.weight[:, :w]); the rest stays at its initial value, where up is zero,
  so the global adapter computes exactly its configuration's function.
- Aggregation (`elementwise_average`): each tensor element is averaged over the devices that
  trained it (their slices zero-padded into the global shape), weighted by samples (FedAvg,
  the paper's base FedNLP) or plainly; elements nobody trained keep their value.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..spec import AdapterState, Ranks, key_layer
from .aggregation import elementwise_average
from .base import Aggregated, LoraPlan, Method, MethodContext, MethodInfo, assignment

Config = tuple[int, int]  # (depth, width)


# ---------------------------------------------------------------- pure functions
def slice_width(t: torch.Tensor, key: str, width: int) -> torch.Tensor:
    """The part of a global adapter tensor a width-w adapter uses (its first w hidden units)."""
    if key.endswith("adapter.down.weight") or key.endswith("adapter.down.bias"):
        return t[:width].clone()
    if key.endswith("adapter.up.weight"):
        return t[:, :width].clone()
    return t.clone()   # up.bias, head


def loss_slope(times: list[float], losses: list[float]) -> float | None:
    """Least-squares slope of loss against cumulative time; None with < 2 points or no time."""
    if len(times) < 2:
        return None
    t = np.cumsum(np.asarray(times, dtype=float))
    y = np.asarray(losses, dtype=float)
    if np.ptp(t) <= 0:
        return None
    return float(np.polyfit(t, y, 1)[0])


def trial_groups(devices: list[int], n_groups: int, seed: int, period: int) -> list[list[int]]:
    """Devices shuffled by (seed, period) and dealt round-robin into n_groups groups."""
    order = np.random.default_rng([seed, 9107, period]).permutation(sorted(devices))
    return [sorted(int(d) for d in order[g::n_groups]) for g in range(n_groups)]


class FedAdapter(Method):
    info = MethodInfo("fedadapter", "fedadapter", host="bottleneck")

    def __init__(self, ctx: MethodContext, init_depth: int = 2, init_width: int = 8, depth_step: int = 2,
                 width_factor: int = 2, max_width: int = 64, trial_rounds: int = 3, search: bool = True,
                 weighting: str = "samples"):
        super().__init__(ctx)
        if not 1 <= init_depth <= self.L:
            raise ValueError(f"fedadapter init_depth must be within 1..{self.L}, got {init_depth}")
        if not 1 <= init_width <= max_width:
            raise ValueError(f"fedadapter needs 1 <= init_width <= max_width, got {init_width}, {max_width}")
        if trial_rounds < 2:
            raise ValueError("fedadapter trial_rounds must be >= 2 (progress is a slope over the period's rounds)")
        self.depth_step, self.width_factor, self.max_width = depth_step, width_factor, max_width
        self.trial_rounds, self.search, self.weighting = trial_rounds, search, weighting
        self.current: Config = (init_depth, init_width)
        self.history: list[dict] = []                 # one entry per finished period (for inspection)
        self._period = -1
        self._round = 0
        self._configs: dict[str, Config] = {}         # group name -> config this period
        self._group_of: dict[int, str] = {}           # device -> group name this period
        self._states: dict[str, AdapterState] = {}    # group name -> its model this period
        self._obs: dict[str, list[tuple[float, float]]] = {}  # group -> [(round time, loss)]

    # ------------------------------------------------------------ configurations
    def global_ranks(self) -> Ranks:
        return {l: self.max_width for l in range(self.L)}

    def config_ranks(self, cfg: Config) -> Ranks:
        depth, width = cfg
        return {l: width for l in range(self.L - depth, self.L)}

    def candidates(self) -> dict[str, Config]:
        depth, width = self.current
        out = {"current": self.current}
        if self.search:
            deeper = (min(self.L, depth + self.depth_step), width)
            wider = (depth, min(self.max_width, width * self.width_factor))
            if deeper != self.current:
                out["deeper"] = deeper
            if wider != self.current:
                out["wider"] = wider
        return out

    def _begin_period(self, period: int, devices: list[int]) -> None:
        self._period = period
        self._configs = self.candidates()
        names = list(self._configs)
        groups = trial_groups(devices, len(names), self.ctx.seed, period)
        self._group_of = {d: name for name, members in zip(names, groups) for d in members}
        self._states = {}
        self._obs = {name: [] for name in names}

    # ------------------------------------------------------------ the contract
    def configure(self, view, global_state):
        self._round = view.round
        period = (view.round - 1) // self.trial_rounds
        if period != self._period:
            self._begin_period(period, view.devices)
        out = {}
        for d in view.devices:
            group = self._group_of.setdefault(d, "current")   # a device first seen mid-period
            ranks = self.config_ranks(self._configs[group])
            out[d] = assignment(LoraPlan(d, ranks), self._slice(self._group_state(group, global_state), ranks))
        return out

    def _group_state(self, group: str, global_state):
        if group not in self._states:
            self._states[group] = dict(global_state)          # every trial starts from the global adapter
        return self._states[group]

    @staticmethod
    def _slice(state, ranks: Ranks):
        """The head plus the plan's layers, each cut to its width."""
        out = {}
        for k, v in state.items():
            layer = key_layer(k)
            if layer is None:
                out[k] = v.clone()
            elif layer in ranks:
                out[k] = slice_width(v, k, ranks[layer])
        return out

    def observe(self, updates) -> None:
        """The devices' reported training loss and time: per group, (its slowest member's time, mean loss)."""
        by_group: dict[str, list] = {}
        for u in updates:
            if math.isnan(u.loss):
                continue
            by_group.setdefault(self._group_of.get(u.device, "current"), []).append(u)
        for group, us in by_group.items():
            n = sum(u.samples for u in us)
            loss = sum(u.loss * u.samples for u in us) / n if n else float(np.mean([u.loss for u in us]))
            self._obs.setdefault(group, []).append((max(u.time_s for u in us), loss))

    def progress(self) -> dict[str, float]:
        """Training-loss decrease per virtual second of each group this period (groups with >= 2 rounds)."""
        out = {}
        for group, obs in self._obs.items():
            slope = loss_slope([t for t, _ in obs], [l for _, l in obs])
            if slope is not None:
                out[group] = -slope
        return out

    def choose(self) -> str:
        """The group to upgrade to: largest progress; the current configuration wins ties."""
        prog = self.progress()
        best = "current"
        for group, p in prog.items():
            if p > prog.get(best, float("-inf")):
                best = group
        return best

    def aggregate(self, round_, global_state, updates):
        self.observe(updates)
        by_group: dict[str, list] = {}
        for u in updates:
            by_group.setdefault(self._group_of.get(u.device, "current"), []).append(u)
        for group, us in by_group.items():
            self._states[group] = elementwise_average(self._group_state(group, global_state), us, self.weighting)
        # also without updates: a period's last round picks the winner from what the trials did
        end_of_period = self._round % self.trial_rounds == 0
        if not end_of_period:
            return Aggregated(self._states.get("current", global_state))
        winner = self.choose() if len(self._configs) > 1 else "current"
        self.history.append({"period": self._period, "round": self._round, "configs": dict(self._configs),
                             "progress": self.progress(), "winner": winner})
        self.current = self._configs.get(winner, self.current)
        new = self._states.get(winner, global_state)
        self._period = -1            # the next configure() starts a new period (from the winner's model)
        return Aggregated(new)
