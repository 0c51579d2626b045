"""The pre-tests' layouts (docs/pretest.md): which layers and ranks each variant trains, the paper's
section 2 figures beside which they are reported, and FixedLayout, the method that trains one layout."""

from __future__ import annotations

import numpy as np

from .errors import UserError
from .methods.base import MethodContext, MethodInfo
from .methods.fedlora import FedLora
from .spec import Ranks

KINDS = ("position", "depth", "ranks")
POSITIONS = ("all", "shallow", "middle", "deep")
DISTRIBUTIONS = ("inc", "dec", "uniform", "random")
SWEEP_RANKS = (1, 2, 4, 8, 16, 32, 64, 128)
PAPER_DEVICES = 10

# The paper's section 2 numbers (RoBERTa-base, 12 layers, SST-2, 10 devices; its Jetson testbed).
PAPER = {
    "position": {"final_accuracy_pct": {"all": 94.3, "shallow": 86.7, "middle": 91.8, "deep": 93.1},
                 "deep_speedup": {"all": 2.1, "shallow": 1.6, "middle": 1.2}},
    "depth": {"latency_ms_per_layer": 5.0, "memory_mb_per_layer": 107.0, "latency_increase_pct": 252.0,
              "memory_increase_pct": 221.0, "accuracy_gain_1_to_3_pct": 5.3, "accuracy_gain_3_to_12_pct": 1.4},
    "ranks": {"gain_pct": {"all": 0.41, "shallow": 0.23, "middle": 2.67, "deep": 1.3},
              "distributions_budget": 96, "inc": [4, 4, 5, 6, 7, 7, 8, 9, 10, 11, 12, 13], "inc_accuracy_pct": 94.9,
              "inc_margin_pct": 1.6},
}


class PretestError(UserError, ValueError):
    """A pre-test request that cannot run (kind, layers, ranks); the message names the fix."""


# ---------------------------------------------------------------- layouts
def position_layers(L: int) -> dict[str, list[int]]:
    """All layers and their shallow, middle and deep thirds (the first thirds take the extra layers
    when L is not a multiple of 3; the paper's 12 layers: 0-3, 4-7, 8-11)."""
    if L < 3:
        raise PretestError(f"the position pre-test needs a model of at least 3 layers (thirds), this one has {L}")
    thirds = [list(map(int, part)) for part in np.array_split(np.arange(L), 3)]
    return {"all": list(range(L)), "shallow": thirds[0], "middle": thirds[1], "deep": thirds[2]}


def depth_layers(L: int, depth: int) -> list[int]:
    """The top `depth` layers (the paper's LoRA depth: continuous layers from the output)."""
    if not 1 <= depth <= L:
        raise PretestError(f"depth {depth} is outside 1..{L} (the model has {L} layers)")
    return list(range(L - depth, L))


def _apportion(exact: np.ndarray, total: int) -> list[int]:
    """Integers >= 1 close to `exact` summing to `total` (largest remainder)."""
    base = np.maximum(np.floor(exact).astype(int), 1)
    left = total - int(base.sum())
    order = np.argsort(-(exact - np.floor(exact)), kind="stable")
    i = 0
    while left != 0:
        j = order[i % len(order)] if left > 0 else order[::-1][i % len(order)]
        if left > 0:
            base[j] += 1
            left -= 1
        elif base[j] > 1:
            base[j] -= 1
            left += 1
        i += 1
    return [int(x) for x in base]


def rank_distribution(kind: str, L: int, budget: int, seed: int = 0) -> list[int]:
    """Ranks of layers 0..L-1 (input to output) summing to `budget`: inc (a linear ramp from half to
    1.5x the mean rank; the paper's 96 over 12 layers: 4..12 against its 4..13), dec (inc reversed),
    uniform (the mean, any remainder on the deepest layers), random (1 each plus a seeded uniform
    multinomial draw of the rest)."""
    if budget < L:
        raise PretestError(f"a rank budget of {budget} cannot give each of the {L} layers a rank >= 1")
    mean = budget / L
    if kind == "inc":
        ramp = mean * (0.5 + np.arange(L) / max(L - 1, 1)) if L > 1 else np.array([float(budget)])
        return sorted(_apportion(ramp, budget))   # sorted: rounding at rank 1 must not break the ramp
    if kind == "dec":
        return rank_distribution("inc", L, budget, seed)[::-1]
    if kind == "uniform":
        q, r = divmod(budget, L)
        return [q + (1 if l >= L - r else 0) for l in range(L)]
    if kind == "random":
        rng = np.random.default_rng([seed, 5005])
        return [1 + int(x) for x in rng.multinomial(budget - L, np.full(L, 1.0 / L))]
    raise PretestError(f"unknown rank distribution {kind!r}; use one of {', '.join(DISTRIBUTIONS)}")


class FixedLayout(FedLora):
    """The same layout (layer -> rank) on every device every round, aggregated with FedAvg: FedLoRA
    on chosen layers. The global adapter is the layout itself."""

    def __init__(self, ctx: MethodContext, ranks: Ranks, name: str = "layout", weighting: str = "samples"):
        if not ranks:
            raise PretestError("a layout needs at least one layer")
        L = ctx.spec.num_layers
        bad = sorted(l for l in ranks if not 0 <= l < L)
        if bad:
            raise PretestError(f"layers {bad} are outside the model's layers 0..{L - 1}")
        super().__init__(ctx, rank=max(ranks.values()), weighting=weighting)
        self.ranks = {int(l): int(r) for l, r in sorted(ranks.items())}
        self.info = MethodInfo(name, "fedlora")

    def global_ranks(self) -> Ranks:
        return dict(self.ranks)
