"""(epsilon, delta) of the run so far, from Opacus's RDP accountant (Mironov 2017; the RDP ->
(epsilon, delta) conversion of Balle et al. 2020, Thm. 21).

Every round releases one Gaussian mechanism of noise multiplier sigma over the devices'
clipped updates (docs/privacy.md says why one per round, whatever the layers). Every device
with a plan takes part in every round (no Poisson sampling of devices), so the sampling rate
is 1 and there is no amplification by subsampling: the RDP of T rounds at order alpha is
T * alpha / (2 sigma^2). Opacus is imported here only, and only when a run asks for privacy
(its import takes seconds).
"""

from __future__ import annotations

import math
import warnings

from ..errors import UserError


class PrivacyBudgetError(UserError, ValueError):
    """A privacy budget that cannot be met (e.g. a target epsilon no noise reaches)."""


def orders() -> list[float]:
    """The RDP orders the accountant minimises over (Opacus's defaults, extended for tiny epsilons)."""
    from opacus.accountants import RDPAccountant

    return list(RDPAccountant.DEFAULT_ALPHAS) + [80.0, 128.0, 256.0, 512.0]


def epsilon(noise_multiplier: float, rounds: int, delta: float, sample_rate: float = 1.0) -> float:
    """The epsilon spent after `rounds` releases of the Gaussian mechanism (noise std =
    noise_multiplier * sensitivity), at `delta`. 0 rounds spend nothing; sigma = 0 spends infinity."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    from opacus.accountants.analysis import rdp

    alphas = orders()
    spent = rdp.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=rounds, orders=alphas)
    with warnings.catch_warnings():   # "optimal order is the largest alpha": only for epsilons far below 0.1
        warnings.simplefilter("ignore", UserWarning)
        eps, _ = rdp.get_privacy_spent(orders=alphas, rdp=spent, delta=delta)
    return float(eps)


def calibrate(target_epsilon: float, rounds: int, delta: float, sample_rate: float = 1.0,
              tolerance: float = 1e-3) -> float:
    """The smallest noise multiplier (to `tolerance`, relative) whose `rounds` releases spend at
    most `target_epsilon`: bisection on the accountant's own epsilon (monotone in sigma)."""
    if target_epsilon <= 0:
        raise PrivacyBudgetError(f"privacy.epsilon must be positive, got {target_epsilon}")
    lo, hi = 0.0, 1.0
    while epsilon(hi, rounds, delta, sample_rate) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise PrivacyBudgetError(f"no noise multiplier reaches epsilon {target_epsilon} over {rounds} rounds "
                                     f"at delta {delta}: raise privacy.epsilon or privacy.delta")
    while hi - lo > tolerance * hi:
        mid = (lo + hi) / 2
        if epsilon(mid, rounds, delta, sample_rate) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi


def rounds_within(noise_multiplier: float, target_epsilon: float, delta: float, max_rounds: int,
                  sample_rate: float = 1.0) -> int:
    """How many rounds (at most max_rounds) the budget allows at this noise: epsilon grows with rounds."""
    lo, hi = 0, max_rounds
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if epsilon(noise_multiplier, mid, delta, sample_rate) <= target_epsilon:
            lo = mid
        else:
            hi = mid - 1
    return lo
