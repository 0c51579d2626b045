"""LEGEND's pieces on hand-checked inputs (section 4 of seed 003), LCD's properties on random inputs, and
eq. 14-15 end to end on a real experiment with a round deadline."""

import csv

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlegend.methods.aggregation import DeviceUpdate, layerwise_average, select_layers
from fedlegend.methods.base import Estimate, Estimator, StatusReport, moving_average
from fedlegend.methods.legend import (DeviceCost, PlanError, completion_time, depth_gap, fits_budget, initial_depth,
                                      lcd, mean_waiting, rank_distribution)


def test_moving_average_eq8_9():
    assert moving_average(10.0, 5.0, 0.8) == pytest.approx(9.0)
    est = Estimator(rho=0.8)
    est.observe(StatusReport(0, fixed_s=1.0, backward_per_layer_s=2.0, upload_per_rank_s=0.5, samples=4))
    e = est.observe(StatusReport(0, fixed_s=2.0, backward_per_layer_s=7.0, upload_per_rank_s=1.5, samples=4))
    assert (e.fixed_s, e.mu, e.beta) == pytest.approx((1.2, 3.0, 0.7))
    with pytest.raises(ValueError):
        Estimator(rho=1.5)


def test_rank_distribution_arithmetic_within_budget():
    assert rank_distribution(6, 48, 1) == [5, 6, 7, 8, 9, 10]      # sum 45 <= 48; r0 = 6 would give 51
    assert rank_distribution(4, 10, 1) == [1, 2, 3, 4]
    assert rank_distribution(6, 48, 0) == [8] * 6                   # uniform ranks (w/o RD)
    with pytest.raises(PlanError, match="psi >= 10"):
        rank_distribution(4, 9, 1)


def test_completion_time_eq12_and_waiting_eq13():
    est = Estimate(fixed_s=2.0, mu=1.5, beta=0.1)
    ranks = [1, 2, 3, 4]
    # depth 2 -> layers 2,3 with ranks 3+4: 2 + 2*1.5 + 7*0.1
    assert completion_time(est, 2, ranks) == pytest.approx(5.7)
    assert mean_waiting([1.0, 3.0, 5.0]) == pytest.approx((4 + 2 + 0) / 3)


def test_depth_gap_line2():
    assert depth_gap(12, 10.0, 10.0) == 0
    assert depth_gap(12, 10.0, 5.0) == 6          # ceil(12 * 0.5)
    assert depth_gap(12, 100.0, 1.0) == 12        # ceil(11.88)


def test_initial_depth_follows_the_text():
    L, gap = 12, 6
    assert initial_depth(L, gap, t_i=5.0, t_max=10.0, t_min=5.0) == 12    # fastest -> L
    assert initial_depth(L, gap, t_i=10.0, t_max=10.0, t_min=5.0) == 6    # slowest -> L - k^h
    assert initial_depth(L, gap, t_i=7.5, t_max=10.0, t_min=5.0) == 9     # halfway -> halfway
    assert initial_depth(L, gap, t_i=3.0, t_max=3.0, t_min=3.0) == 12     # homogeneous


def _cost(fixed, mu, beta, ranks, feasible=None):
    L = len(ranks)
    est = Estimate(fixed, mu, beta)
    return DeviceCost([completion_time(est, k, ranks) for k in range(L + 1)], feasible or [True] * (L + 1))


def test_lcd_fast_device_full_depth_slow_device_shallow():
    ranks = [1, 2, 3, 4]
    costs = {0: _cost(1.0, 0.1, 0.01, ranks), 1: _cost(5.0, 10.0, 0.01, ranks)}
    depth = lcd(costs, 4, min_depth=1, fill_idle=False)
    # full-depth times 1.5 and 45.1 -> gap ceil(4 * 43.6/45.1) = 4, clipped to L - min_depth = 3
    assert depth == {0: 4, 1: 1}


def test_lcd_budget_lowers_depth_eq14_15():
    ranks = [1, 2, 3, 4]
    feasible = [True, True, True, False, False]          # the budget allows at most 2 layers
    costs = {0: _cost(1.0, 0.1, 0.01, ranks, feasible), 1: _cost(1.0, 0.1, 0.01, ranks)}
    assert lcd(costs, 4, fill_idle=False)[0] == 2
    none = [True, False, False, False, False]            # not even one layer fits: sits the round out
    assert lcd({0: _cost(1.0, 0.1, 0.01, ranks, none)}, 4)[0] == 0


