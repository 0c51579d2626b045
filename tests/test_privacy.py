"""Differential privacy (issue 16, docs/privacy.md): the accountant against closed forms, the
noise scale per rule, clipping bounding every device's contribution to every aggregate
(hypothesis), refusals, and a run end to end."""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from scipy.optimize import brentq
from scipy.stats import norm

from fedlegend.config import ConfigError, build_config
from fedlegend.methods import METHODS
from fedlegend.methods.aggregation import DeviceUpdate, layerwise_average, zero_pad, zero_pad_average
from fedlegend.privacy import RULES, accountant, refusal
from fedlegend.privacy.mechanism import (clip_update, linear_stds, noisy_linear, noisy_products, product_sensitivity,
                                         spectral_bound, update_norm)
from fedlegend.privacy.support import REFUSED, max_share


# ---------------------------------------------------------------- the accountant
def rdp_epsilon_by_hand(sigma, rounds, delta):
    """RDP of the Gaussian mechanism (sampling rate 1): T alpha / (2 sigma^2) (Mironov 2017, Prop. 7),
    composed over T rounds, converted with Balle et al. 2020 Thm. 21, minimised over the same orders."""
    return min(rounds * a / (2 * sigma**2) + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1)
               for a in accountant.orders())


def exact_gaussian_epsilon(sigma, rounds, delta):
    """The tight epsilon of T Gaussian mechanisms (sensitivity 1, std sigma) = one with mu = sqrt(T) / sigma
    (Balle & Wang 2018, Thm. 8): delta(eps) = Phi(mu/2 - eps/mu) - e^eps Phi(-mu/2 - eps/mu)."""
    mu = math.sqrt(rounds) / sigma
    return brentq(lambda e: norm.cdf(mu / 2 - e / mu) - math.exp(e) * norm.cdf(-mu / 2 - e / mu) - delta, 0, 500)


@pytest.mark.parametrize("sigma,rounds,delta", [(1.0, 1, 1e-5), (3.826, 36, 1e-5), (24.3, 36, 1e-5), (0.9, 2, 1e-3)])
def test_accountant_matches_the_closed_form_and_bounds_the_exact_epsilon(sigma, rounds, delta):
    eps = accountant.epsilon(sigma, rounds, delta)
    assert eps == pytest.approx(rdp_epsilon_by_hand(sigma, rounds, delta), rel=1e-9)
    exact = exact_gaussian_epsilon(sigma, rounds, delta)
    assert exact <= eps <= 1.35 * exact   # RDP is an upper bound, and not a loose one


def test_accountant_known_value():
    # one Gaussian mechanism with sigma = 1, delta = 1e-5: the classical calibration sigma = sqrt(2 ln(1.25 / delta))
    # / eps (Dwork & Roth 2014, Thm. A.1) gives eps = 4.845; the exact (analytic) epsilon, 4.38, is below it
    classical = math.sqrt(2 * math.log(1.25 / 1e-5))
    assert classical == pytest.approx(4.845, abs=1e-3)
    assert exact_gaussian_epsilon(1.0, 1, 1e-5) == pytest.approx(4.38, abs=0.01) and 4.38 < classical
    assert accountant.epsilon(1.0, 1, 1e-5) == pytest.approx(rdp_epsilon_by_hand(1.0, 1, 1e-5))
    assert accountant.epsilon(2.0, 0, 1e-5) == 0.0


@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
def test_calibrated_noise_spends_the_target_over_the_planned_rounds(target):
    sigma = accountant.calibrate(target, 36, 1e-5)
    assert accountant.epsilon(sigma, 36, 1e-5) <= target
    assert accountant.epsilon(sigma * 0.99, 36, 1e-5) > target
    # the epsilon of T rounds at sigma equals one round at sigma / sqrt(T) (q = 1: RDP adds up)
    assert accountant.epsilon(sigma, 36, 1e-5) == pytest.approx(accountant.epsilon(sigma / 6, 1, 1e-5))
    assert accountant.rounds_within(sigma, target, 1e-5, 100) == 36


def test_fixed_noise_stops_the_run_when_the_budget_is_spent():
    from fedlegend.privacy import last_round
    cfg = build_config({}, {"run.rounds": 50, "privacy.epsilon": 8.0, "privacy.noise_multiplier": 4.0})
    stop = last_round(cfg)
    assert 1 <= stop < 50
    assert accountant.epsilon(4.0, stop, 1e-5) <= 8.0 < accountant.epsilon(4.0, stop + 1, 1e-5)
    assert last_round(build_config({}, {"run.rounds": 50})) == 50


