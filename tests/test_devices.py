import pytest

from fedlegend.devices import DEVICE_TYPES, Fleet, Work, _apportion, step_work_flops
from fedlegend.lora import LoraTarget, ModelSpec


def spec(L=6, h=384):
    t = tuple(LoraTarget(l, m, f"enc.layer.{l}.{m}", h, h) for l in range(L) for m in ("q", "v"))
    return ModelSpec(L, h, 4 * h, t, "classifier", {"weight": (2, h), "bias": (2,)})


def test_paper_fleet_composition():
    assert _apportion(80, [30, 40, 10]) == [30, 40, 10]
    fleet = Fleet(80, seed=0)
    types = [d.type for d in fleet.devices]
    assert (types.count("tx2"), types.count("nx"), types.count("agx")) == (30, 40, 10)
    assert [sum(d.wifi_group == g for d in fleet.devices) for g in range(4)] == [20] * 4


def test_speed_ratio_about_100x():
    fastest = max(max(t.mode_gflops) for t in DEVICE_TYPES.values())
    slowest = min(min(t.mode_gflops) for t in DEVICE_TYPES.values())
    assert fastest / slowest == pytest.approx(100.0)


def test_deterministic_and_modes_change_every_20_rounds():
    a, b = Fleet(20, seed=1), Fleet(20, seed=1)
    assert [a.state(i, r) for i in range(20) for r in range(45)] == [b.state(i, r) for i in range(20) for r in range(45)]
    modes = [[a.state(i, r).mode for r in range(60)] for i in range(20)]
    for m in modes:
        assert len(set(m[0:20])) == len(set(m[20:40])) == 1       # constant within a 20-round epoch
    assert any(m[0] != m[20] or m[20] != m[40] for m in modes)      # and re-drawn between them
    assert [d.type for d in Fleet(20, seed=2).devices] != [d.type for d in a.devices] or \
        [d.wifi_group for d in Fleet(20, seed=2).devices] != [d.wifi_group for d in a.devices]


def test_bandwidth_within_range():
    f = Fleet(40, seed=3)
    bws = [f.state(i, r).up_mbps for i in range(40) for r in range(30)]
    assert min(bws) >= 1.0 and max(bws) <= 30.0 and len(set(bws)) > 100


def test_backward_work_grows_with_depth_forward_does_not():
    s = spec()
    works = []
    for k in range(1, 7):
        ranks = {l: 4 for l in range(6 - k, 6)}
        works.append(step_work_flops(s, ranks, set(ranks), 16, 40))
    fwd = [w[0] for w in works]
    bwd = [w[1] for w in works]
    assert all(b2 > b1 for b1, b2 in zip(bwd, bwd[1:]))
    assert max(fwd) / min(fwd) < 1.01     # forward always runs through all layers


def test_time_from_work():
    f = Fleet(4, seed=0)
    s = f.state(0, 0)
    rt = f.time(0, 0, Work(forward_flops=s.gflops * 1e9, backward_flops=0.0, bytes_down=0, bytes_up=int(s.up_mbps * 1e6 / 8)))
    assert rt.forward_s == pytest.approx(1.0) and rt.upload_s == pytest.approx(1.0)
    assert rt.total_s == pytest.approx(2.0)
