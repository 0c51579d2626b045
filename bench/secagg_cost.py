"""What secure aggregation on the global shape would cost in upload, from a finished run's records.

Under SecAgg+ every device must send the GLOBAL shape (zero outside the layers and ranks it
trained) plus one participation weight per tensor, so that the summed weights turn the masked
sum into exact layer-wise averages (docs/privacy.md, "Secure aggregation"). This compares that
with what the run's devices actually uploaded (records' bytes_up). Computed, not measured on
the wire; SecAgg+'s own key-share messages are not counted.

    OMP_NUM_THREADS=1 python bench/secagg_cost.py bench/out/faults/dropout-0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", help="a finished run folder (config.toml, records.jsonl)")
    a = ap.parse_args()
    from fedlegend.config import load_config
    from fedlegend.experiment import build_experiment
    from fedlegend.spec import state_bytes

    run = Path(a.run)
    exp = build_experiment(load_config(run / "config.toml"))
    full, counts = state_bytes(exp.initial_state), 4 * len(exp.initial_state)  # one float32 weight per tensor
    recs = [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()]
    plain = sum(r["bytes_up"] for r in recs)
    n = sum(len(r["devices"]) for r in recs)
    print(f"{exp.method.info.name}: global ranks {exp.method.global_ranks()}")
    print(f"device-rounds {n}; plain upload {plain / 1e6:.2f} MB ({plain / n / 1e3:.1f} kB per device-round); "
          f"global shape {full / 1e3:.1f} kB + counts {counts} B per device-round = {n * (full + counts) / 1e6:.2f} MB; "
          f"x{n * (full + counts) / plain:.2f}")


if __name__ == "__main__":
    main()
