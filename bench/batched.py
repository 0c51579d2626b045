"""Many devices in one pass (run.batch_devices, src/fedlegend/batched.py): a round's local training
one device at a time against the devices of a layout trained together, on the same plans.

Run by hand (not in CI):
    OMP_NUM_THREADS=1 nice -n 15 python bench/batched.py --fleet 6,80 --rounds 3 --out bench/out/batched.json
    python bench/batched.py --device cuda --fleet 6,80 --rounds 3 --out bench/out/batched-gpu.json   # on a GPU

For each fleet size: the default config (LEGEND, MiniLM-L6, Rotten Tomatoes, 5 steps of 8 a device)
with `--fleet` devices; rounds 1..`--rounds` are planned by the server as in a run (the sequential
replies are aggregated, so later rounds have LEGEND's heterogeneous layouts). Each round's
training phase (every device's `run_device`: local training and its cost-model bookkeeping) runs
twice on the same plans, sequentially and batched, in alternating order, and the figures are:
- CPU: CPU seconds of this process (time.process_time) with one torch thread (run.threads = 1,
  OMP_NUM_THREADS=1): the development machine is shared with other jobs, so wall clock is not
  comparable there; GPU: wall seconds (perf_counter, after torch.cuda.synchronize);
- the groups formed (how many devices train together), the largest difference of a device's loss
  and adapter tensors between the two, and that the virtual times are equal.
The frozen-prefix cache is off (it would serve the second pass of a round from the first's states);
`--prefix-cache` turns it on with an untimed warm-up pass per round.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch


def clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return time.process_time()


def with_batching(cfg, value):
    return cfg.model_copy(update={"run": cfg.run.model_copy(update={"batch_devices": value})})


def measure(n_devices: int, rounds: int, device: str, prefix_cache: bool, extra: dict) -> dict:
    from fedlegend import batched
    from fedlegend.config import load_config
    from fedlegend.engine.local import Server, run_device, run_devices
    from fedlegend.execution import model_device
    from fedlegend.experiment import build_experiment

    over = {"fleet.devices": n_devices, "run.threads": 1, "run.device": device,
            "cache.prefix_cache": prefix_cache, **extra}
    cfg = load_config(None, over)
    t0 = time.process_time()
    exp = build_experiment(cfg)
    build_s = time.process_time() - t0
    dev = model_device(exp.host.model)
    seq_cfg, bat_cfg = with_batching(exp.cfg, False), with_batching(exp.cfg, True)
    server = Server(exp)
    out = {"devices": n_devices, "build_cpu_s": round(build_s, 2), "rounds": []}
    sizes_seen: list[list[int]] = []
    real = batched.train_group

    def counting(host, task, jobs, **kw):
        sizes_seen[-1].append(len(jobs))
        return real(host, task, jobs, **kw)

    batched.train_group = counting
    try:
        for h in range(1, rounds + 1):
            rp = server.plan(h)
            if prefix_cache:   # warm the cache with this round's states (untimed)
                exp.cfg = seq_cfg
                run_devices(exp, rp.assignments)
            times, replies = {}, {}
            for mode in (("seq", "bat") if h % 2 else ("bat", "seq")):
                exp.cfg = seq_cfg if mode == "seq" else bat_cfg
                sizes_seen.append([])
                t = clock(dev)
                replies[mode] = run_devices(exp, rp.assignments)
                times[mode] = clock(dev) - t
                if mode == "seq":
                    sizes_seen.pop()
            groups = sizes_seen[-1]
            seq, bat = replies["seq"], replies["bat"]
            loss_diff = max(abs(seq[d].local.loss - bat[d].local.loss) for d in seq)
            state_diff = max(float((seq[d].local.state[k] - bat[d].local.state[k]).abs().max())
                             for d in seq for k in seq[d].local.state)
            same_time = all(seq[d].time.total_s == bat[d].time.total_s for d in seq)
            layouts = len({tuple(sorted(a.plan.ranks.items())) for a in rp.assignments.values()})
            row = {"round": h, "seq_s": round(times["seq"], 3), "batched_s": round(times["bat"], 3),
                   "speedup": round(times["seq"] / times["bat"], 3), "layouts": layouts, "groups": groups,
                   "max_loss_diff": loss_diff, "max_state_diff": state_diff, "virtual_time_equal": same_time}
            print(json.dumps(row), flush=True)
            out["rounds"].append(row)
            exp.cfg = seq_cfg
            server.close(h, server.finish(rp, seq))
    finally:
        batched.train_group = real
    seq_total = sum(r["seq_s"] for r in out["rounds"])
    bat_total = sum(r["batched_s"] for r in out["rounds"])
    out.update(seq_s=round(seq_total, 2), batched_s=round(bat_total, 2), speedup=round(seq_total / bat_total, 3))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fleet", default="6,80", help="comma-separated fleet sizes")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu", help="cpu (CPU seconds) or cuda (wall seconds)")
    p.add_argument("--prefix-cache", action="store_true", help="cache on, warmed by an untimed pass per round")
    p.add_argument("--max-tokens", type=int, help="rows x width of a forward chunk (batched.BATCH_TOKENS_*)")
    p.add_argument("--overhead", type=int, help="tokens' worth of one more chunk (batched.CHUNK_OVERHEAD_*)")
    p.add_argument("--set", nargs="*", default=[], help="config overrides key=value (JSON values)")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    from fedlegend import batched
    if a.max_tokens:
        batched.BATCH_TOKENS_CPU = batched.BATCH_TOKENS_CUDA = a.max_tokens
    if a.overhead is not None:
        batched.CHUNK_OVERHEAD_CPU = batched.CHUNK_OVERHEAD_CUDA = a.overhead
    extra = {}
    for item in a.set:
        k, _, v = item.partition("=")
        try:
            extra[k] = json.loads(v)
        except json.JSONDecodeError:
            extra[k] = v
    torch.set_num_threads(1)
    result = {"command": "python bench/batched.py " + " ".join(os.sys.argv[1:]), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
              "device": a.device, "torch": torch.__version__, "timer": "process_time (1 thread)" if a.device == "cpu"
              else "wall (cuda synchronized)", "fleets": []}
    if a.device.startswith("cuda"):
        result["gpu"] = torch.cuda.get_device_name(0)
    for n in (int(x) for x in a.fleet.split(",")):
        r = measure(n, a.rounds, a.device, a.prefix_cache, extra)
        print(f"{n} devices: sequential {r['seq_s']} s, batched {r['batched_s']} s, x{r['speedup']}", flush=True)
        result["fleets"].append(r)
    result["load_after"] = round(os.getloadavg()[0], 1)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "fleets"}))


if __name__ == "__main__":
    main()
