"""The frozen-prefix cache: LEGEND's training phase with and without it, at equal records.

Run by hand (not in CI); on a 2-core CPU the defaults take roughly 10-15 minutes when the machine is idle:
    OMP_NUM_THREADS=1 python bench/prefix_cache.py --out bench/out/prefix_cache.json
    OMP_NUM_THREADS=1 python bench/prefix_cache.py --per-depth --devices 80 \
        --depth-mix docs/results/compare-80/legend-seed0/records.jsonl      # per depth, and at LEGEND's mix
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


def per_depth(args, base: dict) -> dict:
    """One device's round (train_local, LEGEND's top-d layers and ranks) at each depth d, the cache
    warm (every example of the device stored: the steady state) against no cache, `--repeats`
    times each, interleaved. With `--depth-mix RECORDS` (a LEGEND run's records.jsonl) the
    expected training-phase speed-up at that run's mix of depths (steady state, all hits)."""
    from fedlegend.client import train_local
    from fedlegend.config import build_config
    from fedlegend.engine.local import device_rng
    from fedlegend.experiment import build_experiment
    from fedlegend.methods.base import LoraPlan
    from fedlegend.methods.legend import rank_distribution, top_layers
    from fedlegend.prefix_cache import PrefixCache

    cfg = build_config({}, {**base, "cache.prefix_cache": False})
    exp = build_experiment(cfg)
    L = exp.spec.num_layers
    ranks = rank_distribution(L, cfg.method.legend.rank_budget, cfg.method.legend.rank_step)
    data = exp.device_data(0)
    cache = PrefixCache(args.max_mb, args.fp16)
    rows = {}
    for d in range(1, L + 1):
        plan = LoraPlan(0, {l: ranks[l] for l in top_layers(L, d)})
        name = exp.host.use(plan.ranks)
        payload = exp.host.read(name)

        def one(c, r):
            rng = __import__("numpy").random.default_rng([0, d, r])
            w0, c0 = time.perf_counter(), time.process_time()
            train_local(exp.host, exp.task, plan, payload, data, steps=exp.steps[0], batch_size=cfg.train.batch_size,
                        lr=cfg.train.lr, rng=rng, pad_id=exp.pad_id, prefix_cache=c)
            return time.perf_counter() - w0, time.process_time() - c0

        # warm: every example of the device at this boundary (a whole epoch of its data)
        train_local(exp.host, exp.task, plan, payload, data, steps=-(-len(data) // cfg.train.batch_size),
                    batch_size=cfg.train.batch_size, lr=cfg.train.lr, rng=__import__("numpy").random.default_rng(9),
                    pad_id=exp.pad_id, prefix_cache=cache)
        t = {"cached": [], "uncached": []}
        for r in range(args.repeats):
            for n in (("cached", "uncached") if r % 2 else ("uncached", "cached")):
                t[n].append(one(cache if n == "cached" else None, r))
        rows[d] = {n: {"wall_s": sum(w for w, _ in t[n]) / len(t[n]), "cpu_s": sum(c for _, c in t[n]) / len(t[n])}
                   for n in t}
        rows[d]["speedup_cpu"] = rows[d]["uncached"]["cpu_s"] / rows[d]["cached"]["cpu_s"]
        rows[d]["speedup_wall"] = rows[d]["uncached"]["wall_s"] / rows[d]["cached"]["wall_s"]
        print(f"depth {d}: device round cpu s cached {rows[d]['cached']['cpu_s']:.2f} / uncached "
              f"{rows[d]['uncached']['cpu_s']:.2f} (x{rows[d]['speedup_cpu']:.2f}); wall x{rows[d]['speedup_wall']:.2f}",
              flush=True)
    out = {"per_depth": rows, "cache": cache.stats.as_dict(), "device_examples": len(data), "steps": exp.steps[0]}
    if args.depth_mix:
        mix: dict[int, int] = {}
        for line in Path(args.depth_mix).read_text().splitlines():
            for dev in json.loads(line)["devices"]:
                mix[dev["depth"]] = mix.get(dev["depth"], 0) + 1
        for kind in ("cpu_s", "wall_s"):
            unc = sum(k * rows[d]["uncached"][kind] for d, k in mix.items())
            cac = sum(k * rows[d]["cached"][kind] for d, k in mix.items())
            out[f"mix_speedup_{kind.removesuffix('_s')}"] = unc / cac
        out["depth_mix"] = {str(d): mix[d] for d in sorted(mix)}
        print(f"at the depth mix of {args.depth_mix} {out['depth_mix']}: training phase x{out['mix_speedup_cpu']:.2f} "
              f"(cpu), x{out['mix_speedup_wall']:.2f} (wall), steady state")
    return out


def dry_depth_mix(base: dict) -> dict[int, int]:
    """LEGEND's depths over a whole run without training (`--dry-mix`): its plans depend only on the
    cost model's times, which come from the batch shapes, so local training is replaced by the
    shapes it would draw (engine.local.planned_work's draws) and the unchanged payload."""
    import fedlegend.engine.local as local
    from fedlegend.client import LocalResult, step_shape
    from fedlegend.config import build_config
    from fedlegend.data import sample_batches
    from fedlegend.experiment import build_experiment
    from fedlegend.methods.base import trained_part

    exp = build_experiment(build_config({}, {**base, "cache.prefix_cache": False, "run.eval_every": 10**6}))

    def no_training(host, task, plan, payload, data, *, steps, batch_size, rng, pad_id, **_):
        rng.integers(2**62)
        lengths = [len(x) for x in data.ids]
        shapes = [step_shape(task, task.batch(data, idx, pad_id))
                  for idx in sample_batches(len(data), steps, min(batch_size, len(data)), rng, lengths)]
        return LocalResult(trained_part(payload, plan), sum(b for b, _, _ in shapes), 0.0, shapes)

    local.train_local, real = no_training, local.train_local
    try:
        _, records = local.run_local(exp, progress=False)
    finally:
        local.train_local = real
    mix: dict[int, int] = {}
    for r in records:
        for dev in r["devices"]:
            mix[dev["depth"]] = mix.get(dev["depth"], 0) + 1
    return dict(sorted(mix.items()))


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
    ap.add_argument("--per-depth", action="store_true", help="one device's round at each depth, cache warm vs none")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dry-mix", action="store_true", help="print LEGEND's depth mix over the run (no training)")
    ap.add_argument("--depth-mix", help="with --per-depth: a LEGEND run's records.jsonl to weigh the depths by")
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
    if args.dry_mix:
        mix = dry_depth_mix(base)
        print(json.dumps({"config": base, "depth_mix": mix, "share_full_depth": mix.get(max(mix), 0) / sum(mix.values())}))
        return 0
    if args.per_depth:
        result = {"config": base, **per_depth(args, base),
                  "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                              "torch_threads": torch.get_num_threads(), "loadavg_before": load_before,
                              "loadavg_after": os.getloadavg()}}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=float))
        print(f"load average before {load_before}, after {os.getloadavg()}; wrote {args.out}")
        return 0
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
