"""A round's devices trained in parallel processes (run.workers; local engine).

The devices of a round are independent: each starts from its payload and draws every random number
from its own stream (client.device_rng). So they can train in separate processes and give what one
process gives in turn, up to float rounding: each process runs torch with one thread, which can
change the last bits of a matrix product against the multi-threaded run (the tests bound it).

Why by hand: the work is a handful of long, uneven jobs per round over one large, already-built
model. A pool forked from the built experiment starts in milliseconds and shares the base model's
pages; Ray, Dask or torch.multiprocessing's spawn would each rebuild (or pickle) the model per
worker. The parent is worker 0; children get their jobs and send results over a pipe, serialized
with torch.save (a payload is a few MB; no shared-memory tensors to leak).
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import sys
import traceback

import torch

from .client import LocalResult, LocalTrainingError, device_rng, planned_work, train_local
from .execution import model_device


def cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers set; else the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def worker_count(setting: int | str, devices: int, on_cpu: bool = True) -> int:
    """run.workers: an integer, or "auto": one per core (at most one per device) where processes can be
    forked safely (Linux, the model on the CPU), else 1."""
    if setting == "auto":
        n = cores() if on_cpu and sys.platform.startswith("linux") else 1
    else:
        n = int(setting)
        if n > 1 and not on_cpu:
            raise ValueError(f"run.workers = {n}: worker processes train on the CPU only (a forked process cannot "
                             "use the parent's CUDA context); on a GPU use run.workers = 1 and run.batch_devices")
    return max(1, min(n, devices))


def open_pool(exp) -> "WorkerPool | None":
    """The processes run.workers asks for, or None for this process alone."""
    n = worker_count(exp.cfg.run.workers, exp.cfg.fleet.devices, model_device(exp.host.model).type == "cpu")
    return WorkerPool(exp, n) if n > 1 else None


def share_out(costs: dict[int, float], workers: int) -> list[list[int]]:
    """Devices to workers, longest job first to the least loaded (LPT: within 4/3 of the best split);
    each worker's devices keep dispatch order. Ties go to the lowest worker, so the split is fixed."""
    loads, shares = [0.0] * workers, [[] for _ in range(workers)]
    order = {dev: i for i, dev in enumerate(costs)}
    for dev in sorted(costs, key=lambda d: (-costs[d], order[d])):
        w = min(range(workers), key=lambda i: (loads[i], i))
        loads[w] += costs[dev]
        shares[w].append(dev)
    return [sorted(s, key=order.__getitem__) for s in shares]


def _dumps(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)


def train_one(exp, a) -> LocalResult | LocalTrainingError:
    """One assignment's local training, exactly as engine.local.run_device's sequential path runs it."""
    cfg = exp.cfg
    try:
        return train_local(exp.host, exp.task, a.plan, a.payload, exp.device_data(a.device), steps=a.steps,
                           batch_size=cfg.train.batch_size, lr=a.lr, rng=device_rng(exp, a), pad_id=exp.pad_id,
                           weight_decay=cfg.train.weight_decay, max_grad_norm=cfg.train.max_grad_norm,
                           precision=cfg.run.precision, prefix_cache=exp.prefix_cache)
    except LocalTrainingError as err:
        return err


def train_share(exp, assignments: dict) -> dict[int, LocalResult | LocalTrainingError]:
    """One process's share of a round: groups run.batch_devices trains together (batched.py), the rest in turn."""
    from .batched import train_round
    out = train_round(exp, assignments)
    out.update({d: train_one(exp, a) for d, a in assignments.items() if d not in out})
    return out


def _serve(exp, conn) -> None:
    """A child's loop: a list of assignments in, {device: result or error} out; "stop" (or a closed pipe) ends it."""
    torch.set_num_threads(1)
    while True:
        try:
            msg = conn.recv_bytes()
        except EOFError:   # the parent is gone (killed): nothing left to serve
            return
        if msg == b"stop":
            return
        try:
            out = train_share(exp, {a.device: a for a in _loads(msg)})
            conn.send_bytes(_dumps(("ok", out)))
        except BaseException:   # reported to the parent, which raises it with this traceback
            conn.send_bytes(_dumps(("error", traceback.format_exc())))


class WorkerPool:
    """`n` processes training a round's devices: this one and n - 1 children forked from it."""

    def __init__(self, exp, n: int):
        self.exp, self.n, self.children = exp, n, []
        ctx = mp.get_context("fork")   # the children inherit the built experiment (model, data) as it is now
        for _ in range(n - 1):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(exp, child), daemon=True)
            proc.start()
            child.close()
            self.children.append((proc, parent))

    def train(self, assignments: dict) -> dict[int, LocalResult | LocalTrainingError]:
        """Train every assignment (engine.local.Dispatch) across the pool; the split balances planned FLOPs."""
        if not assignments:
            return {}
        costs = {dev: _cost(self.exp, a) for dev, a in assignments.items()}
        shares = share_out(costs, self.n)
        for (proc, conn), share in zip(self.children, shares[1:]):
            try:
                conn.send_bytes(_dumps([assignments[d] for d in share]))
            except (BrokenPipeError, OSError):
                raise _died(proc) from None
        threads = torch.get_num_threads()
        torch.set_num_threads(1)   # one core per process while the children work
        try:
            out = train_share(self.exp, {d: assignments[d] for d in shares[0]})
        finally:
            torch.set_num_threads(threads)
        for (proc, conn), share in zip(self.children, shares[1:]):
            try:
                status, value = _loads(conn.recv_bytes())
            except EOFError:
                raise _died(proc) from None
            if status != "ok":
                raise RuntimeError(f"a training worker failed on devices {share}:\n{value}")
            out.update(value)
        return out

    def close(self) -> None:
        for proc, conn in self.children:
            try:
                conn.send_bytes(b"stop")
            except (BrokenPipeError, OSError):
                pass
            conn.close()
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        self.children = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _died(proc) -> RuntimeError:
    proc.join(timeout=5)
    return RuntimeError(f"a training worker (pid {proc.pid}) died (exit code {proc.exitcode}; -9: killed, e.g. out "
                        "of memory); rerun with run.workers = 1 to see the error in this process")


def _cost(exp, a) -> float:
    w = planned_work(exp, a)
    return w.forward_flops + w.backward_flops
