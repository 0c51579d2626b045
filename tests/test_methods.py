import pytest
import torch

from fedlegend.config import ConfigError, build_config
from fedlegend.methods import METHODS, make_method
from fedlegend.methods.aggregation import DeviceUpdate, with_zero_residuals
from fedlegend.methods.base import Aggregated, Assignment, Estimate, RoundView, Skip
from fedlegend.methods.legend import PlanError


def configure(m, round_, devices, est=None, budgets=None, state=None):
    """The method's answer for a round; `state` defaults to an empty global adapter (plans only)."""
    return m.configure(RoundView(round_, list(devices), dict(est or {}), dict(budgets or {})),
                       {} if state is None else state)


def plans(m, round_, devices, est=None, budgets=None, state=None):
    """device -> LoraPlan of the devices with an Assignment (Skips left out)."""
    return {i: a.plan for i, a in configure(m, round_, devices, est, budgets, state).items()
            if isinstance(a, Assignment)}


def test_registry_and_unknown_method(method_ctx):
    assert {"legend", "fedlora"} <= set(METHODS)
    with pytest.raises(ValueError, match="registered methods: .*fedlora, fedra.*legend"):
        make_method("fedsomething", method_ctx(), {})
    with pytest.raises(ConfigError, match="unknown method 'fedsomething'"):   # the config checks the same list
        build_config({}, {"method.name": "fedsomething"})


def test_presets_carry_their_registry_name(method_ctx):
    for name in ("legend-wo-ld", "legend-wo-rd"):
        m = make_method(name, method_ctx(), {})
        assert m.info.name == name and METHODS[name].section == "legend"


def test_rank_budget_too_small_for_depth(method_ctx):
    with pytest.raises(PlanError, match="psi >= 21"):
        make_method("legend", method_ctx(), {"legend": {"rank_budget": 20}})
    with pytest.raises(PlanError, match="larger than the model"):
        make_method("legend", method_ctx(), {"legend": {"min_depth": 7}})


def test_legend_first_round_profiles_at_full_depth_then_adapts(method_ctx):
    m = make_method("legend", method_ctx(), {"legend": {"rank_budget": 48}})
    p = plans(m, 1, [0, 1, 2, 3])
    assert all(x.depth == 6 for x in p.values())
    assert p[0].ranks == {0: 5, 1: 6, 2: 7, 3: 8, 4: 9, 5: 10}
    est = {0: Estimate(0.1, 0.01, 0.001), 1: Estimate(1.0, 0.5, 0.01), 2: Estimate(2.0, 2.0, 0.02),
           3: Estimate(10.0, 10.0, 0.05)}
    p = plans(m, 2, [0, 1, 2, 3], est)
    depths = {i: x.depth for i, x in p.items()}
    assert depths[0] == 6 and depths[3] == 1 and depths[0] >= depths[1] >= depths[2] >= depths[3]
    assert p[3].ranks == {5: 10}          # the top layer, with the largest rank


def test_legend_ablations(method_ctx):
    wo_rd = make_method("legend-wo-rd", method_ctx(), {"legend": {"rank_budget": 48}})
    assert set(wo_rd.global_ranks().values()) == {8}
    wo_ld = make_method("legend-wo-ld", method_ctx(), {"legend": {"rank_budget": 48}})
    est = {i: Estimate(1.0 + 9 * i, 1.0 + 9 * i, 0.01) for i in range(4)}
    assert {x.depth for x in plans(wo_ld, 2, [0, 1, 2, 3], est).values()} == {6}


def test_legend_budget_excludes_or_trims(method_ctx):
    m = make_method("legend", method_ctx(), {"legend": {"rank_budget": 48}})
    est = {0: Estimate(1.0, 1.0, 0.01), 1: Estimate(1.0, 1.0, 0.01)}
    tiny = {0: (1.0, 1.0), 1: (float("inf"), float("inf"))}     # device 0 can afford nothing
    out = configure(m, 2, [0, 1], est, tiny)
    assert isinstance(out[0], Skip) and "no feasible plan" in out[0].reason
    assert out[1].plan.depth == 6


def test_fedlora_same_rank_everywhere(method_ctx):
    m = make_method("fedlora", method_ctx(), {"fedlora": {"rank": 8}})
    p = plans(m, 1, [0, 1])
    assert set(p) == {0, 1} and all(x.ranks == {l: 8 for l in range(6)} for x in p.values())