# ---------------------------------------------------------------- noise scale per rule
def upd(device, state, samples=10):
    return DeviceUpdate(device, state, samples)


def test_layerwise_noise_is_sigma_c_over_the_layers_holders():
    """A layer averaged over n_l devices gets noise sigma C / n_l; one nobody trained gets none."""
    shape = (200, 200)
    g = {f"layers.{l}.q.lora_A": torch.zeros(shape) for l in range(3)}
    ups = [upd(i, {k: torch.zeros(shape) for k in g if int(k.split(".")[1]) >= i}) for i in range(2)]
    # layer 0: device 0 only (n = 1); layers 1 and 2: devices 0 and 1 (n = 2)
    sigma, c = 2.0, 0.5
    stds = linear_stds(RULES["legend"], type("M", (), {"weighting": "mean"})(), ups, list(g), c, sigma)
    assert stds == pytest.approx({"layers.0.q.lora_A": sigma * c, "layers.1.q.lora_A": sigma * c / 2,
                                  "layers.2.q.lora_A": sigma * c / 2})
    out = noisy_linear(layerwise_average(g, ups), stds, torch.Generator().manual_seed(0))
    for k, s in stds.items():
        assert out[k].std().item() == pytest.approx(s, rel=0.02)
        assert out[k].mean().item() == pytest.approx(0.0, abs=4 * s / 200)


def test_sample_weighted_noise_follows_the_largest_weight():
    """Weighting by samples: device i's share in tensor k is n_i / sum n, so the noise is sigma C max share."""
    g = {"head.weight": torch.zeros(2, 4)}
    ups = [upd(0, dict(g), samples=30), upd(1, dict(g), samples=10), upd(2, dict(g), samples=10)]
    assert max_share(ups, "head.weight", lambda u: float(u.samples)) == pytest.approx(0.6)
    stds = linear_stds(RULES["fedra"], None, ups, list(g), 1.5, 3.0)
    assert stds["head.weight"] == pytest.approx(3.0 * 1.5 * 0.6)


def test_product_noise_and_sensitivity_by_hand():
    k, c = 2.0, 0.5
    assert product_sensitivity(c, k) == pytest.approx(c * (math.sqrt(2) * 2.0 + 0.25))
    assert product_sensitivity(c, 0.0) == pytest.approx(c)   # never below the head's C
    a = torch.zeros(4, 300)
    a[0, 0] = 2.0
    assert spectral_bound([{"layers.0.q.lora_A": a, "layers.0.q.lora_B": torch.zeros(300, 4)}]) == pytest.approx(2.0)
    g = {"layers.0.q.lora_A": torch.zeros(4, 300), "layers.0.q.lora_B": torch.zeros(300, 4)}
    ups = [upd(i, dict(g), samples=s) for i, s in enumerate((10, 30))]
    # zero factors: the released module is the SVD of pure noise of std sigma * C_prod * max w = 2 * 1 * 0.75
    new = noisy_products(g, ups, lambda u: float(u.samples), 1.0, 2.0, torch.Generator().manual_seed(0))
    dense = new["layers.0.q.lora_B"] @ new["layers.0.q.lora_A"]
    # the top singular value of a 300 x 300 Gaussian matrix of std s is about 2 s sqrt(300)
    assert torch.linalg.matrix_norm(dense, ord=2).item() == pytest.approx(2 * 1.5 * math.sqrt(300), rel=0.1)


# ---------------------------------------------------------------- clipping bounds every contribution (property)
TOL = 1e-3   # float32 rounding: the bound is tight (a clipped update has norm C exactly)


