"""Property tests of the aggregation rules on random shapes (hypothesis)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlegend.methods.base import DeviceUpdate, Estimate, layerwise_average
from fedlegend.methods.flexlora import product_average_svd
from fedlegend.methods.hetlora import hetlora_average, tail_energy
from fedlegend.methods.lowrank import rank_by_capacity, svd_factors, truncate, zero_pad

dims = st.integers(2, 9)
ranks = st.integers(1, 5)
SETTINGS = settings(max_examples=25, deadline=None)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@SETTINGS
@given(d_in=dims, d_out=dims, r=ranks, extra=st.integers(0, 4))
def test_zero_pad_keeps_product_and_truncate_round_trips(d_in, d_out, r, extra):
    a, b = rand(r, d_in, seed=1), rand(d_out, r, seed=2)
    ap, bp = zero_pad(a, b, r + extra)
    assert ap.shape == (r + extra, d_in) and bp.shape == (d_out, r + extra)
    assert torch.allclose(bp @ ap, b @ a)
    at, bt = truncate(ap, bp, r)
    assert torch.equal(at, a) and torch.equal(bt, b)


@SETTINGS
@given(d_in=dims, d_out=dims, r=ranks)
def test_orientation_matches_nn_linear(d_in, d_out, r):
    """peft's nn.Linear LoRA computes x A^T B^T, i.e. the weight delta is B @ A of shape (d_out, d_in)."""
    a, b = rand(r, d_in, seed=3), rand(d_out, r, seed=4)
    lin_a = torch.nn.Linear(d_in, r, bias=False).double()
    lin_b = torch.nn.Linear(r, d_out, bias=False).double()
    lin_a.weight.data, lin_b.weight.data = a, b
    x = rand(3, d_in, seed=5)
    assert torch.allclose(lin_b(lin_a(x)), x @ (b @ a).T)


@SETTINGS
@given(d_in=dims, d_out=dims, r=ranks)
def test_svd_factors_best_rank_r_and_nested(d_in, d_out, r):
    delta = rand(d_out, d_in, seed=6)
    a, b = svd_factors(delta, r)
    assert a.shape == (r, d_in) and b.shape == (d_out, r)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(r, s.shape[0])
    best = (u[:, :k] * s[:k]) @ vh[:k]
    assert torch.allclose(b @ a, best, atol=1e-8)              # Eckart-Young optimum
    if r > 1:
        a1, b1 = truncate(a, b, r - 1)                           # truncation = best rank r-1
        k1 = min(r - 1, s.shape[0])
        assert torch.allclose(b1 @ a1, (u[:, :k1] * s[:k1]) @ vh[:k1], atol=1e-8)


def _state(prefix, r, d_in, d_out, seed, head=None):
    st_ = {prefix + ".lora_A": rand(r, d_in, seed=seed), prefix + ".lora_B": rand(d_out, r, seed=seed + 100)}
    st_["head.w"] = head if head is not None else rand(2, seed=seed + 200)
    return st_


@SETTINGS
@given(d_in=dims, d_out=dims, r1=ranks, r2=ranks, n1=st.integers(1, 50), n2=st.integers(1, 50))
def test_flexlora_is_exact_when_rank_allows(d_in, d_out, r1, r2, n1, n2):
    """Mean of products, refactored at a rank >= the mean's rank, reproduces the mean exactly."""
    p = "layers.0.q"
    g_rank = min(d_in, d_out)
    g = _state(p, g_rank, d_in, d_out, 0)
    u1 = DeviceUpdate(0, _state(p, r1, d_in, d_out, 1), n1)
    u2 = DeviceUpdate(1, _state(p, r2, d_in, d_out, 2), n2)
    new = product_average_svd(g, [u1, u2], [n1, n2])
    want = (n1 * u1.state[p + ".lora_B"] @ u1.state[p + ".lora_A"] +
            n2 * u2.state[p + ".lora_B"] @ u2.state[p + ".lora_A"]) / (n1 + n2)
    assert torch.allclose(new[p + ".lora_B"] @ new[p + ".lora_A"], want, atol=1e-8)
    assert new[p + ".lora_A"].shape == g[p + ".lora_A"].shape


