"""The depth pre-test's measurement (docs/pretest.md): per-batch latency and peak memory of one local
training step at each depth, on this machine."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .config import Config
from .pretest_layouts import FixedLayout, depth_layers

# ---------------------------------------------------------------- measuring a training step
def _typical_batch(exp, batch_size: int):
    """batch_size training examples as close to the typical padded width (the 90th percentile of
    token counts) as there are, not longer: the batch pads to about that width."""
    from .experiment import nominal_width_of

    width = nominal_width_of(exp.train)
    lengths = np.array([len(x) for x in exp.train.ids])
    order = np.argsort(np.abs(lengths - width) + (lengths > width) * 10**6, kind="stable")
    return exp.task.batch(exp.train, [int(i) for i in order[:batch_size]], exp.pad_id)


def _cpu_peak_bytes(step) -> int:
    """Peak of torch's live CPU allocations during `step()` above what was live before it (the
    profiler's memory events: 'Total Allocated' after each allocation or free)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        events = json.loads(Path(path).read_text()).get("traceEvents", [])
    finally:
        os.unlink(path)
    mem = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e.get("ts", 0))
    if not mem:
        return 0
    first = mem[0]["args"]
    base = first["Total Allocated"] - first["Bytes"]
    return int(max(e["args"]["Total Allocated"] for e in mem) - base)


def measure_depths(cfg: Config, depths: list[int], rank: int, steps: int = 5) -> dict:
    """Per-batch latency and peak memory of one local training step (forward, backward, AdamW) at each
    depth, on this machine, at train.batch_size and the typical padded width: CPU time (process_time)
    and wall time, median of `steps` after a warm-up step; peak memory above the step's start (CUDA:
    max_memory_allocated; CPU: the profiler's live allocations)."""
    from .execution import autocast, model_device, to_device
    from .experiment import build_experiment

    exp = build_experiment(cfg, make=lambda ctx: FixedLayout(ctx, {l: rank for l in range(ctx.spec.num_layers)},
                                                             "measure"))
    L = exp.spec.num_layers
    model = exp.host.model
    device = model_device(model)
    batch = to_device(_typical_batch(exp, cfg.train.batch_size), device)
    cuda = device.type == "cuda"
    rows = []
    for k in depths:
        name = exp.host.use({l: rank for l in depth_layers(L, k)})
        params = [p for p in exp.host.params(name).values() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.train.lr)
        model.train()

        def step():
            with autocast(device, cfg.run.precision):
                loss = exp.task.loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if cuda:
                torch.cuda.synchronize(device)

        step()   # warm-up: the optimizer's states, the allocator
        cpu, wall = [], []
        for _ in range(steps):
            c0, w0 = time.process_time(), time.perf_counter()
            step()
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            step()
            peak = torch.cuda.max_memory_allocated(device) - before
        else:
            peak = _cpu_peak_bytes(step)
        rows.append({"depth": k, "cpu_ms_per_batch": 1e3 * float(np.median(cpu)),
                     "wall_ms_per_batch": 1e3 * float(np.median(wall)), "peak_mb": peak / 2**20})
    info = {"device": str(device), "batch_size": int(batch["input_ids"].shape[0]),
            "width": int(batch["input_ids"].shape[1]), "steps": steps, "rank": rank, "layers": L,
            "threads": torch.get_num_threads(),
            "model_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20}
    return {"info": info, "rows": rows}


def fit_per_layer(depths: list[int], values: list[float]) -> tuple[float | None, float | None]:
    """(slope per added layer, % increase from the shallowest to the deepest depth measured)."""
    if len(depths) < 2:
        return None, None
    slope = float(np.polyfit(depths, values, 1)[0])
    first, last = values[int(np.argmin(depths))], values[int(np.argmax(depths))]
    return slope, (100.0 * (last - first) / first if first else None)
