"""Where privacy meets the round: the device clips (and, for local DP, noises) its reply; the
server noises what it releases; every record carries the epsilon spent so far.

The engines call `device_side` after local training and `server_side` after the method's
aggregate (engine/local.py's run_device and finish_round, which the Flower engine runs too).
With [privacy] off both return their input unchanged, so runs without DP keep their numbers.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
import torch

from ..methods.aggregation import DeviceUpdate, lora_pairs
from ..methods.base import Aggregated, trained_part
from ..spec import AdapterState
from .accountant import calibrate, epsilon, rounds_within
from .mechanism import (clip_update, linear_stds, local_noise, noisy_linear, noisy_products, product_sensitivity,
                        spectral_bound)
from .support import RULES


@dataclass(frozen=True)
class Settings:
    """The run's mechanism: central or local noise, clip C, delta, the noise multiplier sigma (given,
    or calibrated so that the planned rounds spend the target epsilon) and the last round the
    budget allows (a given sigma with a target epsilon stops the run there)."""
    mode: str
    clip: float
    delta: float
    noise_multiplier: float
    target_epsilon: float | None
    last_round: int
    seeded_noise: bool


@lru_cache(maxsize=32)
def _settings(mode, clip, delta, sigma, target, rounds, seeded) -> Settings:
    if sigma is None:   # calibrate over the planned rounds (sampling rate 1: every device, every round)
        sigma = calibrate(target, rounds, delta)
        last = rounds
    else:
        last = rounds if target is None else rounds_within(sigma, target, delta, rounds)
    return Settings(mode, clip, delta, sigma, target, last, seeded)


def settings(cfg) -> Settings | None:
    """The run's privacy settings, or None when [privacy] asks for none (no epsilon, no noise)."""
    p = cfg.privacy
    if p.epsilon is None and p.noise_multiplier is None:
        return None
    return _settings(p.mode, p.clip, p.delta, p.noise_multiplier, p.epsilon, cfg.run.rounds, p.seeded_noise)


def last_round(cfg) -> int:
    """The run's last round: the planned one, or earlier when a fixed sigma spends the target epsilon."""
    s = settings(cfg)
    return cfg.run.rounds if s is None else s.last_round


def noise_generator(s: Settings, key: list[int]) -> torch.Generator:
    """Seeded noise (reproducible experiments, keyed like every draw of a round) or, for a deployment,
    from the OS's secret source: noise an attacker can regenerate protects nothing."""
    seed = int(np.random.default_rng(key).integers(2**62)) if s.seeded_noise else secrets.randbits(62)
    return torch.Generator().manual_seed(seed)


def device_side(exp, dispatch, result):
    """The device's reply under DP: its update clipped to C as one vector (and, in local mode,
    N(0, (sigma C)^2) added to every element before it leaves the device)."""
    s = settings(exp.cfg)
    if s is None:
        return result
    payload = trained_part(dispatch.payload, dispatch.plan)
    state = clip_update(result.state, payload, s.clip)
    if s.mode == "local":
        gen = noise_generator(s, [exp.cfg.run.seed, 8, dispatch.device, dispatch.round])
        state = local_noise(state, s.noise_multiplier * s.clip, gen)
    return replace(result, state=state)


def server_side(exp, rp, global_state: AdapterState, updates: list[DeviceUpdate], agg: Aggregated) -> Aggregated:
    """The released aggregate under central DP: the method's aggregate of the clipped updates plus
    Gaussian noise per tensor (products: on the dense sum before the SVD). Local mode adds none here."""
    s = settings(exp.cfg)
    if s is None or s.mode == "local" or not updates:
        return agg
    method = exp.method
    rule = RULES[method.info.name]
    gen = noise_generator(s, [exp.cfg.run.seed, 7, rp.round])
    pairs = {p + suffix for p in lora_pairs(global_state) for suffix in (".lora_A", ".lora_B")}
    state = dict(agg.state)
    if rule.kind == "product":
        k = spectral_bound([rp.assignments[u.device].payload for u in updates])
        state.update(noisy_products(global_state, updates, lambda u: rule.weight(method, u),
                                    product_sensitivity(s.clip, k), s.noise_multiplier, gen))
        linear_keys = [key for key in global_state if key not in pairs]
    else:
        linear_keys = list(global_state)
    lora = [key for key in linear_keys if key in pairs]
    rest = [key for key in linear_keys if key not in pairs]
    stds = {**linear_stds(rule, method, updates, lora, s.clip, s.noise_multiplier),
            **linear_stds(replace(rule, weight=rule.head_weight), method, updates, rest, s.clip, s.noise_multiplier)}
    return replace(agg, state=noisy_linear(state, stds, gen))


def record_fields(cfg, round_: int) -> dict:
    """What a record says about privacy after round `round_` (nothing without DP)."""
    s = settings(cfg)
    if s is None:
        return {}
    return {"epsilon": epsilon(s.noise_multiplier, round_, s.delta), "delta": s.delta,
            "noise_multiplier": s.noise_multiplier}
