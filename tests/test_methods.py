import pytest

from fedlegend.lora import LoraTarget, ModelSpec
from fedlegend.methods import METHODS, MethodContext, make_method
from fedlegend.methods.base import Estimate
from fedlegend.methods.legend import PlanError


def ctx(L=6, n=4):
    t = tuple(LoraTarget(l, m, f"enc.layer.{l}.{m}", 32, 32) for l in range(L) for m in ("q", "v"))
    spec = ModelSpec(L, 32, 128, t, "classifier", {"weight": (2, 32), "bias": (2,)})
    return MethodContext(spec, n, local_steps=2, batch_size=4, nominal_width=16)


def test_registry_and_unknown_method():
    assert {"legend", "fedlora"} <= set(METHODS)
    with pytest.raises(ValueError, match="registered methods: fedlora, legend"):
        make_method("fedsomething", ctx(), {})


def test_rank_budget_too_small_for_depth():
    with pytest.raises(PlanError, match="psi >= 21"):
        make_method("legend", ctx(), {"rank_budget": 20})
    with pytest.raises(PlanError, match="larger than the model"):
        make_method("legend", ctx(), {"min_depth": 7})


def test_legend_first_round_profiles_at_full_depth_then_adapts():
    m = make_method("legend", ctx(), {"rank_budget": 48})
    plans = m.plan(1, [0, 1, 2, 3], {}, {})
    assert all(p.depth == 6 for p in plans.values())
    assert plans[0].ranks == {0: 5, 1: 6, 2: 7, 3: 8, 4: 9, 5: 10}
    est = {0: Estimate(0.1, 0.01, 0.001), 1: Estimate(1.0, 0.5, 0.01), 2: Estimate(2.0, 2.0, 0.02),
           3: Estimate(10.0, 10.0, 0.05)}
    plans = m.plan(2, [0, 1, 2, 3], est, {})
    depths = {i: p.depth for i, p in plans.items()}
    assert depths[0] == 6 and depths[3] == 1 and depths[0] >= depths[1] >= depths[2] >= depths[3]
    assert plans[3].ranks == {5: 10}          # the top layer, with the largest rank


def test_legend_ablations():
    wo_rd = make_method("legend", ctx(), {"rank_budget": 48, "uniform_ranks": True})
    assert set(wo_rd.global_ranks().values()) == {8}
    wo_ld = make_method("legend", ctx(), {"rank_budget": 48, "full_depth": True})
    est = {i: Estimate(1.0 + 9 * i, 1.0 + 9 * i, 0.01) for i in range(4)}
    assert {p.depth for p in wo_ld.plan(2, [0, 1, 2, 3], est, {}).values()} == {6}


def test_legend_budget_excludes_or_trims():
    m = make_method("legend", ctx(), {"rank_budget": 48})
    est = {0: Estimate(1.0, 1.0, 0.01), 1: Estimate(1.0, 1.0, 0.01)}
    tiny = {0: (1.0, 1.0), 1: (float("inf"), float("inf"))}     # device 0 can afford nothing
    plans = m.plan(2, [0, 1], est, tiny)
    assert 0 not in plans and plans[1].depth == 6


def test_fedlora_same_rank_everywhere():
    m = make_method("fedlora", ctx(), {"rank": 8})
    plans = m.plan(1, [0, 1], {}, {})
    assert all(p.ranks == {l: 8 for l in range(6)} for p in plans.values())
