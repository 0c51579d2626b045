"""The frozen-prefix cache: LEGEND's training phase with and without it, at equal records.

Run by hand (not in CI); on a 2-core CPU the defaults take roughly 10-15 minutes when the machine is idle:
    OMP_NUM_THREADS=1 python bench/prefix_cache.py --out bench/out/prefix_cache.json
    python bench/prefix_cache.py --devices 80 --rounds 36 --threads 2      # the whole default run, 80 devices

Two experiments of the same config (`--method`, default LEGEND on the default MiniLM and Rotten
Tomatoes, `--devices` devices), one with `cache.prefix_cache = true` and one with false, run round
by round INTERLEAVED in one process (which goes first alternates), so a load change on a shared
machine hits both alike. The training phase is every device's `run_device` (local training and
its cost-model bookkeeping); planning, aggregation and evaluation are left out. Both wall-clock
seconds and CPU seconds of this process (time.process_time, far less skewed by other jobs) are
given, per round and in total, with the cache's hits and misses, the load average before and
after, and how far the records differ (virtual time must be equal: the cost model never sees
the cache; losses and the final adapter within float rounding).

Where the cache pays: an example must be drawn again at the same boundary (LEGEND's depth
changes rarely), so it pays with small partitions (80 devices: ~115 examples each, 40 drawn a
round) and over many rounds; the first rounds are mostly misses. `--rounds` sets the horizon.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch


def parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def subset_file(n: int, path: Path) -> dict:
    """The first n Rotten Tomatoes snippets as a data file (real data, a smaller set)."""
    import csv

    from fedlegend.datasets import resolve_dataset
    ds = resolve_dataset("rotten-tomatoes")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(min(n, len(ds.texts))):
            w.writerow([ds.texts[i], ds.label_names[ds.labels[i]]])
    return {"data.name": "file", "data.path": str(path), "data.test_size": 300}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="legend")
    ap.add_argument("--devices", type=int, default=80)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--eval-subset", type=int, default=300, help="evaluated once, after the last round")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-mb", type=float, default=1024.0)
    ap.add_argument("--fp16", action="store_true")
    ap.add_argument("--per-device", type=int, default=0,
                    help="N > 0: train on the first devices x N snippets of Rotten Tomatoes only (a data file; plus "
                         "300 test snippets), so that a small fleet has the 80-device fleet's partition size (~115)")
    ap.add_argument("--set", nargs="*", default=[], help="more dotted overrides, e.g. train.batch_size=16")
    ap.add_argument("--out", type=Path, default=Path("bench/out/prefix_cache.json"))
    args = ap.parse_args()

    from fedlegend.config import build_config
    from fedlegend.engine.local import run_device
    from fedlegend.engine.local import Server
    from fedlegend.experiment import build_experiment

    base = {"method.name": args.method, "fleet.devices": args.devices, "run.rounds": args.rounds,
            "run.eval_every": args.rounds, "data.eval_subset": args.eval_subset, "run.threads": args.threads,
            "cache.max_mb": args.max_mb, "cache.fp16": args.fp16, **parse_set(args.set)}
    if args.per_device:
        base.update(subset_file(args.devices * args.per_device + 300, args.out.with_suffix(".data.csv")))
    load_before = os.getloadavg()
    names = ("cached", "uncached")
    exps = {n: build_experiment(build_config({}, {**base, "cache.prefix_cache": n == "cached"})) for n in names}
    servers = {n: Server(e) for n, e in exps.items()}
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    for h in range(1, args.rounds + 1):
        for n in (names if h % 2 else names[::-1]):
            exp, server = exps[n], servers[n]
            rp = server.plan(h)
            w0, c0 = time.perf_counter(), time.process_time()
            replies = {dev: run_device(exp, a) for dev, a in rp.assignments.items()}
            wall[n].append(time.perf_counter() - w0)
            cpu[n].append(time.process_time() - c0)
            server.close(h, server.finish(rp, replies))
        stats = exps["cached"].prefix_cache.stats
        print(f"round {h}: training wall s cached {wall['cached'][-1]:.1f} / uncached {wall['uncached'][-1]:.1f}, "
              f"cpu s {cpu['cached'][-1]:.1f} / {cpu['uncached'][-1]:.1f}; cache hits {stats.hits} misses "
              f"{stats.misses} bypassed batches {stats.bypassed}", flush=True)

    rec = {n: servers[n].records for n in names}
    same_vtime = all(a["virtual_time_s"] == b["virtual_time_s"] for a, b in zip(rec["cached"], rec["uncached"]))
    loss_diff = max(abs(a["train_loss"] - b["train_loss"]) for a, b in zip(rec["cached"], rec["uncached"]))
    sa, sb = servers["cached"].state, servers["uncached"].state
    state_diff = max(float((sa[k] - sb[k]).abs().max()) for k in sb)
    cache = exps["cached"].prefix_cache
    depths = [d["depth"] for r in rec["uncached"] for d in r["devices"]]
    half = args.rounds // 2
    result = {
        "config": base, "rounds": args.rounds,
        "training_wall_s": {n: sum(wall[n]) for n in names},
        "training_cpu_s": {n: sum(cpu[n]) for n in names},
        "speedup_wall": sum(wall["uncached"]) / sum(wall["cached"]),
        "speedup_cpu": sum(cpu["uncached"]) / sum(cpu["cached"]),
        "speedup_wall_second_half": sum(wall["uncached"][half:]) / sum(wall["cached"][half:]),
        "speedup_cpu_second_half": sum(cpu["uncached"][half:]) / sum(cpu["cached"][half:]),
        "per_round_wall_s": wall, "per_round_cpu_s": cpu,
        "cache": {**cache.stats.as_dict(), "entries": len(cache), "mb": cache.bytes / 2**20},
        "device_depths": {str(d): depths.count(d) for d in sorted(set(depths))},
        "records": {"virtual_time_equal": same_vtime, "max_train_loss_diff": loss_diff,
                    "final_adapter_max_abs_diff": state_diff,
                    "final_accuracy": {n: rec[n][-1]["accuracy"] for n in names}},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
    }
    print(json.dumps({k: result[k] for k in ("training_wall_s", "training_cpu_s", "speedup_wall", "speedup_cpu",
                                             "speedup_wall_second_half", "speedup_cpu_second_half", "cache",
                                             "device_depths", "records")}, indent=1))
    print(f"load average before {load_before}, after {os.getloadavg()} on {os.cpu_count()} CPUs")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=float))
    print(f"wrote {args.out}")
    return 0 if same_vtime else 1


if __name__ == "__main__":
    raise SystemExit(main())
