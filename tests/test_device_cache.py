"""The device activation cache (fleet.device_activation_cache): cost model, budget, estimates, resume."""

import json

import numpy as np
import pytest

from fedlegend.device_cache import MB, DeviceCaches, frozen_version, record_fields
from fedlegend.devices import RoundTime, Work, round_work
from fedlegend.engine.local import status_report
from fedlegend.methods.base import LoraPlan

H, W = 32, 10          # the hand-made spec's hidden size; the padded width of every test batch
# one frozen encoder layer's forward for ONE example of width W: 2 W (4 h^2 + 2 h i) + 4 W^2 h (scores, mix)
LAYER_1 = 2 * W * (4 * H * H + 2 * H * 4 * H) + 4 * W * W * H          # = 258,560 FLOPs
LORA_1 = 2 * W * 2 * (2 * (H + H))                                      # rank 2 on q and v, one example


def price(caches, spec, ranks, batches, version=0, keep=True, lengths=None, device=0):
    shapes = [(len(b), W, 1) for b in batches]
    work = round_work(spec, ranks, shapes, 100, 10)
    lengths = lengths or [W] * 64
    return work, caches.price(device, spec, ranks, [np.asarray(b) for b in batches], shapes, lengths, version,
                              work, keep)


def test_hand_computed_layer_flops(model_spec):
    from fedlegend.devices import layer_forward_flops, lora_forward_flops
    spec = model_spec(L=6, d=H)
    assert LAYER_1 == 258_560 and layer_forward_flops(spec, 1, W) == LAYER_1
    assert lora_forward_flops(spec, 4, 2, 1, W) == LORA_1


def test_a_hit_costs_no_forward_below_the_boundary(model_spec):
    spec, caches = model_spec(L=6, d=H), DeviceCaches(budget_mb=1.0)
    ranks = {4: 2, 5: 2}                                    # boundary 4: layers 0-3 frozen below it
    full, cold = price(caches, spec, ranks, [[0, 1]])
    assert cold.work == full and (cold.hits, cold.misses) == (0, 2)   # first pass: everything runs
    _, warm = price(caches, spec, ranks, [[0, 1]])
    assert (warm.hits, warm.partial, warm.misses) == (2, 0, 0)
    assert full.forward_flops - warm.work.forward_flops == 2 * 4 * LAYER_1   # 2 examples x layers 0..3
    assert warm.work.backward_flops == full.backward_flops and warm.work.bytes_up == full.bytes_up
    # the trained span's forward: layers 4, 5 and their LoRA, for the batch of 2
    assert warm.top_forward_flops == 2 * (2 * LAYER_1 + 2 * LORA_1)
    _, mixed = price(caches, spec, ranks, [[1, 2]])         # one hit, one new example
    assert (mixed.hits, mixed.misses) == (1, 1)
    assert full.forward_flops - mixed.work.forward_flops == 4 * LAYER_1


def test_a_changed_boundary_or_base_invalidates(model_spec):
    spec, caches = model_spec(L=6, d=H), DeviceCaches(budget_mb=1.0)
    price(caches, spec, {4: 2, 5: 2}, [[0, 1]])                       # cached at boundary 4
    full3, deeper = price(caches, spec, {3: 2, 4: 2, 5: 2}, [[0, 1]])   # boundary 3: states at 4 are of no use
    assert deeper.work == full3 and deeper.misses == 2
    full5, shallower = price(caches, spec, {5: 2}, [[0, 1]])           # now cached at 3; boundary 5
    assert shallower.partial == 2                                       # runs layers 3, 4 only
    assert full5.forward_flops - shallower.work.forward_flops == 2 * 3 * LAYER_1
    _, same = price(caches, spec, {5: 2}, [[0, 1]])
    assert same.hits == 2
    full_v, stale = price(caches, spec, {5: 2}, [[0, 1]], version=7)  # frozen weights changed (a residual)
    assert stale.work == full_v and stale.misses == 2
    assert frozen_version(True, 3) != frozen_version(True, 4) and frozen_version(False, 3) == frozen_version(False, 4)


