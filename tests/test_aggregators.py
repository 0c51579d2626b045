"""Property tests of the aggregation rules (methods/aggregation.py) on random shapes, values and
weights (hypothesis), and of the orientation convention the rules and the LoRA host share."""

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedlegend.methods.aggregation import (DeviceUpdate, exact_residual, layerwise_average, normalized,
                                           product_average_svd, stack_lora, svd_factors, truncate, with_zero_residuals,
                                           zero_pad, zero_pad_average)
from fedlegend.methods.base import Estimate
from fedlegend.methods.hetlora import norm_weight, rank_by_capacity, samples_weight, tail_energy

dims = st.integers(2, 9)
ranks = st.integers(1, 5)
SETTINGS = settings(max_examples=25, deadline=None)
values = st.floats(-100.0, 100.0, allow_nan=False, allow_infinity=False, width=64)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def tensors(shape):
    """A float64 tensor of `shape` with hypothesis-drawn values."""
    return hnp.arrays(np.float64, shape, elements=values).map(torch.from_numpy)


# ------------------------------------------------------------------ weights
@SETTINGS
@given(w=st.lists(st.floats(0.0, 1e6, allow_nan=False), min_size=1, max_size=8))
def test_normalized_sums_to_one_and_keeps_proportions(w):
    out = normalized(w)
    assert len(out) == len(w) and all(x >= 0 for x in out)
    assert sum(out) == pytest.approx(1.0)
    if sum(w) > 0:
        top = max(range(len(w)), key=lambda i: w[i])
        assert all(out[i] == pytest.approx(out[top] * (w[i] / w[top])) for i in range(len(w)))


@SETTINGS
@given(n=st.integers(1, 8), sign=st.sampled_from([0.0, -1.0]), scale=st.floats(0.0, 10.0))
def test_normalized_zero_or_negative_total_gives_equal_weights(n, sign, scale):
    out = normalized([sign * scale] * n)
    assert out == [1.0 / n] * n


# ------------------------------------------------------------------ layer-wise average (eq. 17)
KEYS = ("layers.0.q.lora_A", "layers.0.q.lora_B", "layers.1.q.lora_A", "head.weight")
SHAPES = {"layers.0.q.lora_A": (2, 3), "layers.0.q.lora_B": (3, 2), "layers.1.q.lora_A": (2, 3), "head.weight": (2,)}


@st.composite
def rounds(draw, max_updates=5):
    """(global state, updates): each update holds a random subset of the keys, random values and samples."""
    g = {k: draw(tensors(SHAPES[k])) for k in KEYS}
    updates = []
    for i in range(draw(st.integers(1, max_updates))):
        held = draw(st.lists(st.sampled_from(KEYS), unique=True, max_size=len(KEYS)))
        updates.append(DeviceUpdate(i, {k: draw(tensors(SHAPES[k])) for k in held}, draw(st.integers(0, 1000))))
    return g, updates


weightings = st.sampled_from(["mean", "samples"])


@SETTINGS
@given(r=rounds(), weighting=weightings, data=st.data())
def test_layerwise_average_ignores_the_order_of_updates(r, weighting, data):
    g, updates = r
    shuffled = data.draw(st.permutations(updates))
    a, b = layerwise_average(g, updates, weighting), layerwise_average(g, shuffled, weighting)
    assert set(a) == set(b) == set(g)
    for k in g:
        torch.testing.assert_close(a[k], b[k], rtol=1e-9, atol=1e-9)


@SETTINGS
@given(r=rounds(), weighting=weightings)
def test_layerwise_average_keeps_untrained_keys_and_single_holders_exactly(r, weighting):
    g, updates = r
    new = layerwise_average(g, updates, weighting)
    for k in g:
        holders = [u for u in updates if k in u.state]
        if not holders:
            assert torch.equal(new[k], g[k])                    # nobody trained it: the global value
        elif len(holders) == 1:
            assert torch.equal(new[k], holders[0].state[k])     # one holder: weight 1, its tensor as is


