import pytest

from fedlegend.devices import Fleet, Work, _apportion, step_work_flops


def test_paper_fleet_composition():
    assert _apportion(80, [30, 40, 10]) == [30, 40, 10]
    fleet = Fleet(80, seed=0)
    types = [d.type for d in fleet.devices]
    assert (types.count("tx2"), types.count("nx"), types.count("agx")) == (30, 40, 10)
    assert [sum(d.wifi_group == g for d in fleet.devices) for g in range(4)] == [20] * 4


def test_same_work_takes_about_100x_longer_on_the_slowest_device():
    """The paper's fleet: over the rounds (power modes re-drawn every 20), the same training work takes
    about 100 times longer on the slowest device in its slowest mode than on the fastest in its fastest."""
    fleet = Fleet(80, seed=0)
    work = Work(forward_flops=4e9, backward_flops=6e9, bytes_down=0, bytes_up=0)
    compute = {}
    for i in range(len(fleet)):
        for r in range(0, 400, 20):
            rt = fleet.time(i, r, work)
            compute[(i, r)] = rt.forward_s + rt.backward_s
    assert max(compute.values()) / min(compute.values()) == pytest.approx(100.0, rel=0.05)
    by_type = {t: [c for (i, _), c in compute.items() if fleet.devices[i].type == t] for t in ("tx2", "nx", "agx")}
    mean = {t: sum(v) / len(v) for t, v in by_type.items()}
    assert mean["tx2"] > mean["nx"] > mean["agx"]            # TX2 slowest, AGX Xavier fastest on average


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


def test_backward_work_grows_with_depth_forward_does_not(model_spec):
    s = model_spec(L=6, d=384)
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


def test_backward_cost_slows_the_backward_only_and_sets_the_depth_lever(model_spec):
    """fleet.backward_cost: seconds per backward FLOP over seconds per forward FLOP. At 1 (the FLOP
    count, what a CPU measures) depth 12 of a 12-layer model costs ~+85 % over depth 1; at 3.6 about
    the paper's +252 % (its fig. 4)."""
    work = Work(forward_flops=4e9, backward_flops=6e9, bytes_down=1000, bytes_up=1000)
    a, b = Fleet(4, seed=0).time(1, 3, work), Fleet(4, seed=0, backward_cost=2.5).time(1, 3, work)
    assert b.backward_s == pytest.approx(2.5 * a.backward_s)
    assert (b.forward_s, b.upload_s, b.download_s) == (a.forward_s, a.upload_s, a.download_s)
    s = model_spec(L=12, d=768)

    def step_s(fleet, k):
        ranks = {l: 8 for l in range(12 - k, 12)}
        f, g = step_work_flops(s, ranks, set(ranks), 8, 42)
        rt = fleet.time(0, 0, Work(f, g, 0, 0))
        return rt.forward_s + rt.backward_s
    for cost, lo, hi in ((1.0, 1.75, 2.0), (3.6, 3.3, 3.7)):
        fleet = Fleet(4, seed=0, backward_cost=cost)
        assert lo < step_s(fleet, 12) / step_s(fleet, 1) < hi
    with pytest.raises(ValueError, match="backward_cost"):
        Fleet(4, seed=0, backward_cost=0.0)
