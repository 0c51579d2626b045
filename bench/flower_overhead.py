"""Flower simulation overhead per round beyond the local engine's, and peak memory of the Flower run.

Run by hand (a few minutes):
    python bench/flower_overhead.py --devices 20,80 --rounds 5 [--method fedlora]

For each fleet size it runs the same tiny config (MiniLM-L6, one local step of batch 2 per
device, evaluation only at the last round on 16 examples, so training is cheap and the
engine's own cost visible) in a fresh process per engine. The default method is FedLoRA:
every device has the same adapter layout, so a device's round costs the same whatever ran
before it (with LEGEND every distinct rank layout is one more peft adapter in the host,
which makes per-device cost grow with the fleet and swamps the engine's overhead). Every
process trains with one torch thread (run.threads = 1): on a shared 2-core machine, two
OpenMP threads per process made a training step 20-30 times slower (spinning threads).
  local        the in-process loop (torch on all cores)
  flower-seq   Flower's simulation, num_cpus = all cores per ClientApp: one device at a time, as local
  flower-par   Flower's simulation, num_cpus = 1 per ClientApp: one Ray worker per core
Per-round wall clock is the time between consecutive round records, over rounds 2..R-1
(round 1 holds Ray's start and each worker's model load; round R the evaluation). The
overhead is flower-seq minus local, per round and per device. Peak memory is sampled every
0.5 s over the whole process tree (driver, Ray's GCS, raylet, workers): the sum of RSS (counts
shared pages once per process) and of PSS (shares them out). Prints one row per run and the
overheads; `uptime` before and after, since a shared machine skews every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time


def tree_memory_mb(proc) -> tuple[float, float]:
    import psutil

    rss = pss = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            info = p.memory_full_info()
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return rss / 2**20, pss / 2**20


def child(engine: str, devices: int, rounds: int, method: str) -> None:
    """One run in this process; prints a JSON line with per-round timestamps and peak memory."""
    import psutil

    from fedlegend.config import build_config
    from fedlegend.experiment import build_experiment

    cfg = build_config({}, {"fleet.devices": devices, "run.rounds": rounds, "train.local_steps": 1,
                            "train.batch_size": 2, "run.eval_every": 1000, "data.eval_subset": 16,
                            "run.engine": "local" if engine == "local" else "flower", "method.name": method,
                            "run.threads": 1})
    peak = {"rss": 0.0, "pss": 0.0}
    stop = threading.Event()
    me = psutil.Process()

    def sample() -> None:
        while not stop.is_set():
            rss, pss = tree_memory_mb(me)
            peak["rss"], peak["pss"] = max(peak["rss"], rss), max(peak["pss"], pss)
            stop.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    exp = build_experiment(cfg)
    t_built = time.perf_counter()
    stamps: list[float] = []
    on_record = lambda rec: stamps.append(time.perf_counter())  # noqa: E731
    if engine == "local":
        from fedlegend.engine.local import run_local

        run_local(exp, on_record, progress=False)
    else:
        from fedlegend.engine.flower import run_flower

        cpus = os.cpu_count() if engine == "flower-seq" else 1
        run_flower(exp, on_record, progress=False, cpus_per_client=cpus)
    stop.set()
    sampler.join()
    print("RESULT " + json.dumps({"engine": engine, "devices": devices, "build_s": t_built - t0,
                                  "first_round_s": stamps[0] - t_built,
                                  "round_s": [b - a for a, b in zip(stamps, stamps[1:])],
                                  "total_s": time.perf_counter() - t0,
                                  "peak_rss_mb": peak["rss"], "peak_pss_mb": peak["pss"]}), flush=True)


def run(engine: str, devices: int, rounds: int, method: str) -> dict:
    cmd = [sys.executable, __file__, "--child", engine, "--devices", str(devices), "--rounds", str(rounds),
           "--method", method]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})
    lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{engine} {devices}: exit {out.returncode}\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", default="20,80")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--engines", default="local,flower-seq,flower-par")
    ap.add_argument("--method", default="fedlora")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, int(a.devices), a.rounds, a.method)
        return
    if a.rounds < 4:
        ap.error("--rounds must be at least 4 (round 1 and the last are left out of the per-round figure)")
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    print(f"method {a.method}, {a.rounds} rounds, one local step of batch 2 per device, one torch thread")
    print(f"{'engine':<11} {'devices':>7} {'build s':>8} {'round 1 s':>9} {'per round s':>11} {'total s':>8} "
          f"{'peak RSS MB':>11} {'peak PSS MB':>11}")
    results: dict[tuple[str, int], dict] = {}
    for n in [int(x) for x in a.devices.split(",")]:
        for engine in a.engines.split(","):
            r = run(engine, n, a.rounds, a.method)
            mid = r["round_s"][:-1]  # rounds 2..R-1
            r["per_round_s"] = sum(mid) / len(mid)
            results[(engine, n)] = r
            print(f"{engine:<11} {n:>7} {r['build_s']:>8.1f} {r['first_round_s']:>9.1f} {r['per_round_s']:>11.2f} "
                  f"{r['total_s']:>8.1f} {r['peak_rss_mb']:>11.0f} {r['peak_pss_mb']:>11.0f}", flush=True)
        for engine in ("flower-seq", "flower-par"):
            if ("local", n) in results and (engine, n) in results:
                d = results[(engine, n)]["per_round_s"] - results[("local", n)]["per_round_s"]
                print(f"  {engine} - local, {n} devices: {d:+.2f} s per round, {1000 * d / n:+.1f} ms per device")
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