def test_hetlora_family_ranks_follow_capacity_and_assign_truncates(method_ctx):
    est = {0: Estimate(0.1, 0.1, 0.001), 1: Estimate(5.0, 5.0, 0.01)}
    for name in ("hetlora", "flexlora", "hlora"):
        m = make_method(name, method_ctx(n=2), {name: {"rank_min": 2, "rank_max": 16}})
        assert set(m.global_ranks().values()) == {16}
        g = {"layers.0.q.lora_A": torch.randn(16, 32), "layers.0.q.lora_B": torch.randn(32, 16),
             "head.weight": torch.zeros(2, 32)}
        out = configure(m, 2, [0, 1], est, state=g)
        p = {i: a.plan for i, a in out.items()}
        assert p[0].ranks[0] == 16 and p[1].ranks[0] < 16 and p[1].depth == 6
        sent = out[1].payload
        r = p[1].ranks[0]
        assert sent["layers.0.q.lora_A"].shape == (r, 32) and sent["layers.0.q.lora_B"].shape == (32, r)
        assert torch.equal(sent["layers.0.q.lora_A"], g["layers.0.q.lora_A"][:r])


def test_fedra_random_layers_by_capacity_and_seeded(method_ctx):
    est = {0: Estimate(0.1, 0.1, 0.001), 1: Estimate(5.0, 5.0, 0.01)}
    m = make_method("fedra", method_ctx(n=2), {})
    p1, p2 = plans(m, 3, [0, 1], est), plans(m, 3, [0, 1], est)
    assert p1[0].layers == list(range(6)) and 1 <= p1[1].depth < 6
    assert p1[1].layers == p2[1].layers
    assert any(plans(m, r, [0, 1], est)[1].layers != p1[1].layers for r in range(4, 10))


def test_hetlora_self_pruning_lowers_rank(method_ctx):
    m = make_method("hetlora", method_ctx(n=1), {"hetlora": {"rank_min": 2, "rank_max": 4, "self_pruning": True}})
    a = torch.zeros(4, 32)
    a[0, 0] = 1.0
    b = torch.zeros(32, 4)
    b[0, 0] = 1.0                                  # all energy in the first component
    g = {"layers.0.q.lora_A": torch.zeros(4, 32), "layers.0.q.lora_B": torch.zeros(32, 4), "head.weight": torch.zeros(2, 32)}
    m.aggregate(1, g, [DeviceUpdate(0, {"layers.0.q.lora_A": a, "layers.0.q.lora_B": b, "head.weight": torch.zeros(2, 32)}, 4)])
    assert plans(m, 2, [0])[0].ranks[0] == 3


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


def _hierfedlora_after_profiling(method_ctx):
    """A 2-group HierFedLoRA after its profiling round: (method, global state, estimates, fast group, devices)."""
    c = method_ctx(L=4, n=4, label_counts=((5, 5),) * 4)
    m = make_method("hierfedlora", c, {"hierfedlora": {"groups": 2, "rank": 2, "max_frequency": 3}})
    devs = [0, 1, 2, 3]
    g0 = {f"layers.{l}.{mod}.lora_{p}": torch.zeros(2, 32) if p == "A" else torch.zeros(32, 2)
          for l in range(4) for mod in ("q", "v") for p in "AB"}
    g0["head.weight"] = torch.zeros(2, 32)
    out = configure(m, 1, devs, state=g0)                  # profiling: every group (1, L)
    assert all(isinstance(a, Assignment) and a.plan.depth == 4 for a in out.values()) and set(out) == set(devs)
    assert sorted(len(g) for g in m.groups) == [2, 2]
    state = m.aggregate(1, g0, [DeviceUpdate(i, out[i].payload, 10, time_s=1.0) for i in devs]).state
    # the group of device 0 is fast, the other slow. Period T = median full-depth time = (1.3 + 5) / 2:
    # fast t(d) = 0.1 + 0.3 d -> (tau 3, d 3) = 9 layer updates; slow t(d) = 1 + d -> (1, 2)
    fast = set(m.groups[m.group_of[0]])
    est = {i: Estimate(0.1, 0.3, 0.0) if i in fast else Estimate(1.0, 1.0, 0.0) for i in devs}
    return m, state, est, fast, devs


def ones(a, v=1.0):
    return {k: torch.full_like(t, v) for k, t in a.payload.items()}


