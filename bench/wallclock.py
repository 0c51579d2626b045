"""Wall clock of a run and where it goes, and peak memory against fleet size.

Run by hand:
    OMP_NUM_THREADS=2 python bench/wallclock.py --out bench/out/wallclock.json              # all cases
    python bench/wallclock.py --cases default --rounds 36                                   # the default run only
    python bench/wallclock.py --cases default --profile bench/out/default.pyinstrument.txt  # + a profile

Cases (each in a fresh process, so its peak RSS is its own):
  default     the default `fedlegend run` (LEGEND, MiniLM-L6, 6 devices), --rounds rounds (default 36: all)
  devices80   the default setting with 80 devices, --rounds-80 rounds (default 3), extrapolated to 36 rounds
  mem10 / mem80 / mem500   peak RSS at 10 / 80 / 500 devices: --mem-rounds rounds (default 2) of ONE local
              step of batch 1 per device, 64 test examples (memory grows with the fleet: partitions,
              per-device updates, records, layouts; not with the step count or batch: cheap to run)
The split comes from light instrumentation (the engine's functions wrapped with timers in this
process; nothing in the package changes): setup (build_experiment: data, tokenization, model),
training (run_devices: local training, in run.workers' processes too, plus the cost model), evaluation (evaluate), planning and
aggregation (plan_round, finish_round), bookkeeping (the rest: records, checkpoints, adapter export,
plot). Each figure is given in wall-clock seconds and in CPU-seconds of the process (all threads;
time.process_time; run.workers' processes are added as "+ workers"), which other jobs on a shared machine
skew far less; the 80-device extrapolation
is given for both. Peak memory is the process's maximum RSS (getrusage). The load average is printed
and saved, since a shared machine skews every wall-clock figure. With --profile, the default case (or those of
--profile-cases) runs under pyinstrument
(pip install -e '.[dev]') and writes its text report.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROUNDS_DEFAULT = 36   # RunConfig.rounds' default: what the 80-device figure is extrapolated to
EVAL_EVERY = 5


class Split:
    """Seconds spent inside wrapped functions, by bucket (a call inside another is counted once:
    only the outermost wrapped call times)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._depth = 0

    def wrap(self, module, name: str, bucket: str) -> None:
        fn = getattr(module, name)

        def timed(*args, **kwargs):
            if self._depth:
                return fn(*args, **kwargs)
            self._depth += 1
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                self.seconds[bucket] = self.seconds.get(bucket, 0.0) + time.perf_counter() - t0
                self.cpu_seconds[bucket] = self.cpu_seconds.get(bucket, 0.0) + time.process_time() - c0
                self.calls[bucket] = self.calls.get(bucket, 0) + 1
        setattr(module, name, timed)


def child(overrides: dict, profile: str | None) -> dict:
    """One run in this process: total wall clock, its split, peak RSS, final accuracy."""
    import fedlegend.engine.local as local
    import fedlegend.rundir as rundir
    from fedlegend.config import build_config

    split = Split()
    split.wrap(rundir, "build_experiment", "setup")
    split.wrap(local, "run_devices", "training")   # batched groups, worker processes and run_device
    split.wrap(local, "evaluate", "evaluation")
    split.wrap(local, "plan_round", "planning_aggregation")
    split.wrap(local, "finish_round", "planning_aggregation")
    built = []   # the experiment, for the frozen-prefix cache's size at the end
    timed_build = rundir.build_experiment
    rundir.build_experiment = lambda *a, **k: built.append(timed_build(*a, **k)) or built[-1]
    cfg = build_config({}, overrides)
    profiler = None
    if profile:
        from pyinstrument import Profiler
        profiler = Profiler(interval=0.005)
        profiler.start()
    with tempfile.TemporaryDirectory() as d:
        t0, c0 = time.perf_counter(), time.process_time()
        summary = rundir.run_experiment(cfg, Path(d) / "run", progress=False)
        total, cpu = time.perf_counter() - t0, time.process_time() - c0
    if profiler is not None:
        profiler.stop()
        Path(profile).write_text(profiler.output_text(unicode=False, color=False, show_all=False))
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    parts, cpu_parts = dict(split.seconds), dict(split.cpu_seconds)
    parts["bookkeeping"] = total - sum(parts.values())
    cpu_parts["bookkeeping"] = cpu - sum(cpu_parts.values())
    return {"total_s": total, "split_s": parts, "cpu_s": cpu, "cpu_split_s": cpu_parts, "calls": split.calls,
            "peak_rss_mb":
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "final_accuracy": summary["final_accuracy"],
            "rounds": cfg.run.rounds, "devices": cfg.fleet.devices, "threads": __import__("torch").get_num_threads(),
            # run.workers' processes (joined by the end): their CPU time and the largest one's peak RSS
            "workers_cpu_s": kids.ru_utime + kids.ru_stime, "workers_peak_rss_mb": kids.ru_maxrss / 1024,
            "prefix_cache_mb": (built[0].prefix_cache.bytes / 2**20 if built and built[0].prefix_cache else 0.0)}