def test_lcd_waiting_threshold_and_fill_idle():
    ranks = [1, 1, 1, 1]
    # three equal devices and one 3x slower per layer
    costs = {i: _cost(0.0, 1.0, 0.0, ranks) for i in range(3)}
    costs[3] = _cost(0.0, 3.0, 0.0, ranks)
    d = lcd(costs, 4, epsilon_s=None, fill_idle=False)
    # full-depth times 4,4,4,12 -> gap ceil(4*8/12)=3 -> slow device depth 1 (3 s), others 4 (4 s)
    assert d == {0: 4, 1: 4, 2: 4, 3: 1}
    times = [costs[i].time[d[i]] for i in range(4)]
    assert mean_waiting(times) == pytest.approx(0.25)
    # fill_idle gives the slow device nothing more (its depth 2 would take 6 s > 4 s)
    assert lcd(costs, 4, fill_idle=True)[3] == 1
    # epsilon below the current waiting takes layers off the slowest device(s)
    d2 = lcd(costs, 4, epsilon_s=0.1, fill_idle=False)
    assert d2 == {0: 3, 1: 3, 2: 3, 3: 1}      # all finish at 3 s: W = 0


def test_lcd_fill_idle_deepens_device_with_slack():
    ranks = [1, 1, 1, 1]
    costs = {0: _cost(0.0, 1.0, 0.0, ranks), 1: _cost(0.0, 2.5, 0.0, ranks), 2: _cost(0.0, 10.0, 0.0, ranks)}
    no_fill = lcd(costs, 4, fill_idle=False)
    fill = lcd(costs, 4, fill_idle=True)
    t_round = max(costs[i].time[no_fill[i]] for i in costs)
    assert all(fill[i] >= no_fill[i] for i in costs)
    assert no_fill[1] == 3 and fill[1] == 4                 # device 1 had 2.5 s of slack: one more layer
    assert max(costs[i].time[fill[i]] for i in costs) == pytest.approx(t_round)   # round not longer


def test_lcd_rejects_min_depth_beyond_model():
    with pytest.raises(PlanError, match="within 1..4"):
        lcd({0: _cost(0, 1, 0, [1, 1, 1, 1])}, 4, min_depth=5)


def test_layerwise_average_eq17_only_layers_trained():
    g = {"layers.0.q.lora_A": torch.zeros(2, 3), "layers.1.q.lora_A": torch.zeros(2, 3), "head.w": torch.zeros(2)}
    u1 = DeviceUpdate(0, {"layers.1.q.lora_A": torch.ones(2, 3), "head.w": torch.ones(2)}, samples=1)
    u2 = DeviceUpdate(1, {"layers.1.q.lora_A": 3 * torch.ones(2, 3), "head.w": 3 * torch.ones(2)}, samples=3)
    mean = layerwise_average(g, [u1, u2], "mean")
    assert torch.equal(mean["layers.0.q.lora_A"], g["layers.0.q.lora_A"])    # nobody trained layer 0
    assert torch.allclose(mean["layers.1.q.lora_A"], torch.full((2, 3), 2.0))  # (1 + 3) / 2
    weighted = layerwise_average(g, [u1, u2], "samples")
    assert torch.allclose(weighted["head.w"], torch.full((2,), 2.5))            # (1*1 + 3*3) / 4


def test_select_layers_eq19():
    g = {"layers.0.q.lora_A": 0, "layers.5.q.lora_A": 1, "layers.5.q.lora_B": 2, "head.w": 3}
    assert set(select_layers(g, [5])) == {"layers.5.q.lora_A", "layers.5.q.lora_B", "head.w"}


# ------------------------------------------------------------------ LCD on random estimates and budgets
SETTINGS = settings(max_examples=60, deadline=None)
nonneg = st.floats(0.0, 50.0, allow_nan=False)