def test_boundary_zero_neither_reads_nor_writes(model_spec):
    spec, caches = model_spec(L=6, d=H), DeviceCaches(budget_mb=1.0)
    ranks = {l: 2 for l in range(6)}                        # FedLoRA's plan: nothing frozen below
    full, out = price(caches, spec, ranks, [[0, 1]])
    assert out.work == full and out.stored_bytes == 0 and (out.hits, out.misses) == (0, 0)
    assert out.top_forward_flops == 2 * (6 * LAYER_1 + 6 * LORA_1)


def test_the_budget_bounds_storage(model_spec):
    spec = model_spec(L=6, d=H)
    entry = W * H * 2                                       # fp16 states of a 10-token example: 640 bytes
    caches = DeviceCaches(budget_mb=(2 * entry + 100) / MB)  # room for two entries
    _, out = price(caches, spec, {5: 2}, [[0, 1, 2, 3]])
    assert out.stored_bytes == 2 * entry <= caches.budget_bytes and out.evicted == 2
    assert list(caches.device(0).entries) == [2, 3]          # least recently used evicted
    _, again = price(caches, spec, {5: 2}, [[2, 3]])
    assert again.hits == 2
    lengths = [W] * 8 + [1000]                               # example 8 alone exceeds the budget: not kept
    _, big = price(caches, spec, {5: 2}, [[8]], lengths=lengths)
    assert big.misses == 1 and 8 not in caches.device(0).entries and caches.device(0).used == 2 * entry


def test_a_failed_round_leaves_the_cache_as_it_was(model_spec):
    spec, caches = model_spec(L=6, d=H), DeviceCaches(budget_mb=1.0)
    price(caches, spec, {4: 2, 5: 2}, [[0]])
    before = json.dumps(caches.state_dict())
    _, out = price(caches, spec, {4: 2, 5: 2}, [[0, 1], [1]], keep=False)
    assert (out.hits, out.misses) == (2, 1)                  # example 1's second pass, a later step: a hit
    assert json.dumps(caches.state_dict()) == before


def test_state_round_trips(model_spec):
    spec, caches = model_spec(L=6, d=H), DeviceCaches(budget_mb=1.0)
    price(caches, spec, {4: 2, 5: 2}, [[0, 1]], device=2)
    price(caches, spec, {5: 2}, [[3]], device=1)
    other = DeviceCaches(budget_mb=1.0)
    other.load_state_dict(json.loads(json.dumps({str(k): v for k, v in caches.state_dict().items()})))
    assert other.state_dict() == caches.state_dict() and other.max_mb() == caches.max_mb()
    rows = [out.row() for out in (price(caches, spec, {5: 2}, [[3]], device=1)[1],)]
    fields = record_fields(caches, rows)
    assert fields["device_cache_hits"] == 1 and fields["device_cache_mb"] == caches.max_mb()
    assert record_fields(None, rows) == {}


def test_status_report_moves_the_trained_forward_to_mu():
    rt = RoundTime(download_s=1.0, forward_s=3.0, backward_s=4.0, upload_s=2.0)
    plan = LoraPlan(0, {4: 2, 5: 2})
    plain, cached = status_report(0, rt, plan, 8), status_report(0, rt, plan, 8, top_forward_s=1.0)
    assert (plain.fixed_s, plain.backward_per_layer_s) == (4.0, 2.0)
    assert (cached.fixed_s, cached.backward_per_layer_s) == (3.0, 2.5)
    # eq. 12's prediction of this round's time is the same either way
    assert plain.fixed_s + 2 * plain.backward_per_layer_s == cached.fixed_s + 2 * cached.backward_per_layer_s