def test_hierfedlora_ticks_clock_and_aggregation(method_ctx):
    m, state, est, fast, devs = _hierfedlora_after_profiling(method_ctx)
    out = configure(m, 2, devs, est, state=state)
    gf, gs = m.group_of[0], 1 - m.group_of[0]
    assert (m.tau[gf], m.depth[gf]) == (3, 3) and (m.tau[gs], m.depth[gs]) == (1, 2)
    assert all(isinstance(a, Assignment) for a in out.values())
    # tick 1: both groups train; the slow group's last iteration; clock = the slow group's time
    times = {i: (0.5 if i in fast else 3.0) for i in devs}
    agg = m.aggregate(2, state, [DeviceUpdate(i, ones(out[i]), 10, time_s=times[i]) for i in devs])
    assert isinstance(agg, Aggregated) and agg.round_time_s == 3.0
    assert all(agg.waiting_s[i] == 0.0 for i in devs if i not in fast)
    assert all(torch.equal(agg.state[k], state[k]) for k in state)   # no global aggregation before the last tick
    # ticks 2 and 3: only the fast group; its clock (1.0, 1.5) stays below the slow group's (3.0): no time passes
    for tick, round_ in ((2, 3), (3, 4)):
        out = configure(m, round_, devs, est, state=state)
        assert {i for i, a in out.items() if isinstance(a, Assignment)} == fast
        idle = next(i for i in devs if i not in fast)
        assert isinstance(out[idle], Skip) and out[idle].reason.startswith(f"group {gs}")
        value = 3.0 if tick == 3 else 1.0
        agg = m.aggregate(round_, state, [DeviceUpdate(i, ones(out[i], value), 10, time_s=0.5) for i in fast])
        assert agg.round_time_s == 0.0
    new = agg.state
    # global aggregation after the last tick: each tensor over the groups that trained it, by samples
    # (fast: 2 devices x 3 ticks x 10, slow: 2 x 1 x 10); the fast group's last intra-group model is 3
    both, fast_only, nobody = "layers.3.q.lora_A", "layers.1.q.lora_A", "layers.0.q.lora_A"
    assert torch.allclose(new[both], torch.full_like(state[both], (3.0 * 60 + 1.0 * 20) / 80))
    assert torch.equal(new[fast_only], torch.full_like(state[fast_only], 3.0))
    assert torch.equal(new[nobody], state[nobody])          # nobody trained layer 0: kept
    assert plans(m, 99, devs, est).keys() == set(devs)        # the next global round starts


def test_hierfedlora_keeps_the_groups_work_when_the_last_tick_brings_nothing(method_ctx):
    """Every update of a global round's last tick lost (e.g. the devices dropped): the global
    aggregation still merges what the groups trained in the earlier ticks."""
    m, state, est, fast, devs = _hierfedlora_after_profiling(method_ctx)
    for round_ in (2, 3):                                     # ticks 1 and 2 train (value 1)
        out = configure(m, round_, devs, est, state=state)
        trained = [i for i, a in out.items() if isinstance(a, Assignment)]
        m.aggregate(round_, state, [DeviceUpdate(i, ones(out[i]), 10, time_s=0.5) for i in trained])
    configure(m, 4, devs, est, state=state)                   # tick 3: the fast group's last, nothing arrives
    new = m.aggregate(4, state, []).state
    assert torch.equal(new["layers.1.q.lora_A"], torch.ones_like(state["layers.1.q.lora_A"]))  # fast group's work
    assert torch.equal(new["layers.0.q.lora_A"], state["layers.0.q.lora_A"])


# ------------------------------------------------------------------ the contract, for every registered method
def _host_and_state(kind, model, spec, ranks):
    from fedlegend.hosts import build_host

    host = build_host(kind, model, spec, ranks)
    return host, host.read(host.GLOBAL)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_registered_method_implements_the_contract(name, tiny_bert, method_ctx):
    """configure answers every device with an Assignment (int wire size > 0, a payload that fits
    its plan's layout on the method's host) or a Skip; aggregate with no updates keeps the global adapter."""
    from fedlegend.spec import inspect_model

    spec = inspect_model(tiny_bert, ("query", "value"))
    devs = [0, 1, 2, 3]
    ctx = method_ctx(spec=spec, n=len(devs), steps=(1, 2, 3, 4), label_counts=((6, 2), (2, 6), (4, 4), (5, 3)))
    m = make_method(name, ctx, {})
    assert m.info.name == name and m.info.host in ("lora", "bottleneck")
    host, g = _host_and_state(m.info.host, tiny_bert, spec, m.global_ranks())
    if m.info.residual:
        g = with_zero_residuals(g)
    est = {i: Estimate(0.5 * (i + 1), 0.1 * (i + 1), 1e-3) for i in devs}
    for round_, view in ((1, RoundView(1, devs)),
                         (2, RoundView(2, devs, est, {i: (float("inf"), float("inf")) for i in devs}))):
        out = m.configure(view, g)
        assert set(out) == set(devs)
        assert any(isinstance(a, Assignment) for a in out.values())
        for i, a in out.items():
            assert isinstance(a, (Assignment, Skip)), (i, a)
            if isinstance(a, Skip):
                assert isinstance(a.reason, str) and a.reason
                continue
            assert a.device == i and a.plan.depth >= 1
            assert type(a.download_bytes) is int and a.download_bytes > 0
            assert set(a.payload) <= set(g)
            host.load(host.use(a.plan.ranks), a.payload)      # the payload fits the plan's layout
        agg = m.aggregate(round_, g, [])
        assert isinstance(agg, Aggregated)
        assert set(agg.state) == set(g) and all(torch.equal(agg.state[k], g[k]) for k in g)