@SETTINGS
@given(d_in=dims, d_out=dims, r1=ranks, r2=ranks)
def test_hetlora_pads_averages_and_keeps_global_rank(d_in, d_out, r1, r2):
    p = "layers.0.q"
    R = max(r1, r2) + 1
    g = _state(p, R, d_in, d_out, 0)
    u1 = DeviceUpdate(0, _state(p, r1, d_in, d_out, 1), 1)
    u2 = DeviceUpdate(1, _state(p, r2, d_in, d_out, 2), 1)
    new = hetlora_average(g, [u1, u2], "samples")
    a1, _ = zero_pad(u1.state[p + ".lora_A"], u1.state[p + ".lora_B"], R)
    a2, _ = zero_pad(u2.state[p + ".lora_A"], u2.state[p + ".lora_B"], R)
    assert torch.allclose(new[p + ".lora_A"], (a1 + a2) / 2)
    assert torch.all(new[p + ".lora_A"][max(r1, r2):] == 0)    # nobody trained the top component


def test_untrained_layers_untouched_by_every_rule():
    g = {**_state("layers.0.q", 4, 5, 5, 0), **_state("layers.1.q", 4, 5, 5, 9)}
    u = DeviceUpdate(0, _state("layers.1.q", 2, 5, 5, 1), 3)
    for new in (layerwise_average(g, [u]), hetlora_average(g, [u]), product_average_svd(g, [u], [3.0])):
        assert torch.equal(new["layers.0.q.lora_A"], g["layers.0.q.lora_A"])
        assert torch.equal(new["layers.0.q.lora_B"], g["layers.0.q.lora_B"])


def test_alpha_over_rank_scaling_consistent_across_ranks():
    """alpha = c * r: every layout scales its B @ A by the same c, so products of any rank add up."""
    from fedlegend.lora import LoraTarget, ModelSpec, lora_config

    t = tuple(LoraTarget(l, "q", f"enc.layer.{l}.q", 8, 8) for l in range(3))
    spec = ModelSpec(3, 8, 32, t, "classifier", {"weight": (2, 8)})
    cfg = lora_config(spec, {0: 1, 1: 4, 2: 16}, 2.0, 0.0)
    scales = {cfg.alpha_pattern[n] / cfg.rank_pattern[n] for n in cfg.rank_pattern}
    assert scales == {2.0}


def test_tail_energy_and_capacity_ranks():
    p = "layers.0.q"
    a = torch.eye(3, 4, dtype=torch.float64)
    b = torch.zeros(4, 3, dtype=torch.float64)
    b[0, 0] = 1.0                                          # only the first component carries energy
    assert tail_energy({p + ".lora_A": a, p + ".lora_B": b}, 1) == pytest.approx(0.0)
    est = {0: Estimate(1.0, 1.0, 0.0), 1: Estimate(10.0, 10.0, 0.0)}
    assert rank_by_capacity([0, 1, 2], est, 4, 2, 16) == {0: 16, 1: 2, 2: 16}   # 10x slower -> 1.6 -> r_min


def test_ffa_lora_mean_of_b_is_exact_with_shared_a():
    """FFA-LoRA: with A frozen and shared, mean_i(B_i) A == mean_i(B_i A)."""
    from fedlegend.methods.base import LoraPlan, trained_part

    a = rand(3, 6, seed=1)
    bs = [rand(5, 3, seed=s) for s in (2, 3, 4)]
    g = {"layers.0.q.lora_A": a, "layers.0.q.lora_B": torch.zeros(5, 3, dtype=torch.float64)}
    ups = [DeviceUpdate(i, {"layers.0.q.lora_B": b}, 1) for i, b in enumerate(bs)]
    new = layerwise_average(g, ups, "mean")
    assert torch.equal(new["layers.0.q.lora_A"], a)
    assert torch.allclose(new["layers.0.q.lora_B"] @ new["layers.0.q.lora_A"], sum(b @ a for b in bs) / 3)
    plan = LoraPlan(0, {0: 3}, {"frozen": ("lora_A",)})
    assert set(trained_part(g, plan)) == {"layers.0.q.lora_B"}