@st.composite
def fleets(draw, full_rank=False):
    """2-4 devices, each training a random non-empty subset of 3 layers' A (rank 1-4) plus the head,
    with random update scales (up to 50 C) and sample counts."""
    n = draw(st.integers(2, 4))
    seed = draw(st.integers(0, 2**31))
    gen = torch.Generator().manual_seed(seed)
    g = {f"layers.{l}.q.lora_A": torch.randn(4, 3, generator=gen) for l in range(3)} | {"head.w": torch.randn(2, 3, generator=gen)}
    g |= {f"layers.{l}.q.lora_B": torch.randn(3, 4, generator=gen) for l in range(3)}
    devices = []
    for i in range(n):
        layers = draw(st.sets(st.integers(0, 2), min_size=1))
        rank = 4 if full_rank else draw(st.integers(1, 4))
        scale = draw(st.floats(0.0, 50.0))
        payload = {"head.w": g["head.w"]}
        for l in layers:
            payload[f"layers.{l}.q.lora_A"] = g[f"layers.{l}.q.lora_A"][:rank]
            payload[f"layers.{l}.q.lora_B"] = g[f"layers.{l}.q.lora_B"][:, :rank]
        trained = {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in payload.items()}
        devices.append((i, payload, trained, draw(st.integers(1, 100))))
    return g, devices


def _contribution_norm(g, devices, j, clip, aggregate, weight):
    """sum_k ||agg_k(all) - agg_k(device j zeroed out)||^2 / (C max share_k)^2: device j's move of the
    released vector in units of the noise (must be <= 1)."""
    def ups(zero):
        return [DeviceUpdate(i, p if i == zero else clip_update(t, p, clip), s) for i, p, t, s in devices]
    full, without = aggregate(g, ups(None)), aggregate(g, ups(j))
    total = 0.0
    for k in g:
        share = max_share(ups(None), k, weight)
        diff = float((full[k].double() - without[k].double()).pow(2).sum())
        if share == 0:
            assert diff == 0
            continue
        total += diff / (clip * share) ** 2
    return total


@settings(max_examples=60, deadline=None)
@given(fleets(full_rank=True), st.floats(0.01, 5.0), st.sampled_from(["mean", "samples"]))
def test_clipping_bounds_every_contribution_to_every_layerwise_aggregate(fleet, clip, weighting):
    g, devices = fleet
    for i, p, t, s in devices:
        assert update_norm(clip_update(t, p, clip), p) <= clip * (1 + TOL)
    # the layer-wise rule (LEGEND, FedLoRA): every device at the global rank, on the layers it trains
    weight = (lambda u: 1.0) if weighting == "mean" else (lambda u: float(u.samples))
    for j in range(len(devices)):
        assert _contribution_norm(g, devices, j, clip, lambda gs, us: layerwise_average(gs, us, weighting),
                                  weight) <= 1 + TOL


@settings(max_examples=60, deadline=None)
@given(fleets(), st.floats(0.01, 5.0))
def test_clipping_bounds_every_contribution_to_the_zero_padded_average(fleet, clip):
    """HetLoRA (samples): ranks differ per device, padded rows add zeros; the bound still holds."""
    g, devices = fleet
    rule = lambda gs, us: zero_pad_average(gs, us, lambda u, prefix: float(u.samples))
    for j in range(len(devices)):
        assert _contribution_norm(g, devices, j, clip, rule, lambda u: float(u.samples)) <= 1 + TOL


@settings(max_examples=60, deadline=None)
@given(fleets(), st.floats(0.01, 5.0))
def test_clipping_bounds_every_contribution_to_the_sum_of_products(fleet, clip):
    """FlexLoRA / HLoRA: device j's move of every module's sum of w_i B_i A_i, in units of
    C_prod max w, plus its heads' move in units of C max w, is at most 1."""
    g, devices = fleet
    k = spectral_bound([p for _, p, _, _ in devices])
    c_prod = product_sensitivity(clip, k)
    for j in range(len(devices)):
        total = 0.0
        for prefix in [f"layers.{l}.q" for l in range(3)]:
            hs = [(i, p, t, s) for i, p, t, s in devices if prefix + ".lora_A" in p]
            if not any(i == j for i, *_ in hs):
                continue
            w = {i: s / sum(s for *_, s in hs) for i, _, _, s in hs}
            _, p, t, _ = devices[j]
            ct = clip_update(t, p, clip)
            move = w[j] * (ct[prefix + ".lora_B"] @ ct[prefix + ".lora_A"] - p[prefix + ".lora_B"] @ p[prefix + ".lora_A"])
            total += float(move.double().pow(2).sum()) / (c_prod * max(w.values())) ** 2
        share = max(s for *_, s in devices) / sum(s for *_, s in devices)
        _, p, t, _ = devices[j]
        ct = clip_update(t, p, clip)
        total += float((devices[j][3] / sum(s for *_, s in devices) * (ct["head.w"] - p["head.w"])).pow(2).sum()) / (
            clip * share) ** 2
        assert total <= 1 + TOL


