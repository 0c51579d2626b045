"""LEGEND's pieces on hand-checked inputs (section 4 of seed 003)."""

import math

import pytest
import torch

from fedlegend.methods.base import (DeviceUpdate, Estimate, Estimator, StatusReport, layerwise_average,
                                    moving_average, select_layers)
from fedlegend.methods.legend import (DeviceCost, PlanError, completion_time, depth_gap, initial_depth, lcd,
                                      mean_waiting, rank_distribution)


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