def test_refused_under_flower():
    from fedlegend.config import build_config
    from fedlegend.errors import UserError
    with pytest.raises((UserError, ValueError), match="local engine only"):
        build_config({}, {"fleet.device_activation_cache": True, "run.engine": "flower"})


# ------------------------------------------------------------------ end to end (real model, tiny run)
@pytest.fixture(scope="module")
def runs(tiny_cfg, tmp_path_factory):
    """LEGEND and FedLoRA, 3 rounds of 3 local steps, with and without the cache."""
    from fedlegend import rundir as runner
    out = {}
    for method in ("legend", "fedlora"):
        for on in (False, True):
            cfg = tiny_cfg(**{"method.name": method, "run.rounds": 3, "train.local_steps": 3, "run.eval_every": 3,
                              "fleet.device_activation_cache": on})
            d = tmp_path_factory.mktemp(f"{method}-{on}")
            runner.run_experiment(cfg, d, progress=False)
            out[method, on] = [json.loads(l) for l in (d / "records.jsonl").read_text().splitlines()]
    return out


CACHE_KEYS = ("device_cache_mb", "device_cache_hits", "device_cache_partial", "device_cache_misses")


def strip(records):
    out = []
    for r in records:
        r = {k: v for k, v in r.items() if k not in CACHE_KEYS}
        r["devices"] = [{k: v for k, v in d.items() if not k.startswith("cache_")} for d in r["devices"]]
        out.append(r)
    return out


@pytest.mark.slow   # four real 3-round runs, about 40 s on 2 cores
def test_end_to_end(runs):
    assert not any(k in r for r in runs["legend", False] for k in CACHE_KEYS)   # off: records as before
    # FedLoRA trains every layer: nothing below its boundary, the same virtual time with the cache on
    assert strip(runs["fedlora", True]) == runs["fedlora", False]
    assert all(r["device_cache_mb"] == 0 for r in runs["fedlora", True])
    # LEGEND: round 1 is the same (profiling at full depth); later rounds run shallower devices cheaper
    on, off = runs["legend", True], runs["legend", False]
    assert on[0]["round_time_s"] == off[0]["round_time_s"]
    assert any(r["device_cache_mb"] > 0 for r in on) and all(r["device_cache_misses"] >= 0 for r in on)


class Stop(Exception):
    pass


@pytest.mark.slow   # two real 3-round runs
def test_resumed_run_equals_uninterrupted(tiny_cfg, tmp_path, monkeypatch):
    """Stopped after round 2 (the caches hold entries by then) and resumed: the same records and summary."""
    from fedlegend import rundir as runner

    cfg = tiny_cfg(**{"method.name": "legend", "run.rounds": 3, "train.local_steps": 3, "run.eval_every": 2,
                      "data.eval_subset": 32, "fleet.device_activation_cache": True})
    runner.run_experiment(cfg, tmp_path / "whole", progress=False)
    real = runner.save_checkpoint

    def save_then_stop(path, cfg, snap, wall_clock_s):
        real(path, cfg, snap, wall_clock_s)
        if snap.round == 2:
            assert any(c["entries"] for c in snap.devices.values())
            raise Stop

    monkeypatch.setattr(runner, "save_checkpoint", save_then_stop)
    with pytest.raises(Stop):
        runner.run_experiment(cfg, tmp_path / "cut", progress=False)
    monkeypatch.undo()
    runner.run_experiment(cfg, tmp_path / "cut", progress=False, resume=True)

    def summary(d):
        s = json.loads((d / "summary.json").read_text())
        return {k: v for k, v in s.items() if k not in ("wall_clock_s", "peak_rss_mb")}

    assert (tmp_path / "cut" / "records.jsonl").read_text() == (tmp_path / "whole" / "records.jsonl").read_text()
    assert summary(tmp_path / "cut") == summary(tmp_path / "whole")
    assert "peak_device_cache_mb" in summary(tmp_path / "whole")