def cases(a) -> dict[str, dict]:
    base = {"run.device": a.device, **({"run.threads": a.threads} if a.threads else {}), **parse_sets(a.set)}
    out = {"default": {**base, "run.rounds": a.rounds},
           "devices80": {**base, "fleet.devices": 80, "run.rounds": a.rounds_80}}
    for n in (10, 80, 500):
        out[f"mem{n}"] = {**base, "fleet.devices": n, "run.rounds": a.mem_rounds, "train.local_steps": 1,
                          "train.batch_size": 1, "data.eval_subset": 64}
    return out


def parse_sets(items: list[str] | None) -> dict:
    """--set KEY=VALUE overrides (config keys, e.g. run.eval_precision=bf16); values read as JSON when they parse."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--set {item!r}: use KEY=VALUE, e.g. run.eval_precision=bf16")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def extrapolate(res: dict, rounds: int, key: str = "split_s") -> float:
    """A run of `rounds` rounds from a shorter one: setup once, training and planning per round,
    evaluation per evaluated round, bookkeeping per round."""
    s, r = res[key], res["rounds"]
    evals_done = len([h for h in range(1, r + 1) if h % EVAL_EVERY == 0 or h == r])
    evals_full = len([h for h in range(1, rounds + 1) if h % EVAL_EVERY == 0 or h == rounds])
    per_round = (s.get("training", 0) + s.get("planning_aggregation", 0) + s.get("bookkeeping", 0)) / r
    return s.get("setup", 0) + per_round * rounds + s.get("evaluation", 0) / max(evals_done, 1) * evals_full


def run_case(name: str, overrides: dict, profile: str | None) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(overrides)] + (["--profile", profile] if profile else [])
    load = os.getloadavg()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"case {name} failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res.update({"case": name, "overrides": overrides, "load_before": load, "load_after": os.getloadavg()})
    if res["rounds"] < ROUNDS_DEFAULT and name == "devices80":
        res["extrapolated_36_rounds_s"] = extrapolate(res, ROUNDS_DEFAULT)
        res["extrapolated_36_rounds_cpu_s"] = extrapolate(res, ROUNDS_DEFAULT, "cpu_split_s")
    return res


def _workers(r: dict) -> str:
    return f" + workers {r['workers_cpu_s']:.1f}" if r.get("workers_cpu_s") else ""


def print_row(r: dict) -> None:
    s, c = r["split_s"], r["cpu_split_s"]
    parts = "  ".join(f"{k} {v:.1f} ({c[k]:.1f} cpu)" for k, v in s.items())
    extra = (f"  (36 rounds: ~{r['extrapolated_36_rounds_s']:.0f} s, ~{r['extrapolated_36_rounds_cpu_s']:.0f} cpu-s)"
             if "extrapolated_36_rounds_s" in r else "")
    print(f"{r['case']:<10} {r['devices']:>4} dev {r['rounds']:>3} rounds  total {r['total_s']:7.1f} s "
          f"({r['cpu_s']:.1f} cpu-s{_workers(r)}){extra}  "
          f"peak RSS {r['peak_rss_mb']:6.0f} MB (prefix cache {r.get('prefix_cache_mb', 0):.0f} MB)  acc {r['final_accuracy']:.4f}  load {r['load_before'][0]:.1f}"
          f"->{r['load_after'][0]:.1f}\n           {parts}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="default,devices80,mem10,mem80,mem500")
    ap.add_argument("--rounds", type=int, default=ROUNDS_DEFAULT, help="rounds of the default case")
    ap.add_argument("--rounds-80", type=int, default=3, help="rounds of the 80-device case")
    ap.add_argument("--mem-rounds", type=int, default=2, help="rounds of the memory cases")
    ap.add_argument("--threads", type=int, help="run.threads (default: torch's, i.e. OMP_NUM_THREADS or all cores)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="a config override for every case (repeatable), e.g. --set run.eval_precision=bf16")
    ap.add_argument("--profile", help="write a pyinstrument text profile of each case in --profile-cases here "
                    "('{case}' in the path is replaced by the case's name)")
    ap.add_argument("--profile-cases", default="default", help="the cases --profile profiles (default: default)")
    ap.add_argument("--out", type=Path, default=Path("bench/out/wallclock.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child is not None:
        print(json.dumps(child(json.loads(a.child), a.profile)))
        return 0
    all_cases = cases(a)
    names = [n.strip() for n in a.cases.split(",") if n.strip()]
    unknown = set(names) - set(all_cases)
    if unknown:
        ap.error(f"unknown cases {sorted(unknown)}; choose from {', '.join(all_cases)}")
    results = []
    for n in names:
        profiled = a.profile and n in {c.strip() for c in a.profile_cases.split(",")}
        results.append(run_case(n, all_cases[n], a.profile.replace("{case}", n) if profiled else None))
        print_row(results[-1])
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"bench": "wallclock", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                 "cpus": os.cpu_count(), "cases": results}, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
