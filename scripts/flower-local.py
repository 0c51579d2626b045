#!/usr/bin/env python
"""Start a Flower SuperLink and one SuperNode per device on localhost, run fedlegend on them, stop them.

    python scripts/flower-local.py --config my.toml --devices 3 --out runs/flower-deploy [--certs DIR] [--keep]

--certs DIR uses TLS with the files of `fedlegend certs DIR`; without it everything runs --insecure.
--keep leaves the federation up after the run (stop it with Ctrl-C). Logs go to --workdir.
"""

import argparse
import sys
import tempfile
from pathlib import Path

from fedlegend.deploy import LocalFederation, free_port


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="fedlegend TOML; fleet.devices must equal --devices")
    p.add_argument("--devices", type=int, default=3)
    p.add_argument("--out", default="runs/flower-deploy")
    p.add_argument("--certs", help="folder from `fedlegend certs` (default: --insecure)")
    p.add_argument("--workdir", help="logs and Flower's config home (default: a temporary folder)")
    p.add_argument("--keep", action="store_true")
    a = p.parse_args()
    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="fedlegend-flower-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    fed = LocalFederation(workdir, free_port(), Path(a.certs).resolve() if a.certs else None)
    try:
        fed.start(a.devices)
        print(f"federation up: {fed.pids}; logs in {workdir}", file=sys.stderr)
        res = fed.run(Path(a.config).resolve(), Path(a.out).resolve())
        print(f"flwr run exited {res.returncode}; outputs in {a.out}, log {workdir / 'flwr-run.log'}", file=sys.stderr)
        if a.keep:
            input("press Enter (or Ctrl-C) to stop the federation ")
        return res.returncode
    except KeyboardInterrupt:
        return 130
    finally:
        fed.stop()


if __name__ == "__main__":
    sys.exit(main())
