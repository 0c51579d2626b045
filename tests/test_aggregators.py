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


# ------------------------------------------------------------------ FLoRA and FedEx-LoRA
def _pairs(k, d_in, d_out, ranks_, seed):
    return [(rand(r, d_in, seed=seed + 10 * i), rand(d_out, r, seed=seed + 10 * i + 1)) for i, r in enumerate(ranks_)]


@SETTINGS
@given(d_in=dims, d_out=dims, rs=st.lists(ranks, min_size=1, max_size=4), seed=st.integers(0, 99))
def test_flora_stacking_equals_weighted_sum_of_products(d_in, d_out, rs, seed):
    from fedlegend.methods.flora import stack_lora

    pairs = _pairs(len(rs), d_in, d_out, rs, seed)
    w = [float(i + 1) for i in range(len(rs))]
    w = [x / sum(w) for x in w]
    a, b = stack_lora(pairs, w)
    assert a.shape == (sum(rs), d_in) and b.shape == (d_out, sum(rs))
    assert torch.allclose(b @ a, sum(wi * (bi @ ai) for wi, (ai, bi) in zip(w, pairs)))


@SETTINGS
@given(d_in=dims, d_out=dims, r=ranks, k=st.integers(1, 4), seed=st.integers(0, 99))
def test_fedex_residual_makes_aggregation_exact(d_in, d_out, r, k, seed):
    """mean of B_k A_k == B_avg A_avg + residual (eq. of FedEx-LoRA), and zero for one device."""
    from fedlegend.methods.fedex_lora import exact_residual

    pairs = _pairs(k, d_in, d_out, [r] * k, seed)
    w = [1.0 / k] * k
    a_avg = sum(wi * a for wi, (a, _) in zip(w, pairs))
    b_avg = sum(wi * b for wi, (_, b) in zip(w, pairs))
    exact = sum(wi * (b @ a) for wi, (a, b) in zip(w, pairs))
    res = exact_residual(pairs, w)
    assert torch.allclose(b_avg @ a_avg + res, exact)
    if k == 1:
        assert torch.allclose(res, torch.zeros_like(res))
    else:  # averaging factors apart is not exact in general: the residual is what fixes it
        assert not torch.allclose(b_avg @ a_avg, exact)


def _method_ctx(L=2, d=6, alpha=2.0):
    from fedlegend.lora import LoraTarget, ModelSpec
    from fedlegend.methods.base import MethodContext

    targets = tuple(LoraTarget(l, m, f"enc.layer.{l}.{m}", d, d) for l in range(L) for m in ("q", "v"))
    spec = ModelSpec(num_layers=L, hidden=d, intermediate=4 * d, targets=targets, head_module="classifier",
                     head_shapes={"weight": (2, d)})
    return MethodContext(spec=spec, num_devices=3, local_steps=1, batch_size=4, nominal_width=8,
                         alpha_over_rank=alpha)


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


@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_fedex_lora_global_model_is_the_exact_average(alpha):
    from fedlegend.methods.fedex_lora import FedExLora

    m = FedExLora(_method_ctx(alpha=alpha), rank=3)
    g = m.init_state(_res_state({0: 3, 1: 3}, seed=1))
    g = {k: (v.double() if k.endswith("residual") else v) for k, v in g.items()}
    ups = [DeviceUpdate(i, {k: v for k, v in _res_state({0: 3, 1: 3}, seed=10 + i).items()}, samples=n)
           for i, n in enumerate((1, 3, 4))]
    new = m.aggregate(g, ups)
    w = [1 / 8, 3 / 8, 4 / 8]
    for prefix in ("layers.0.q", "layers.1.v"):
        # each device's model is W0 + old residual + s B_k A_k; the new global must be their weighted mean
        target = g[prefix + ".residual"] + alpha * sum(wi * (u.state[prefix + ".lora_B"] @ u.state[prefix + ".lora_A"])
                                                       for wi, u in zip(w, ups))
        assert torch.allclose(_effective(new, prefix, alpha), target)
    assert set(new) == set(g)


def test_flora_folds_the_stack_into_the_residual_and_restarts_lora():
    from fedlegend.methods.flora import FLora

    m = FLora(_method_ctx(alpha=2.0), rank_min=1, rank_max=4)
    g = m.init_state(_res_state({0: 4, 1: 4}, seed=2))
    g = {k: (torch.zeros_like(v) if k.endswith("lora_B") else v) for k, v in g.items()}   # fresh LoRA: B = 0
    ups = [DeviceUpdate(0, {k: v for k, v in _res_state({0: 2, 1: 2}, seed=20).items() if "residual" not in k}, 2),
           DeviceUpdate(1, {k: v for k, v in _res_state({0: 4}, seed=30).items() if "residual" not in k}, 6)]
    new = m.aggregate(g, ups)
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
    m2 = FLora(_method_ctx(alpha=2.0), rank_min=1, rank_max=4)
    assert torch.equal(m2.aggregate(g, ups)["layers.0.q.lora_A"], new["layers.0.q.lora_A"])
    assert not torch.equal(new["layers.0.q.lora_A"], g["layers.0.q.lora_A"])
    # FLoRA's wire cost: the stacked factors (ranks 2 + 4 on layer 0), not the dense residual
    assert m.stack_bytes[p] == (6 * 6 + 6 * 6) * new[p + ".lora_A"].element_size()