@st.composite
def lcd_inputs(draw):
    """(costs, L, min_depth, epsilon): random estimates (eq. 12 times) and random budgets (C_i, B_i) against
    a cost that grows with depth, FLOPs F_i + k f_i and upload u_i * (sum of the top-k ranks) (eq. 14-15)."""
    L = draw(st.integers(1, 8))
    ranks = draw(st.lists(st.integers(1, 16), min_size=L, max_size=L))
    costs = {}
    for i in range(draw(st.integers(1, 6))):
        est = Estimate(draw(nonneg), draw(nonneg), draw(st.floats(0.0, 1.0)))
        f0, f1, u = draw(st.floats(0.0, 10.0)), draw(st.floats(0.01, 10.0)), draw(st.floats(0.01, 1.0))
        budget = (draw(st.floats(0.0, 1.2 * (f0 + L * f1))), draw(st.floats(0.0, 1.2 * u * sum(ranks))))
        feasible = [True] + [fits_budget(f0 + k * f1, u * sum(ranks[L - k:]), budget) for k in range(1, L + 1)]
        costs[i] = DeviceCost([completion_time(est, k, ranks) for k in range(L + 1)], feasible)
    min_depth = draw(st.integers(1, L))
    epsilon = draw(st.none() | st.floats(0.0, 20.0))
    return costs, L, min_depth, epsilon


def round_time(costs, depth):
    """How long the round lasts: the slowest device that trains (0 if none does)."""
    return max((costs[i].time[k] for i, k in depth.items() if k > 0), default=0.0)


@SETTINGS
@given(inp=lcd_inputs(), fill_idle=st.booleans())
def test_lcd_depths_in_range_feasible_and_zero_only_when_nothing_fits(inp, fill_idle):
    costs, L, min_depth, epsilon = inp
    depth = lcd(costs, L, min_depth, epsilon, fill_idle)
    assert set(depth) == set(costs)
    for i, k in depth.items():
        assert 0 <= k <= L
        if k > 0:
            assert k >= min_depth and costs[i].feasible[k]          # eq. 14-15 hold at the chosen depth
        fits_some = any(costs[i].feasible[j] for j in range(min_depth, L + 1))
        assert (k == 0) == (not fits_some)                         # sits out exactly when nothing >= min_depth fits


@SETTINGS
@given(inp=lcd_inputs())
def test_lcd_fill_idle_never_lengthens_the_round(inp):
    costs, L, min_depth, epsilon = inp
    plain = lcd(costs, L, min_depth, epsilon, fill_idle=False)
    filled = lcd(costs, L, min_depth, epsilon, fill_idle=True)
    assert {i for i, k in filled.items() if k > 0} == {i for i, k in plain.items() if k > 0}
    assert all(filled[i] >= plain[i] for i in costs)
    assert round_time(costs, filled) <= round_time(costs, plain)


@SETTINGS
@given(data=st.data(), n=st.integers(1, 5))
def test_legend_plans_fit_random_budgets(data, n, method_ctx):
    """Through the method: with random estimates, steps and budgets, every plan's FLOPs (its device's
    steps at the nominal width) and upload (the bytes of the tensors it trains) fit C_i and B_i."""
    from fedlegend.devices import step_work_flops
    from fedlegend.methods import make_method
    from fedlegend.methods.base import Assignment, RoundView, trained_part
    from fedlegend.spec import state_bytes

    steps = data.draw(st.lists(st.integers(1, 20), min_size=n, max_size=n))
    ctx = method_ctx(L=4, n=n, d=16, steps=tuple(steps))
    m = make_method("legend", ctx, {"legend": {"rank_budget": 16}})
    g = _zero_state(ctx.spec, m.global_ranks())
    full = step_work_flops(ctx.spec, m.global_ranks(), set(m.global_ranks()), ctx.batch_size, ctx.nominal_width)
    est = {i: Estimate(data.draw(nonneg), data.draw(nonneg), data.draw(st.floats(0.0, 1.0))) for i in range(n)}
    budgets = {i: (data.draw(st.floats(0.0, 1.1)) * steps[i] * sum(full),
                   data.draw(st.floats(0.0, 1.1)) * state_bytes(g)) for i in range(n)}
    out = m.configure(RoundView(2, list(range(n)), est, budgets), g)
    for i, a in out.items():
        if isinstance(a, Assignment):
            f, b = step_work_flops(ctx.spec, a.plan.ranks, set(a.plan.ranks), ctx.batch_size, ctx.nominal_width)
            assert steps[i] * (f + b) <= budgets[i][0]
            assert state_bytes(trained_part(a.payload, a.plan)) <= budgets[i][1]


