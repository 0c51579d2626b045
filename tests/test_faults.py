"""Faults in the fleet model: per-round drop-outs (fleet.dropout_rate), the straggler cutoff
(fleet.cutoff_s), and how rejected, dropped and cut-off devices count in the round's time."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from fedlegend.config import ConfigError
from fedlegend.devices import Fleet, round_work
from fedlegend.engine.local import DeviceFailure, finish_round, plan_round, planned_work, run_device, run_local
from fedlegend.experiment import build_experiment
from fedlegend.methods.base import Estimator
from fedlegend.spec import key_layer


# ------------------------------------------------------------------ the fleet's draw
def test_dropout_draws_are_deterministic_at_the_configured_rate_and_change_no_other_draw():
    a, b = Fleet(50, seed=4, dropout_rate=0.3), Fleet(50, seed=4, dropout_rate=0.3)
    draws = [a.dropout(i, r) for i in range(50) for r in range(1, 201)]
    assert draws == [b.dropout(i, r) for i in range(50) for r in range(1, 201)]
    dropped = [s for s in draws if s is not None]
    assert len(dropped) / len(draws) == pytest.approx(0.3, abs=0.015)       # 10,000 draws
    assert all(0.0 <= s < 1.0 for s in dropped) and np.mean(dropped) == pytest.approx(0.5, abs=0.03)
    assert draws != [Fleet(50, seed=5, dropout_rate=0.3).dropout(i, r) for i in range(50) for r in range(1, 201)]
    off = Fleet(50, seed=4)
    assert all(off.dropout(i, r) is None for i in range(50) for r in range(1, 50))
    # its own generator: the devices, modes and bandwidths are those of the fleet without drop-outs
    assert a.devices == off.devices
    assert [a.state(i, r) for i in range(50) for r in range(30)] == [off.state(i, r) for i in range(50) for r in range(30)]
    with pytest.raises(ValueError, match="dropout_rate"):
        Fleet(4, seed=0, dropout_rate=1.0)


def test_config_ranges(tiny_cfg):
    assert tiny_cfg().fleet.dropout_rate == 0.0 and tiny_cfg().fleet.cutoff_s is None
    for bad in ({"fleet.dropout_rate": 1.0}, {"fleet.dropout_rate": -0.1}, {"fleet.cutoff_s": 0.0}):
        with pytest.raises(ConfigError, match=next(iter(bad)).split(".")[1]):
            tiny_cfg(**bad)


# ------------------------------------------------------------------ rounds with faults
@pytest.fixture(scope="module")
def exp(tiny_cfg):
    return build_experiment(tiny_cfg())


def variant(exp, tiny_cfg, **fleet):
    """The same experiment (model, data, method) under other fleet settings."""
    cfg = tiny_cfg(**{f"fleet.{k}": v for k, v in fleet.items()})
    f = cfg.fleet
    return replace(exp, cfg=cfg, fleet=Fleet(f.devices, cfg.run.seed, f.mode_change_every, f.bandwidth_min_mbps,
                                             f.bandwidth_max_mbps, f.downlink_factor, f.dropout_rate))


@pytest.fixture(scope="module")
def round1(exp):
    """Round 1's plan from a fresh estimator (every device at full depth) and every device's reply."""
    rp = plan_round(exp, 1, exp.initial_state, Estimator())
    return rp, {dev: run_device(exp, a) for dev, a in rp.assignments.items()}


@pytest.fixture(scope="module")
def clean(exp, round1):
    """Round 1 without faults."""
    rp, replies = round1
    return finish_round(exp, rp, exp.initial_state, Estimator(), replies)


def times_of(out):
    return {d["id"]: d["time_s"] for d in out.record["devices"]}


def test_planned_work_is_the_work_training_does(exp, round1):
    """A dropped device does not train; its work comes from the batches it would have drawn."""
    rp, replies = round1
    for dev, a in rp.assignments.items():
        res = replies[dev]
        done = round_work(exp.spec, a.plan.ranks, res.local.batch_shapes, a.download_bytes, 0)
        assert planned_work(exp, a) == done


def test_dropped_devices_count_in_the_round_time_and_feed_no_estimate(exp, tiny_cfg, run_round):
    ex = variant(exp, tiny_cfg, dropout_rate=0.5)
    # the first round (from 1) in which some device drops out and some stays: a function of the seed
    h = next(r for r in range(1, 100) if 0 < sum(ex.fleet.dropout(i, r) is not None for i in range(3)) < 3)
    drops = {i: ex.fleet.dropout(i, h) for i in range(3) if ex.fleet.dropout(i, h) is not None}
    est = Estimator()
    out = run_round(ex, h, ex.initial_state, est)
    events = {e["device"]: e for e in out.record["events"]}
    assert set(events) == set(drops) and {e["kind"] for e in events.values()} == {"dropped"}
    assert all(f"{drops[d]:.0%}" in e["detail"] for d, e in events.items())
    assert set(times_of(out)) == {0, 1, 2} - set(drops)
    assert set(est.estimates) == {0, 1, 2} - set(drops)          # no status report, no estimate
    # a dropped device fails before its upload, after part of its compute: no later than its full round
    rp = plan_round(exp, h, exp.initial_state, Estimator())
    for d, e in events.items():
        rt = exp.fleet.time(d, h, planned_work(exp, rp.assignments[d]))
        assert rt.download_s <= e["time_s"] <= rt.download_s + rt.forward_s + rt.backward_s
    # the server notices a drop-out when it happens: the round lasts until the last device was heard of
    heard = [*times_of(out).values(), *(e["time_s"] for e in events.values())]
    assert out.record["round_time_s"] == max(heard)
    assert {d["id"]: d["waiting_s"] for d in out.record["devices"]} == \
        {d: out.record["round_time_s"] - t for d, t in times_of(out).items()}


@pytest.mark.slow
def test_a_run_with_dropouts_completes_and_records_them(exp, tiny_cfg):
    ex = variant(exp, tiny_cfg, dropout_rate=0.6)
    _, records = run_local(ex, progress=False)
    assert len(records) == 2 and records[-1]["accuracy"] is not None
    events = [e for r in records for e in r["events"]]
    assert events and all(e["kind"] == "dropped" and e["time_s"] > 0 and "dropped out" in e["detail"] for e in events)
    expected = {(r, i) for r in (1, 2) for i in range(3) if ex.fleet.dropout(i, r) is not None}
    assert {(r["round"], e["device"]) for r in records for e in r["events"]} == expected
    assert all(r["round_time_s"] >= max((e["time_s"] for e in r["events"]), default=0.0) for r in records)


def test_a_rejected_slow_device_no_longer_shortens_the_round(exp, round1, clean):
    """The slowest device sends garbage: its update is rejected, but the server waited for it."""
    times = times_of(clean)
    slowest = max(times, key=times.get)
    assert clean.record["round_time_s"] == times[slowest]
    rp, replies = round1
    bad = replies[slowest]
    garbage = {k: torch.full_like(t, float("nan")) for k, t in bad.local.state.items()}
    est = Estimator()
    out = finish_round(exp, rp, exp.initial_state, est,
                       {**replies, slowest: replace(bad, local=replace(bad.local, state=garbage))})
    [ev] = out.record["events"]
    assert (ev["device"], ev["kind"], ev["time_s"]) == (slowest, "rejected", times[slowest]) and "NaN" in ev["detail"]
    assert out.record["round_time_s"] == clean.record["round_time_s"]      # was: the second slowest's time
    assert times_of(out) == {d: t for d, t in times.items() if d != slowest}
    assert all(d["waiting_s"] == clean.record["round_time_s"] - d["time_s"] for d in out.record["devices"])
    assert slowest not in est.estimates


def test_the_cutoff_cuts_and_the_round_lasts_the_cutoff(exp, tiny_cfg, round1, clean):
    times = times_of(clean)
    order = sorted(times, key=times.get)
    cutoff = (times[order[1]] + times[order[2]]) / 2                        # cuts the slowest device only
    ex = variant(exp, tiny_cfg, cutoff_s=cutoff)
    est = Estimator()
    out = finish_round(ex, round1[0], ex.initial_state, est, round1[1])
    [ev] = out.record["events"]
    assert (ev["device"], ev["kind"], ev["time_s"]) == (order[2], "cut-off", cutoff)
    assert f"{times[order[2]]:.2f} s" in ev["detail"]
    assert out.record["round_time_s"] == cutoff
    assert times_of(out) == {d: times[d] for d in order[:2]}
    assert {d["id"]: d["waiting_s"] for d in out.record["devices"]} == {d: cutoff - times[d] for d in order[:2]}
    assert set(est.estimates) == set(order[:2])
    # a cutoff nobody reaches changes nothing
    far = finish_round(variant(exp, tiny_cfg, cutoff_s=10 * max(times.values())), round1[0], exp.initial_state,
                       Estimator(), round1[1])
    assert far.record == clean.record


def test_a_dropout_after_the_cutoff_is_cut_off(exp, tiny_cfg):
    ex = variant(exp, tiny_cfg, cutoff_s=1.0)
    rp = plan_round(ex, 1, ex.initial_state, Estimator())
    replies = {0: DeviceFailure(0, "dropped", "dropped out", 3.0), 1: DeviceFailure(1, "dropped", "dropped out", 0.5)}
    out = finish_round(ex, rp, ex.initial_state, Estimator(), replies)
    ev = {e["device"]: e for e in out.record["events"]}
    assert (ev[0]["kind"], ev[0]["time_s"]) == ("cut-off", 1.0) and "dropped" in ev[0]["detail"]
    assert (ev[1]["kind"], ev[1]["time_s"]) == ("dropped", 0.5)
    assert (ev[2]["kind"], ev[2]["time_s"]) == ("dropped", 1.0)            # no reply: the server waited to the cutoff
    assert out.record["round_time_s"] == 1.0 and out.record["devices"] == []


def test_layerwise_aggregation_keeps_the_previous_global_for_layers_only_dropped_devices_trained(exp, tiny_cfg, round1,
                                                                                                    run_round):
    """LEGEND, round 2: the deepest device alone trains the lowest layers; it drops out, so those layers
    keep round 1's global value while the layers the others trained move."""
    est = Estimator()
    g1 = finish_round(exp, round1[0], exp.initial_state, est, round1[1]).state
    rp = plan_round(exp, 2, g1, est)
    layers = {d: set(a.plan.layers) for d, a in rp.assignments.items()}
    deepest = max(layers, key=lambda d: len(layers[d]))
    alone = layers[deepest] - set().union(*(l for d, l in layers.items() if d != deepest))
    assert alone, f"no layer trained by device {deepest} alone: {layers}"

    ex = variant(exp, tiny_cfg, dropout_rate=0.5)
    ex.fleet.dropout = lambda device, round_: 0.5 if device == deepest else None
    out = run_round(ex, 2, g1, est)
    assert [(e["device"], e["kind"]) for e in out.record["events"]] == [(deepest, "dropped")]
    lora = [k for k in g1 if key_layer(k) is not None]
    assert all(torch.equal(out.state[k], g1[k]) for k in lora if key_layer(k) in alone)
    assert any(not torch.equal(out.state[k], g1[k]) for k in lora if key_layer(k) not in alone)


def test_a_dropout_crosses_the_flower_wire():
    fl = pytest.importorskip("fedlegend.engine.flower.wire")
    back = fl.content_to_result(fl.result_to_content(DeviceFailure(2, "dropped", "dropped out", 1.25), 4), 2, 4)
    assert back == DeviceFailure(2, "dropped", "dropped out", 1.25)
    back = fl.content_to_result(fl.result_to_content(DeviceFailure(2, "rejected", "bad"), 4), 2, 4)
    assert back == DeviceFailure(2, "rejected", "bad", None)
