"""A round's devices in parallel processes (workers.py, run.workers) against one process.

Each worker runs torch with one thread, so the reference is a one-thread run of this process
(run.threads = 1): the same code on the same inputs, and the records and adapters come out equal
to the bit. (Against a two-thread run they differ by float rounding only: matrix products split
over threads sum in another order.)"""

import dataclasses
import os

import pytest
import torch

from fedlegend.config import build_config
from fedlegend.engine.local import plan_round, run_local
from fedlegend.methods.base import Estimator
from fedlegend.experiment import build_experiment
from fedlegend.workers import WorkerPool, share_out, worker_count


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_share_out_balances_longest_first_and_keeps_dispatch_order():
    shares = share_out({0: 1.0, 1: 5.0, 2: 4.0, 3: 3.0, 4: 3.0}, 2)
    assert sorted(d for s in shares for d in s) == [0, 1, 2, 3, 4]
    loads = [sum({0: 1.0, 1: 5.0, 2: 4.0, 3: 3.0, 4: 3.0}[d] for d in s) for s in shares]
    assert loads == [8.0, 8.0]              # LPT: 5 | 4, then 3 -> 4's side, 3 -> 5's side, 1 -> 4's side
    assert shares == [[1, 4], [0, 2, 3]]    # each worker's devices in dispatch order
    assert share_out({7: 2.0}, 3) == [[7], [], []]
    assert share_out({3: 1.0, 1: 1.0}, 2) == [[3], [1]]   # ties: dispatch order, lowest worker first


def test_worker_count():
    assert worker_count(3, devices=2) == 2 and worker_count(1, devices=10) == 1
    assert worker_count("auto", devices=100) == len(os.sched_getaffinity(0))
    assert worker_count("auto", devices=100, on_cpu=False) == 1           # a forked process cannot use CUDA
    with pytest.raises(ValueError, match="CPU only"):
        worker_count(2, devices=100, on_cpu=False)


def _run(tiny_cfg, **over):
    exp = build_experiment(tiny_cfg(**over))
    return run_local(exp, progress=False)


@pytest.mark.parametrize("over", [
    {},                                                      # LEGEND, the default
    {"method.name": "flora"},                                # a residual folded into the frozen weights
    {"model.dropout": 0.1, "fleet.dropout_rate": 0.4},       # torch's generator, devices that drop out
], ids=["legend", "flora-residual", "dropout"])
def test_two_workers_equal_one_thread(tiny_cfg, keep_threads, over):
    base = {"fleet.devices": 4, "run.threads": 1, **over}
    s1, r1 = _run(tiny_cfg, **base)
    s2, r2 = _run(tiny_cfg, **base, **{"run.workers": 2})
    assert r1 == r2
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)


def test_workers_batch_their_own_share(tiny_cfg, keep_threads, monkeypatch):
    """With run.batch_devices each process trains the same-layout devices of its share together: the
    same virtual time and accuracy, adapters within float rounding of one process (groups split differently)."""
    import fedlegend.batched as batched
    groups = []
    real = batched.train_group
    monkeypatch.setattr(batched, "train_group", lambda host, task, group, **kw: groups.append(len(group))
                        or real(host, task, group, **kw))
    base = {"fleet.devices": 4, "run.threads": 1, "method.name": "fedlora", "run.batch_devices": True}
    s1, r1 = _run(tiny_cfg, **base)
    s2, r2 = _run(tiny_cfg, **base, **{"run.workers": 2})
    assert groups and groups[0] == 4                     # one process: the round's four devices in one group
    assert [r["virtual_time_s"] for r in r1] == [r["virtual_time_s"] for r in r2]
    assert [r["accuracy"] for r in r1] == [r["accuracy"] for r in r2]
    # batched.py's 1e-5 per local training; two rounds of AdamW (whose first steps are about lr * sign(grad))
    # and aggregation carry it to ~3e-5 here
    assert all(torch.allclose(s1[k], s2[k], atol=1e-4) for k in s1)


def test_a_failing_device_in_a_worker_comes_back_as_its_error(tiny_cfg, keep_threads):
    exp = build_experiment(tiny_cfg(**{"fleet.devices": 4, "run.threads": 1}))
    rp = plan_round(exp, 1, exp.initial_state, Estimator(exp.method.info.rho))
    devs = list(rp.assignments)
    bad = rp.assignments[devs[-1]]
    poisoned = {k: torch.full_like(t, float("nan")) for k, t in bad.payload.items()}
    assignments = {**rp.assignments, devs[-1]: dataclasses.replace(bad, assignment=dataclasses.replace(bad.assignment, payload=poisoned))}
    with WorkerPool(exp, 2) as pool:
        assert len(pool.children) == 1
        out = pool.train(assignments)
    assert sorted(out) == sorted(devs)
    assert type(out[devs[-1]]).__name__ == "LocalTrainingError" and "nan" in str(out[devs[-1]]).lower()
    assert all(type(out[d]).__name__ == "LocalResult" for d in devs[:-1])
    assert not any(proc.is_alive() for proc, _ in pool.children)


def test_workers_setting_is_checked():
    with pytest.raises(ValueError, match="run.workers"):
        build_config({}, {"run.workers": 0})
    assert build_config({}, {"run.workers": "auto"}).run.workers == "auto"
    with pytest.raises(ValueError, match="run.workers is the local engine's"):
        build_config({}, {"run.workers": 2, "run.engine": "flower"})


def test_cli_workers_flag():
    import argparse

    from fedlegend.cli import _workers
    assert _workers("auto") == "auto" and _workers("3") == 3
    for bad in ("0", "-1", "two"):
        with pytest.raises(argparse.ArgumentTypeError, match="number of processes"):
            _workers(bad)


def test_a_worker_that_dies_is_named(tiny_cfg, keep_threads):
    """A child killed mid-run (say, by the kernel's OOM killer) stops the round with its pid and the way out."""
    import signal

    exp = build_experiment(tiny_cfg(**{"fleet.devices": 4, "run.threads": 1}))
    rp = plan_round(exp, 1, exp.initial_state, Estimator(exp.method.info.rho))
    with WorkerPool(exp, 2) as pool:
        proc = pool.children[0][0]
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=10)
        with pytest.raises(RuntimeError, match=rf"pid {proc.pid}.*exit code -9.*run.workers = 1"):
            pool.train(rp.assignments)