def _zero_state(spec, ranks):
    """A float32 global LoRA adapter of a hand-made spec (every pair and the head)."""
    from fedlegend.spec import lora_key

    g = {f"head.{k}": torch.zeros(s) for k, s in spec.head_shapes.items()}
    for t in spec.targets:
        g[lora_key(t.layer, t.module, "lora_A")] = torch.zeros(ranks[t.layer], t.d_in)
        g[lora_key(t.layer, t.module, "lora_B")] = torch.zeros(t.d_out, ranks[t.layer])
    return g


# ------------------------------------------------------------------ eq. 14-15 end to end
@pytest.fixture(scope="module")
def small_csv(tmp_path_factory):
    """200 real Rotten Tomatoes snippets: an epoch of a device is a few steps, so epoch mode trains fast."""
    from fedlegend.datasets import resolve_dataset

    ds = resolve_dataset("rotten-tomatoes")
    path = tmp_path_factory.mktemp("data") / "small.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows([t, ds.label_names[l]] for t, l in list(zip(ds.texts, ds.labels))[:200])
    return path


@pytest.mark.parametrize("mode", [{"train.local_steps": 2},
                                  {"train.local_steps": 0, "train.local_epochs": 1.0}], ids=["steps", "epoch"])
def test_legend_plans_fit_the_round_deadline_budgets(mode, small_csv, tiny_cfg, run_round):
    """fleet.round_deadline_s sets C_i = speed * deadline and B_i = bandwidth * deadline; after a real round 1
    gave the estimates, every device LEGEND assigns in round 2 must fit: its steps this round (its epoch
    in epoch mode) times one step's FLOPs at the nominal width within C_i, its upload within B_i."""
    from fedlegend.devices import step_work_flops
    from fedlegend.engine.local import plan_round
    from fedlegend.experiment import build_experiment
    from fedlegend.methods.base import Estimator, trained_part
    from fedlegend.spec import state_bytes

    cfg = tiny_cfg(**{"method.name": "legend", "data.name": "file", "data.path": str(small_csv),
                      "data.test_size": 40, "data.eval_subset": None, **mode})
    exp = build_experiment(cfg)
    m, spec, ctx, L = exp.method, exp.spec, exp.method.ctx, exp.spec.num_layers
    assert list(ctx.local_steps) == exp.steps and (mode["train.local_steps"] or min(exp.steps) > 2)
    estimator = Estimator(m.info.rho)
    state = run_round(exp, 1, exp.initial_state, estimator).state          # round 1 gives the estimates
    assert set(estimator.estimates) == set(range(len(exp.fleet)))

    def flops(dev, ranks):    # the device's steps this round times one step at the method's nominal width
        return exp.steps[dev] * sum(step_work_flops(spec, ranks, set(ranks), ctx.batch_size, ctx.nominal_width))

    free = plan_round(exp, 2, state, estimator)                            # no deadline: LCD by time alone
    deepest = next(d for d, a in free.assignments.items() if a.plan.depth == L)
    # a deadline that leaves the full-depth device 80 % of the compute its full depth needs this round
    deadline = 0.8 * flops(deepest, m.layer_ranks(L)) / (exp.fleet.state(deepest, 2).gflops * 1e9)
    exp.cfg.fleet.round_deadline_s = deadline
    rp = plan_round(exp, 2, state, estimator)
    assert rp.assignments, "the deadline leaves nobody a plan: the FLOPs check below would be vacuous"
    for dev, a in rp.assignments.items():
        C, B = exp.fleet.budgets(dev, 2, exp.cfg.fleet.round_deadline_s)
        assert a.steps == exp.steps[dev]
        assert flops(dev, a.plan.ranks) <= C, (dev, a.plan.depth, flops(dev, a.plan.ranks), C)
        assert state_bytes(trained_part(a.payload, a.plan)) <= B
    depth = lambda p, d: p.assignments[d].plan.depth if d in p.assignments else 0
    assert depth(rp, deepest) < L                                          # the budget binds ...
    assert any(depth(rp, d) < depth(free, d) for d in free.devices)        # ... and changes the plan
