"""Soak: a deployed federation on localhost whose SuperNodes are killed and restarted at random (seeded).

Run by hand (about 10-15 minutes on 2 cores):
    python bench/flower_soak.py --devices 3 --rounds 10 --seed 0

Starts a SuperLink and one SuperNode + worker per device (LocalFederation, loopback only,
insecure), runs LEGEND with the default model and data (fleet status; `--local-steps` sets the
round's pace, so that restarts overlap rounds) and, while the run goes on, stops a random
SuperNode (SIGTERM: it leaves gracefully; SIGKILL, with probability `--kill-p`: a crash the
SuperLink only notices when its heartbeats stop), leaves it down for a few seconds and starts
it again with the same device id; its worker keeps running and must serve the new SuperNode.
The chaos is bounded (`--max-restarts`, and it stops when the run ends) and so is the run
(`--timeout`). Checks and prints:
- rounds completed (every round must complete with what arrived);
- restarts survived: restarts after which the device came back (a `rejoined` event) and
  trained again, with its worker process unchanged;
- updates lost: replies that reached the SuperLink (the device's worker pushed a TRAIN reply
  for round r and its SuperNode logged it sent) but are not among round r's accepted devices.
Writes the figures to bench/out/flower_soak.json (or --json).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import re
import signal
import subprocess
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from fedlegend.engine.flower.federation import LocalFederation, free_port, write_device_files

ROOT = Path(__file__).resolve().parents[1]


def read_records(out: Path) -> list[dict]:
    path = out / "records.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def supernode_sent(log_text: str) -> dict[int, int]:
    """Round -> number of TRAIN replies the SuperNode logged as sent to the SuperLink (its log, all restarts)."""
    sent: dict[int, int] = {}
    rnd, kind = None, None
    for line in log_text.splitlines():
        if m := re.search(r"\[RUN \d+, ROUND (\d+)\]", line):
            rnd, kind = int(m.group(1)), None
        elif m := re.search(r"Sending: (\w+) message", line):
            kind = m.group(1)
        elif "Sent successfully" in line and kind == "train" and rnd is not None:
            sent[rnd] = sent.get(rnd, 0) + 1
            rnd, kind = None, None
    return sent


def worker_pushed(log_text: str) -> dict[int, int]:
    """Round -> TRAIN replies (not error replies) the worker pushed to its SuperNode."""
    pushed: dict[int, int] = {}
    for m in re.finditer(r"pushed the reply to a train message \(round (\d+)\)", log_text):
        pushed[int(m.group(1))] = pushed.get(int(m.group(1)), 0) + 1
    return pushed


def run_soak(workdir: Path, config_toml: str, devices: int = 3, rounds: int = 10, seed: int = 0,
             gap_s: tuple[float, float] = (20.0, 45.0), down_s: tuple[float, float] = (1.0, 6.0),
             kill_p: float = 0.3, max_restarts: int = 8, round_timeout_s: float = 90.0, rejoin_wait_s: float = 45.0,
             timeout_s: float = 900.0, log=print) -> dict:
    """One soak run in `workdir`; returns its figures (see the module docstring). Never leaves a process behind."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "soak.toml"
    cfg.write_text(config_toml)
    out = workdir / "out"
    rng = random.Random(seed)
    fed = LocalFederation(workdir, free_port(), node_data=write_device_files(cfg, devices, workdir / "data"))
    restarts: list[dict] = []
    result: dict = {}
    t0 = time.monotonic()
    try:
        fed.start(devices)
        worker_pids = {d: fed.procs[f"worker{d}"].pid for d in range(devices)}
        log(f"federation up in {time.monotonic() - t0:.1f} s; pids {fed.pids}")
        runner = threading.Thread(target=lambda: result.update(res=fed.run(
            cfg, out, timeout=timeout_s, status="fleet",
            extra={"round-timeout-s": float(round_timeout_s), "rejoin-wait-s": float(rejoin_wait_s)})), daemon=True)
        runner.start()
        while runner.is_alive() and len(restarts) < max_restarts:
            runner.join(timeout=rng.uniform(*gap_s))
            done = len(read_records(out))
            if not runner.is_alive() or done >= rounds - 1:
                break                     # leave the last round alone: a restart then could not be seen rejoining
            dev = rng.randrange(devices)
            sig = signal.SIGKILL if rng.random() < kill_p else signal.SIGTERM
            down = rng.uniform(*down_s)
            t_kill = time.monotonic() - t0
            fed.kill_supernode(dev, sig)
            time.sleep(down)
            fed.start_node(dev, worker=False)
            restarts.append({"device": dev, "signal": signal.Signals(sig).name, "at_s": round(t_kill, 1),
                             "down_s": round(down, 1), "rounds_done": done})
            log(f"t={t_kill:6.1f} s  rounds done {done}: SuperNode {dev} {signal.Signals(sig).name}, "
                f"down {down:.1f} s, restarted")
        runner.join(timeout=max(1.0, timeout_s - (time.monotonic() - t0)))
        workers_alive = {d: fed.procs[f"worker{d}"].poll() is None and fed.procs[f"worker{d}"].pid == worker_pids[d]
                         for d in range(devices)}
    finally:
        fed.stop()
    wall = time.monotonic() - t0
    res: subprocess.CompletedProcess | None = result.get("res")
    recs = read_records(out)
    accepted = {r["round"]: sorted(d["id"] for d in r["devices"]) for r in recs}
    events = [dict(e, round=r["round"]) for r in recs for e in r["events"]]
    sent, pushed, lost = {}, {}, []
    for d in range(devices):
        sn = supernode_sent((workdir / f"supernode{d}.log").read_text(errors="replace"))
        wk = worker_pushed((workdir / f"worker{d}.log").read_text(errors="replace"))
        for rnd in sorted(set(sn) | set(wk)):
            arrived = min(sn.get(rnd, 0), wk.get(rnd, 0))   # a TRAIN reply of this device reached the SuperLink
            sent[f"{rnd}/{d}"], pushed[f"{rnd}/{d}"] = arrived, wk.get(rnd, 0)
            if arrived and d not in accepted.get(rnd, []):
                lost.append({"round": rnd, "device": d})
    survived = 0
    for r in restarts:
        later = [e for e in events if e["kind"] == "rejoined" and e["device"] == r["device"]
                 and e["round"] > r["rounds_done"]]
        trained_after = later and any(r["device"] in accepted.get(rnd, []) for rnd in accepted
                                      if rnd >= later[0]["round"])
        r["rejoined_in_round"] = later[0]["round"] if later else None
        survived += bool(later and trained_after and workers_alive.get(r["device"]))
    kinds: dict[str, int] = {}
    for e in events:
        kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
    return {
        "rounds_planned": rounds, "rounds_completed": len(recs), "flwr_run_rc": None if res is None else res.returncode,
        "restarts": len(restarts), "restarts_survived": survived, "restart_log": restarts,
        "workers_alive_same_pid": workers_alive,
        "updates_accepted": sum(len(v) for v in accepted.values()),
        "updates_arrived": sum(sent.values()), "updates_pushed_by_workers": sum(pushed.values()),
        "updates_lost": len(lost), "lost": lost, "event_counts": kinds,
        "accepted_per_round": {str(k): v for k, v in accepted.items()},
        "wall_s": round(wall, 1), "workdir": str(workdir),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--local-steps", type=int, default=20, help="sets the round's pace (restarts must overlap rounds)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kill-p", type=float, default=0.3, help="probability that a stop is a SIGKILL (a crash)")
    ap.add_argument("--max-restarts", type=int, default=8)
    ap.add_argument("--gap-s", type=float, nargs=2, default=(20.0, 45.0), help="seconds between restarts (uniform)")
    ap.add_argument("--round-timeout-s", type=float, default=90.0)
    ap.add_argument("--rejoin-wait-s", type=float, default=45.0)
    ap.add_argument("--timeout", type=float, default=900.0, help="bound on the whole run (s)")
    ap.add_argument("--workdir", help="default: a temporary folder")
    ap.add_argument("--json", default=str(ROOT / "bench" / "out" / "flower_soak.json"))
    a = ap.parse_args()
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print("uptime:", load)
    wd = Path(a.workdir or tempfile.mkdtemp(prefix="fedlegend-soak-")).resolve()
    toml = (f"[fleet]\ndevices = {a.devices}\n[run]\nrounds = {a.rounds}\neval_every = 1000\n"
            f"[train]\nlocal_steps = {a.local_steps}\n[data]\neval_subset = 64\n")
    fig = run_soak(wd, toml, a.devices, a.rounds, a.seed, tuple(a.gap_s), kill_p=a.kill_p,
                   max_restarts=a.max_restarts, round_timeout_s=a.round_timeout_s, rejoin_wait_s=a.rejoin_wait_s,
                   timeout_s=a.timeout)
    fig.update(command=" ".join(["python bench/flower_soak.py", f"--devices {a.devices}", f"--rounds {a.rounds}",
                                 f"--local-steps {a.local_steps}", f"--seed {a.seed}"]),
               machine=f"{platform.machine()}, {__import__('os').cpu_count()} CPUs", load=load,
               date=datetime.now(timezone.utc).strftime("%Y-%m-%d"))
    print(f"rounds completed {fig['rounds_completed']}/{a.rounds} (flwr run rc {fig['flwr_run_rc']}), "
          f"restarts survived {fig['restarts_survived']}/{fig['restarts']}, updates lost {fig['updates_lost']} "
          f"(arrived {fig['updates_arrived']}, accepted {fig['updates_accepted']}), events {fig['event_counts']}, "
          f"wall {fig['wall_s']:.0f} s")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(fig, indent=2) + "\n")
    print("written", a.json)


if __name__ == "__main__":
    main()