# ---------------------------------------------------------------- refusals
def test_every_registered_method_is_covered_or_refused_with_a_reason():
    for name in METHODS:
        assert (name in RULES) != (name in REFUSED), name


@pytest.mark.parametrize("name,words", [("flora", "not summed"), ("fedex-lora", "not a sum"),
                                        ("fedadapter", "training losses"), ("hierfedlora", "without noise")])
def test_a_method_that_is_not_a_sum_refuses_dp(name, words):
    with pytest.raises(ConfigError, match=f"privacy: method '{name}' cannot run with differential privacy.*{words}"):
        build_config({}, {"method.name": name, "privacy.epsilon": 3.0})
    build_config({}, {"method.name": name})   # without DP it runs


def test_hetlora_needs_data_independent_weights():
    with pytest.raises(ConfigError, match="weighting = 'samples'"):
        build_config({}, {"method.name": "hetlora", "privacy.epsilon": 3.0})
    with pytest.raises(ConfigError, match="self_pruning"):
        build_config({}, {"method.name": "hetlora", "method.hetlora.weighting": "samples",
                          "method.hetlora.self_pruning": True, "privacy.noise_multiplier": 1.0})
    build_config({}, {"method.name": "hetlora", "method.hetlora.weighting": "samples", "privacy.epsilon": 3.0})
    assert refusal("not-a-method", {}).startswith("method 'not-a-method' declares no differential-privacy rule")


# ---------------------------------------------------------------- end to end (real model, tiny run)
@pytest.mark.slow
@pytest.mark.parametrize("name,extra", [("legend", {}), ("flexlora", {}),
                                        ("hetlora", {"method.hetlora.weighting": "samples"})])
def test_dp_run_records_epsilon_and_clips_every_reply(name, extra, tiny_cfg, tmp_path, monkeypatch):
    from fedlegend.engine import local
    from fedlegend.rundir import run_experiment

    norms = []
    device_side = local.privacy.device_side

    def spy(exp, a, res):
        out = device_side(exp, a, res)
        from fedlegend.methods.base import trained_part
        norms.append(update_norm(out.state, trained_part(a.payload, a.plan)))
        return out

    monkeypatch.setattr(local.privacy, "device_side", spy)
    cfg = tiny_cfg(**{"method.name": name, "privacy.epsilon": 8.0, "privacy.clip": 0.05, **extra})
    summary = run_experiment(cfg, tmp_path / "dp", progress=False)
    recs = [json.loads(l) for l in (tmp_path / "dp" / "records.jsonl").read_text().splitlines()]
    eps = [r["epsilon"] for r in recs]
    assert eps[0] < eps[1] <= 8.0 and eps[1] == pytest.approx(8.0, rel=0.01)
    assert summary["epsilon"] == eps[-1] and summary["delta"] == 1e-5
    assert summary["noise_multiplier"] == pytest.approx(accountant.calibrate(8.0, 2, 1e-5))
    assert norms and max(norms) <= 0.05 * (1 + 1e-4)


@pytest.mark.slow
def test_no_dp_records_carry_no_privacy_fields_and_local_mode_noises_on_the_device(tiny_cfg, run_round):
    from fedlegend.experiment import build_experiment
    from fedlegend.methods.base import Estimator

    exp = build_experiment(tiny_cfg(**{"method.name": "fedlora"}))
    plain = run_round(exp, 1, exp.initial_state, Estimator())
    assert "epsilon" not in plain.record
    exp.cfg = tiny_cfg(**{"method.name": "fedlora", "privacy.noise_multiplier": 1.0, "privacy.clip": 0.1,
                          "privacy.mode": "local"})
    noisy = run_round(exp, 1, exp.initial_state, Estimator())
    assert noisy.record["epsilon"] == pytest.approx(accountant.epsilon(1.0, 1, 1e-5))
    # local mode: each device adds N(0, (sigma C)^2) = N(0, 0.01) to every element it trained
    delta = torch.cat([(noisy.state[k] - exp.initial_state[k]).flatten() for k in exp.initial_state])
    assert 0.02 < delta.std().item() < 0.1   # the average of 3 devices' noise: 0.1 / sqrt(3)
