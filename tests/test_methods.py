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
    with pytest.raises(ValueError, match="registered methods: .*fedlora, fedra.*legend"):
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


# ------------------------------------------------------------------ HierFedLoRA
def test_near_iid_groups_balance_labels_and_sizes():
    from fedlegend.methods.hierfedlora import near_iid_groups

    # two label-skewed halves: a good grouping mixes them, each group close to 50/50
    counts = [[90, 10], [85, 15], [10, 90], [15, 85], [50, 50], [48, 52]]
    groups = near_iid_groups(counts, 3)
    assert sorted(i for g in groups for i in g) == list(range(6)) and all(len(g) == 2 for g in groups)
    for g in groups:
        s = [sum(counts[i][c] for i in g) for c in (0, 1)]
        assert abs(s[0] / sum(s) - 0.5) < 0.1, groups
    assert len(near_iid_groups(counts, 10)) == 6   # never more groups than devices


def test_frequency_and_depth_fills_the_period():
    from fedlegend.methods.hierfedlora import frequency_and_depth

    t = lambda d: 1.0 + d   # iteration time at depth d
    # period 7: (tau, d) with tau * (1 + d) <= 7 maximising tau * d: (1, 6) -> 6, (2, 2) -> 4, (3, 1) -> 3
    assert frequency_and_depth(t, 7.0, 6, 4, 1) == (1, 6)
    # a fast group: t = 0.1 + 0.1 d, period 2.0: d=6 -> tau 2 -> 12, d=4 -> tau 4 -> 16 (capped at 4)
    assert frequency_and_depth(lambda d: 0.1 + 0.1 * d, 2.0, 6, 4, 1) == (4, 4)
    # too slow for even one iteration at the minimum depth: (1, min_depth), it sets the period
    assert frequency_and_depth(lambda d: 10.0 + d, 2.0, 6, 4, 2) == (1, 2)


def test_hierfedlora_ticks_clock_and_aggregation():
    import torch
    from fedlegend.methods.base import DeviceUpdate

    c = ctx(L=4, n=4)
    c = MethodContext(c.spec, 4, 2, 4, 16, label_counts=((5, 5), (5, 5), (5, 5), (5, 5)))
    m = make_method("hierfedlora", c, {"hierfedlora": {"groups": 2, "rank": 2, "max_frequency": 3}})
    devs = [0, 1, 2, 3]
    plans = m.plan(1, devs, {}, {})                      # profiling: every group (1, L)
    assert set(plans) == set(devs) and all(p.depth == 4 for p in plans.values())
    assert sorted(len(g) for g in m.groups) == [2, 2]
    # group of device 0 is fast, the other slow
    fast = set(m.groups[m.group_of[0]])
    est = {i: Estimate(0.1, 0.1, 0.0) if i in fast else Estimate(1.0, 1.0, 0.0) for i in devs}
    g0 = {f"layers.{l}.{mod}.lora_{p}": torch.zeros(2, 32) if p == "A" else torch.zeros(32, 2)
          for l in range(4) for mod in ("q", "v") for p in "AB"}
    g0["head.weight"] = torch.zeros(2, 32)
    m.round_timing({i: 1.0 for i in devs})
    state = m.aggregate(g0, [DeviceUpdate(i, m.assign(g0, plans[i]), 10) for i in devs])
    plans = m.plan(2, devs, est, {})
    gf, gs = m.group_of[0], 1 - m.group_of[0]
    assert m.tau[gf] > 1 and m.tau[gs] == 1 and m.depth[gf] >= m.depth[gs]
    assert set(plans) == set(devs)
    # tick 1: both groups train; the slow group's last iteration; clock = the slow group's time
    times = {i: (0.5 if i in fast else 3.0) for i in devs}
    rt, waits = m.round_timing(times)
    assert rt == 3.0
    ones = lambda p: {k: torch.ones_like(v) for k, v in m.assign(state, p).items()}
    new = m.aggregate(state, [DeviceUpdate(i, ones(plans[i]), 10) for i in devs])
    assert all(torch.equal(new[k], state[k]) for k in state)   # no global aggregation before the last tick
    # tick 2: only the fast group; its clock (1.0) stays below the slow group's (3.0): no time passes
    plans = m.plan(3, devs, est, {})
    assert set(plans) == fast
    assert m.idle_reason(next(i for i in devs if i not in fast)).startswith(f"group {gs}")
    rt, _ = m.round_timing({i: 0.5 for i in fast})
    assert rt == 0.0
    for t in range(3, m.tau[gf] + 1):
        plans = m.plan(t + 1, devs, est, {})
        m.round_timing({i: 0.5 for i in fast})
        if t < m.tau[gf]:
            m.aggregate(state, [DeviceUpdate(i, ones(plans[i]), 10) for i in fast])
    last = [DeviceUpdate(i, {k: 3 * v for k, v in ones(plans[i]).items()}, 10) for i in fast]
    new = m.aggregate(state, last)
    # global aggregation: layers both groups trained average the groups' states
    top = f"layers.3.q.lora_A"
    assert not torch.equal(new[top], state[top])
    low = f"layers.0.q.lora_A"
    if m.depth[gf] < 4 and m.depth[gs] < 4:
        assert torch.equal(new[low], state[low])   # nobody trained layer 0
    assert m.plan(99, devs, est, {}).keys() == set(devs)        # the next global round starts
