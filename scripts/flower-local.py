#!/usr/bin/env python
"""Start a Flower SuperLink and one SuperNode per device on localhost, run fedlegend on them, stop them.

    python scripts/flower-local.py --config my.toml --devices 3 --out runs/flower-deploy \\
        [--data-file 0=a.jsonl --data-file 1=b.csv ... | --demo-partitions | --split-files]
        [--certs DIR [--auth]] [--status measured|fleet] [--isolation process|subprocess] [--keep]

Each SuperNode trains on the data its own node config names; the server (--config's data.*)
keeps only its test set and never names a device's path. Give each device its file with
--data-file I=PATH; or --demo-partitions: device I plays seeded partition I of the config's
registered dataset (data.name); or --split-files (default): the config's data, its training split
cut into the seeded partitions a simulation would use, written as one JSONL file per device into
--workdir/data.

--certs DIR uses TLS with the files of `fedlegend certs DIR`; without it everything runs --insecure.
--auth turns on SuperNode authentication: the SuperLink runs --enable-supernode-auth, the keys
DIR/supernode-I.pub are registered with `flwr supernode register`, and SuperNode I signs in with
DIR/supernode-I.key (make them with `fedlegend certs DIR --supernodes N`).
--isolation process (default) runs each SuperNode's ClientApp in one long-lived fedlegend worker
(the model loads once per device); subprocess is Flower's default, one process per message.
--keep leaves the federation up after the run (stop it with Ctrl-C). Logs go to --workdir.
Every component's PID is printed; all are stopped at the end, also on failure or Ctrl-C.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

from fedlegend.engine.flower.federation import (ISOLATIONS, LocalFederation, demo_partitions, free_port,
                                                write_device_files)


def node_data(a, workdir: Path) -> dict[int, dict]:
    """Each device's node config data keys, from --data-file, --demo-partitions or --split-files."""
    if a.data_file:
        files = {}
        for item in a.data_file:
            dev, sep, path = item.partition("=")
            if not sep or not dev.isdigit() or not 0 <= int(dev) < a.devices:
                raise SystemExit(f"--data-file {item!r}: give DEVICE=PATH with DEVICE in 0..{a.devices - 1}")
            files[int(dev)] = {"data-file": str(Path(path).resolve())}
        if missing := sorted(set(range(a.devices)) - set(files)):
            raise SystemExit(f"--data-file names no file for devices {missing}")
        return files
    if a.demo_partitions:
        from fedlegend.config import load_config

        cfg = load_config(a.config)
        return demo_partitions(cfg.data.name, a.devices, cfg.run.seed)
    return write_device_files(Path(a.config), a.devices, workdir / "data")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="fedlegend TOML; fleet.devices must equal --devices")
    p.add_argument("--devices", type=int, default=3)
    p.add_argument("--out", default="runs/flower-deploy")
    data = p.add_mutually_exclusive_group()
    data.add_argument("--data-file", action="append", metavar="I=PATH",
                      help="device I's own CSV/JSONL file (once per device)")
    data.add_argument("--demo-partitions", action="store_true",
                      help="device I plays seeded partition I of the config's registered dataset")
    data.add_argument("--split-files", action="store_true",
                      help="(default) write the config's training partitions as one file per device")
    p.add_argument("--certs", help="folder from `fedlegend certs` (default: --insecure)")
    p.add_argument("--auth", action="store_true", help="SuperNode authentication (needs --certs with supernode keys)")
    p.add_argument("--status", choices=["measured", "fleet"], default="measured",
                   help="devices' times: measured on this machine (default) or the fleet's cost model")
    p.add_argument("--isolation", choices=ISOLATIONS, default="process")
    p.add_argument("--workdir", help="logs and Flower's config home (default: a temporary folder)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds for the whole `flwr run`")
    p.add_argument("--keep", action="store_true")
    a = p.parse_args()
    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="fedlegend-flower-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    fed = LocalFederation(workdir, free_port(), Path(a.certs).resolve() if a.certs else None, a.isolation, a.auth,
                          node_data=node_data(a, workdir))
    print(f"devices' data: {fed.node_data}", file=sys.stderr)
    try:
        t0 = time.perf_counter()
        fed.start(a.devices)
        t1 = time.perf_counter()
        print(f"federation up in {t1 - t0:.1f} s: {fed.pids}; logs in {workdir}", file=sys.stderr)
        res = fed.run(Path(a.config).resolve(), Path(a.out).resolve(), timeout=a.timeout, status=a.status)
        print(f"flwr run exited {res.returncode} after {time.perf_counter() - t1:.1f} s; outputs in {a.out}, "
              f"log {workdir / 'flwr-run.log'}", file=sys.stderr)
        if a.keep:
            input("press Enter (or Ctrl-C) to stop the federation ")
        return res.returncode
    except KeyboardInterrupt:
        return 130
    finally:
        fed.stop()


if __name__ == "__main__":
    sys.exit(main())
