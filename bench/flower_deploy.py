"""Wall clock per round of a Flower federation on localhost, and where a round's time goes.

Run by hand (2-4 minutes):
    python bench/flower_deploy.py --devices 3 --rounds 5 [--tls-auth] [--isolation process|subprocess]

Starts a SuperLink and one SuperNode per device on this machine (LocalFederation, as
scripts/flower-local.py), runs LEGEND with the default model and data (default training: 5
local steps of batch 8; evaluation only at the last round) with measured status, and time
stamps every line of `flwr run --stream`. Reports: federation start-up, ServerApp start-up
(`flwr run` to the first round), wall clock of each round (from one "[ROUND k/R]" line to
the next; round R includes the evaluation and is left out of the mean), and, from the
measured records, each round's slowest device split into download / forward / backward /
upload as measured (download and upload include Flower's delivery: the SuperNode polls the
SuperLink every 3 s when idle, the SuperExec/worker polls its SuperNode, the server polls
for replies every 0.2 s), and the server's share (planning, aggregation, record).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedlegend.engine.flower.federation import ISOLATIONS, LocalFederation, flwr_env, free_port, write_device_files


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--local-steps", type=int, default=5)
    ap.add_argument("--tls-auth", action="store_true", help="TLS and SuperNode authentication")
    ap.add_argument("--isolation", choices=ISOLATIONS, default="process")
    ap.add_argument("--status", choices=["measured", "fleet"], default="measured")
    ap.add_argument("--workdir", help="default: a temporary folder")
    a = ap.parse_args()
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    wd = Path(a.workdir or tempfile.mkdtemp(prefix="fedlegend-bench-")).resolve()
    wd.mkdir(parents=True, exist_ok=True)
    cfg = wd / "bench.toml"
    cfg.write_text(f"[fleet]\ndevices = {a.devices}\n[run]\nrounds = {a.rounds}\neval_every = 1000\n"
                   f"[train]\nlocal_steps = {a.local_steps}\n")
    certs = None
    if a.tls_auth:
        from fedlegend.engine.flower.certs import write_certs

        certs = wd / "certs"
        write_certs(certs, supernodes=a.devices)
    out = wd / "out"
    # each SuperNode trains on its own file: the default data's training partitions, one file per device
    fed = LocalFederation(wd, free_port(), certs, a.isolation, auth=a.tls_auth,
                          node_data=write_device_files(cfg, a.devices, wd / "data"))
    stamps: dict[int, float] = {}
    parts: dict[tuple[int, int], list[float]] = {}  # (round, device) -> measured download, forward, backward, upload
    try:
        t0 = time.perf_counter()
        fed.start(a.devices)
        t_up = time.perf_counter()
        proc = subprocess.Popen(fed.run_args(cfg, out, a.status), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=flwr_env(wd), text=True)
        with open(wd / "flwr-run.log", "w") as log:
            for line in proc.stdout:
                now = time.perf_counter()
                log.write(f"{now - t0:8.2f} {line}")
                if m := re.search(r"\[ROUND (\d+)/(\d+)\]", line):
                    stamps[int(m.group(1))] = now
                elif m := re.search(r"round (\d+) device (\d+) measured download ([\d.]+) forward ([\d.]+) "
                                    r"backward ([\d.]+) upload ([\d.]+)", line):
                    parts[(int(m.group(1)), int(m.group(2)))] = [float(x) for x in m.groups()[2:]]
                elif "Strategy execution finished" in line:
                    stamps[a.rounds + 1] = now
        proc.wait()
        t_end = time.perf_counter()
    finally:
        fed.stop()
    if proc.returncode != 0:
        sys.exit(f"flwr run failed; see {wd / 'flwr-run.log'}")
    recs = [json.loads(l) for l in (out / "records.jsonl").read_text().splitlines()]
    walls = [stamps[k + 1] - stamps[k] for k in range(1, a.rounds + 1)]
    print(f"{a.devices} devices, {a.rounds} rounds, isolation {a.isolation}, "
          f"{'TLS + SuperNode auth' if a.tls_auth else 'insecure'}, status {a.status}; logs in {wd}")
    print(f"federation start-up {t_up - t0:.1f} s; flwr run -> round 1 {stamps[1] - t_up:.1f} s; "
          f"whole run {t_end - t_up:.1f} s")
    print(f"{'round':>5} {'wall s':>7} {'slowest device s':>16} {'down':>6} {'fwd':>6} {'bwd':>6} {'up':>6} "
          f"{'server+rest s':>13}")
    for k, (wall, rec) in enumerate(zip(walls, recs), start=1):
        slow = max(rec["devices"], key=lambda d: d["time_s"])
        p = parts.get((k, slow["id"]))
        cols = " ".join(f"{x:>6.2f}" for x in p) if p else " ".join(f"{'-':>6}" for _ in range(4))
        print(f"{k:>5} {wall:>7.2f} {slow['time_s']:>16.2f} {cols} {wall - rec['round_time_s']:>13.2f}")
    mid = walls[1:-1] or walls
    print(f"mean wall clock per round (rounds 2..{a.rounds - 1}): {sum(mid) / len(mid):.2f} s")
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