@SETTINGS
@given(r=rounds(), weighting=weightings)
def test_layerwise_average_is_a_convex_combination(r, weighting):
    g, updates = r
    new = layerwise_average(g, updates, weighting)
    for k in g:
        held = [u.state[k] for u in updates if k in u.state]
        if held:
            stack = torch.stack(held)
            tol = 1e-9 * (1 + stack.abs().amax(0))
            assert torch.all(new[k] >= stack.amin(0) - tol) and torch.all(new[k] <= stack.amax(0) + tol)


# ------------------------------------------------------------------ low-rank factors
@SETTINGS
@given(d_in=dims, d_out=dims, r=ranks, extra=st.integers(0, 4))
def test_zero_pad_keeps_product_and_truncate_round_trips(d_in, d_out, r, extra):
    a, b = rand(r, d_in, seed=1), rand(d_out, r, seed=2)
    ap, bp = zero_pad(a, b, r + extra)
    assert ap.shape == (r + extra, d_in) and bp.shape == (d_out, r + extra)
    assert torch.allclose(bp @ ap, b @ a)
    at, bt = truncate(ap, bp, r)
    assert torch.equal(at, a) and torch.equal(bt, b)


@pytest.mark.parametrize("rank, alpha_over_rank", [(1, 2.0), (3, 0.5), (4, 2.0)])
def test_lora_host_computes_wx_plus_scaled_ba_x(tiny_bert, rank, alpha_over_rank):
    """Our orientation: canonical A (r, d_in) and B (d_out, r) loaded into a LoraHost make every adapted
    Linear compute W x + b + (alpha/r) B A x, and the whole model equal the base model with W + (alpha/r) B A."""
    from fedlegend.hosts.lora import LoraHost
    from fedlegend.spec import inspect_model, lora_key

    spec = inspect_model(tiny_bert, ("dense",))       # attention output 32->32, FFN 32->64 and 64->32
    layer = 2
    targets = spec.targets_of(layer)
    assert {(t.d_in, t.d_out) for t in targets} >= {(32, 64), (64, 32)}   # non-square: a transpose would not fit
    merged = copy.deepcopy(tiny_bert).eval()
    base = {t.full_name: (tiny_bert.get_submodule(t.full_name).weight.detach().clone(),
                          tiny_bert.get_submodule(t.full_name).bias.detach().clone()) for t in targets}
    host = LoraHost(tiny_bert, spec, {l: 2 for l in range(4)}, alpha_over_rank=alpha_over_rank)
    name = host.use({layer: rank})                   # a layout of its own, rank != the global one
    state = host.read(name)
    for i, t in enumerate(targets):
        state[lora_key(layer, t.module, "lora_A")] = rand(rank, t.d_in, seed=10 + i).float()
        state[lora_key(layer, t.module, "lora_B")] = rand(t.d_out, rank, seed=20 + i).float()
    host.load(name, state)
    host.model.eval()
    x = rand(5, 64, seed=3).float()
    with torch.no_grad():
        for t in targets:
            a, b = state[lora_key(layer, t.module, "lora_A")], state[lora_key(layer, t.module, "lora_B")]
            w, bias = base[t.full_name]
            got = host.peft.base_model.model.get_submodule(t.full_name)(x[:, :t.d_in])
            want = x[:, :t.d_in] @ w.T + bias + alpha_over_rank * x[:, :t.d_in] @ (b @ a).T
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            merged.get_submodule(t.full_name).weight += alpha_over_rank * (b @ a)
        merged.classifier.load_state_dict({k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")})
        ids = torch.randint(5, 100, (3, 9), generator=torch.Generator().manual_seed(4))
        torch.testing.assert_close(host.model(input_ids=ids).logits, merged(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-5)


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
    new = zero_pad_average(g, [u1, u2], samples_weight)
    a1, _ = zero_pad(u1.state[p + ".lora_A"], u1.state[p + ".lora_B"], R)
    a2, _ = zero_pad(u2.state[p + ".lora_A"], u2.state[p + ".lora_B"], R)
    assert torch.allclose(new[p + ".lora_A"], (a1 + a2) / 2)
    assert torch.all(new[p + ".lora_A"][max(r1, r2):] == 0)    # nobody trained the top component


def test_untrained_layers_untouched_by_every_rule():
    g = {**_state("layers.0.q", 4, 5, 5, 0), **_state("layers.1.q", 4, 5, 5, 9)}
    u = DeviceUpdate(0, _state("layers.1.q", 2, 5, 5, 1), 3)
    for new in (layerwise_average(g, [u]), zero_pad_average(g, [u], norm_weight), product_average_svd(g, [u], [3.0])):
        assert torch.equal(new["layers.0.q.lora_A"], g["layers.0.q.lora_A"])
        assert torch.equal(new["layers.0.q.lora_B"], g["layers.0.q.lora_B"])


def test_alpha_over_rank_scaling_consistent_across_ranks(model_spec):
    """alpha = c * r: every layout scales its B @ A by the same c, so products of any rank add up."""
    from fedlegend.hosts.lora import lora_config

    spec = model_spec(L=3, d=8, modules=("q",), head_bias=False)
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
    plan = LoraPlan(0, {0: 3}, ("lora_A",))
    assert set(trained_part(g, plan)) == {"layers.0.q.lora_B"}


# ------------------------------------------------------------------ FLoRA and FedEx-LoRA
def _pairs(k, d_in, d_out, ranks_, seed):
    return [(rand(r, d_in, seed=seed + 10 * i), rand(d_out, r, seed=seed + 10 * i + 1)) for i, r in enumerate(ranks_)]


@SETTINGS
@given(d_in=dims, d_out=dims, rs=st.lists(ranks, min_size=1, max_size=4), seed=st.integers(0, 99))
def test_flora_stacking_equals_weighted_sum_of_products(d_in, d_out, rs, seed):
    pairs = _pairs(len(rs), d_in, d_out, rs, seed)
    w = [float(i + 1) for i in range(len(rs))]
    w = [x / sum(w) for x in w]
    a, b = stack_lora(pairs, w)
    assert a.shape == (sum(rs), d_in) and b.shape == (d_out, sum(rs))
    assert torch.allclose(b @ a, sum(wi * (bi @ ai) for wi, (ai, bi) in zip(w, pairs)))


@SETTINGS
@given(d_in=dims, d_out=dims, r=ranks, data=st.data(),
       raw=st.lists(st.floats(0.01, 100.0), min_size=1, max_size=4), scale=st.floats(0.1, 4.0))
def test_fedex_residual_makes_the_global_model_the_exact_average(d_in, d_out, r, data, raw, scale):
    """With the residual folded into the frozen weight, W0 + residual + s B_avg A_avg is the exact
    weighted average of the devices' models sum_k p_k (W0 + s B_k A_k), for any weights p and scaling s."""
    k = len(raw)
    w0 = data.draw(tensors((d_out, d_in)))
    pairs = [(data.draw(tensors((r, d_in))), data.draw(tensors((d_out, r)))) for _ in range(k)]
    p = normalized(raw)
    a_avg = sum(pi * a for pi, (a, _) in zip(p, pairs))      # averaging the factors apart
    b_avg = sum(pi * b for pi, (_, b) in zip(p, pairs))
    global_model = w0 + scale * exact_residual(pairs, p) + scale * b_avg @ a_avg
    devices_mean = sum(pi * (w0 + scale * b @ a) for pi, (a, b) in zip(p, pairs))
    big = 1.0 + max(float(t.abs().max()) for t in [w0, *[x for pr in pairs for x in pr]])
    torch.testing.assert_close(global_model, devices_mean, rtol=1e-9, atol=1e-9 * big ** 2 * (1 + scale) * r)
    if k == 1:   # one device: its factors are the average, nothing to correct
        torch.testing.assert_close(exact_residual(pairs, p), torch.zeros(d_out, d_in, dtype=torch.float64),
                                   rtol=0, atol=1e-9 * big ** 2 * r)


def test_fedex_residual_is_needed_when_devices_differ():
    """Averaging factors apart is not exact for differing devices: the residual is not zero."""
    pairs = _pairs(3, 5, 4, [2, 2, 2], seed=7)
    res = exact_residual(pairs, [1 / 3] * 3)
    assert res.abs().max() > 1e-3


def _res_state(ranks_by_layer, d=6, seed=0, residual=None):
    s = {"head.weight": rand(2, d, seed=seed)}
    for l, r in ranks_by_layer.items():
        for i, m in enumerate(("q", "v")):
            s[f"layers.{l}.{m}.lora_A"] = rand(r, d, seed=seed + 100 * l + 10 * i + 1)
            s[f"layers.{l}.{m}.lora_B"] = rand(d, r, seed=seed + 100 * l + 10 * i + 2)
            if residual is not None:
                s[f"layers.{l}.{m}.residual"] = residual * rand(d, d, seed=seed + 100 * l + 10 * i + 3)
    return s


def _effective(state, prefix, scale):
    """Weight change the frozen residual and the LoRA make together: residual + (alpha/r) B A."""
    return state[prefix + ".residual"] + scale * state[prefix + ".lora_B"] @ state[prefix + ".lora_A"]


def _aggr_ctx(method_ctx, alpha):
    return method_ctx(L=2, d=6, n=3, steps=1, nominal_width=8, alpha=alpha, head_bias=False)


@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_fedex_lora_global_model_is_the_exact_average(alpha, method_ctx):
    from fedlegend.methods.fedex_lora import FedExLora

    m = FedExLora(_aggr_ctx(method_ctx, alpha), rank=3)
    g = with_zero_residuals(_res_state({0: 3, 1: 3}, seed=1))
    ups = [DeviceUpdate(i, {k: v for k, v in _res_state({0: 3, 1: 3}, seed=10 + i).items()}, samples=n)
           for i, n in enumerate((1, 3, 4))]
    new = m.aggregate(1, g, ups).state
    w = [1 / 8, 3 / 8, 4 / 8]
    for prefix in ("layers.0.q", "layers.1.v"):
        # each device's model is W0 + old residual + s B_k A_k; the new global must be their weighted mean
        target = g[prefix + ".residual"] + alpha * sum(wi * (u.state[prefix + ".lora_B"] @ u.state[prefix + ".lora_A"])
                                                       for wi, u in zip(w, ups))
        assert torch.allclose(_effective(new, prefix, alpha), target)
    assert set(new) == set(g)


def test_flora_folds_the_stack_into_the_residual_and_restarts_lora(method_ctx):
    from fedlegend.methods.flora import FLora

    m = FLora(_aggr_ctx(method_ctx, 2.0), rank_min=1, rank_max=4)
    g = with_zero_residuals(_res_state({0: 4, 1: 4}, seed=2))
    g = {k: (torch.zeros_like(v) if k.endswith("lora_B") else v) for k, v in g.items()}   # fresh LoRA: B = 0
    ups = [DeviceUpdate(0, {k: v for k, v in _res_state({0: 2, 1: 2}, seed=20).items() if "residual" not in k}, 2),
           DeviceUpdate(1, {k: v for k, v in _res_state({0: 4}, seed=30).items() if "residual" not in k}, 6)]
    new = m.aggregate(1, g, ups).state
    # layer 0: both devices, weights 1/4, 3/4; layer 1: only device 0
    p = "layers.0.q"
    want = 2.0 * (0.25 * ups[0].state[p + ".lora_B"] @ ups[0].state[p + ".lora_A"]
                  + 0.75 * ups[1].state[p + ".lora_B"] @ ups[1].state[p + ".lora_A"])
    assert torch.allclose(new[p + ".residual"] - g[p + ".residual"], want)
    p1 = "layers.1.v"
    want1 = 2.0 * ups[0].state[p1 + ".lora_B"] @ ups[0].state[p1 + ".lora_A"]
    assert torch.allclose(new[p1 + ".residual"] - g[p1 + ".residual"], want1)
    # the model a device starts the next round from is the merged one: B = 0 so B A adds nothing
    assert all(torch.count_nonzero(new[k]) == 0 for k in new if k.endswith("lora_B"))
    assert all(new[k].shape == g[k].shape for k in g)
    # the next round's A is fresh (not the global A of before) and the same on every call with the seed
    m2 = FLora(_aggr_ctx(method_ctx, 2.0), rank_min=1, rank_max=4)
    assert torch.equal(m2.aggregate(1, g, ups).state["layers.0.q.lora_A"], new["layers.0.q.lora_A"])
    assert not torch.equal(new["layers.0.q.lora_A"], g["layers.0.q.lora_A"])
    # FLoRA's wire cost: the stacked factors (ranks 2 + 4 on layer 0), not the dense residual
    assert m.stack_bytes[p] == (6 * 6 + 6 * 6) * new[p + ".lora_A"].element_size()
