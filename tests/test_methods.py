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
    with pytest.raises(ValueError, match="registered methods: fedlora, fedra"):
        make_method("fedsomething", ctx(), {})


def test_rank_budget_too_small_for_depth():
    with pytest.raises(PlanError, match="psi >= 21"):
        make_method("legend", ctx(), {"legend": {"rank_budget": 20}})
    with pytest.raises(PlanError, match="larger than the model"):
        make_method("legend", ctx(), {"legend": {"min_depth": 7}})


def test_legend_first_round_profiles_at_full_depth_then_adapts():
    m = make_method("legend", ctx(), {"legend": {"rank_budget": 48}})
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
    wo_rd = make_method("legend-wo-rd", ctx(), {"legend": {"rank_budget": 48}})
    assert set(wo_rd.global_ranks().values()) == {8}
    wo_ld = make_method("legend-wo-ld", ctx(), {"legend": {"rank_budget": 48}})
    est = {i: Estimate(1.0 + 9 * i, 1.0 + 9 * i, 0.01) for i in range(4)}
    assert {p.depth for p in wo_ld.plan(2, [0, 1, 2, 3], est, {}).values()} == {6}


def test_legend_budget_excludes_or_trims():
    m = make_method("legend", ctx(), {"legend": {"rank_budget": 48}})
    est = {0: Estimate(1.0, 1.0, 0.01), 1: Estimate(1.0, 1.0, 0.01)}
    tiny = {0: (1.0, 1.0), 1: (float("inf"), float("inf"))}     # device 0 can afford nothing
    plans = m.plan(2, [0, 1], est, tiny)
    assert 0 not in plans and plans[1].depth == 6


def test_fedlora_same_rank_everywhere():
    m = make_method("fedlora", ctx(), {"fedlora": {"rank": 8}})
    plans = m.plan(1, [0, 1], {}, {})
    assert all(p.ranks == {l: 8 for l in range(6)} for p in plans.values())


def test_hetlora_family_ranks_follow_capacity_and_assign_truncates():
    import torch

    est = {0: Estimate(0.1, 0.1, 0.001), 1: Estimate(5.0, 5.0, 0.01)}
    for name in ("hetlora", "flexlora", "hlora"):
        m = make_method(name, ctx(n=2), {name: {"rank_min": 2, "rank_max": 16}})
        assert set(m.global_ranks().values()) == {16}
        plans = m.plan(2, [0, 1], est, {})
        assert plans[0].ranks[0] == 16 and plans[1].ranks[0] < 16 and plans[1].depth == 6
        g = {"layers.0.q.lora_A": torch.randn(16, 32), "layers.0.q.lora_B": torch.randn(32, 16), "head.weight": torch.zeros(2, 32)}
        sent = m.assign(g, plans[1])
        r = plans[1].ranks[0]
        assert sent["layers.0.q.lora_A"].shape == (r, 32) and sent["layers.0.q.lora_B"].shape == (32, r)
        assert torch.equal(sent["layers.0.q.lora_A"], g["layers.0.q.lora_A"][:r])


def test_fedra_random_layers_by_capacity_and_seeded():
    est = {0: Estimate(0.1, 0.1, 0.001), 1: Estimate(5.0, 5.0, 0.01)}
    m = make_method("fedra", ctx(n=2), {})
    p1, p2 = m.plan(3, [0, 1], est, {}), m.plan(3, [0, 1], est, {})
    assert p1[0].layers == list(range(6)) and 1 <= p1[1].depth < 6
    assert p1[1].layers == p2[1].layers
    assert any(m.plan(r, [0, 1], est, {})[1].layers != p1[1].layers for r in range(4, 10))


def test_hetlora_self_pruning_lowers_rank():
    import torch

    from fedlegend.methods.base import DeviceUpdate

    m = make_method("hetlora", ctx(n=1), {"hetlora": {"rank_min": 2, "rank_max": 4, "self_pruning": True}})
    a = torch.zeros(4, 32)
    a[0, 0] = 1.0
    b = torch.zeros(32, 4)
    b[0, 0] = 1.0                                  # all energy in the first component
    g = {"layers.0.q.lora_A": torch.zeros(4, 32), "layers.0.q.lora_B": torch.zeros(32, 4), "head.weight": torch.zeros(2, 32)}
    m.aggregate(g, [DeviceUpdate(0, {"layers.0.q.lora_A": a, "layers.0.q.lora_B": b, "head.weight": torch.zeros(2, 32)}, 4)])
    assert m.plan(2, [0], {}, {})[0].ranks[0] == 3
