#!/usr/bin/env python
"""Start a Flower SuperLink and one SuperNode per device on localhost, run fedlegend on them, stop them.

    python scripts/flower-local.py --config my.toml --devices 3 --out runs/flower-deploy \\
        [--certs DIR [--auth]] [--status measured|fleet] [--isolation process|subprocess] [--keep]

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

from fedlegend.engine.flower.federation import ISOLATIONS, LocalFederation, free_port


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="fedlegend TOML; fleet.devices must equal --devices")
    p.add_argument("--devices", type=int, default=3)
    p.add_argument("--out", default="runs/flower-deploy")
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
    fed = LocalFederation(workdir, free_port(), Path(a.certs).resolve() if a.certs else None, a.isolation, a.auth)
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
