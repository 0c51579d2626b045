"""What secure aggregation costs in upload: measured per method, with and without SecAgg+.

For each method whose rule is a sum, the same experiment (6 devices, a few rounds) runs twice:
plain on the local engine (records' bytes_up: the float32 tensors each device trained, what the
Flower engine uploads too: tests/test_flower.py), and under Flower's SecAgg+ through the Flower
strategy over engine/flower/inprocess.py's Grid (the real protocol: Flower's SecAggPlusWorkflow and
secaggplus_mod, every message as a node receives it; no Ray, no sockets, so the bytes are the same
and the time is the training's). Secure records count what goes on the wire: the masked vectors
(Flower sends them as int64 .npy buffers, over the GLOBAL shape plus one weight per tensor) and the
protocol's own messages (public keys, encrypted key shares, unmasking shares: protobuf size of each
message's SecAgg+ record). Writes a markdown table and bench/out/secagg/cost.json.

    OMP_NUM_THREADS=1 python bench/secagg_cost.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

METHODS = ["legend", "fedlora", "ffa-lora", "fedra", "hetlora"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--devices", type=int, default=6)
    ap.add_argument("--methods", nargs="*", default=METHODS)
    ap.add_argument("--out", default="bench/out/secagg")
    a = ap.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    import torch

    torch.set_num_threads(1)
    from fedlegend.config import build_config
    from fedlegend.engine.flower.flwr_compat import TaskIdentity
    from fedlegend.engine.flower.inprocess import run_in_process
    from fedlegend.engine.local import run_local
    from fedlegend.experiment import build_experiment

    # a message needs Flower's run identity, which a simulation or a SuperNode sets
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 1
    rows = []
    for name in a.methods:
        over = {"fleet.devices": a.devices, "run.rounds": a.rounds, "method.name": name, "run.eval_every": a.rounds,
                "data.eval_subset": 200}
        if name == "hetlora":
            over["method.hetlora.weighting"] = "samples"
        t0 = time.process_time()
        _, plain = run_local(build_experiment(build_config({}, over)), progress=False)
        t1 = time.process_time()
        strategy, _ = run_in_process(build_experiment(build_config({}, {**over, "run.engine": "flower",
                                                                        "privacy.secure_aggregation": True})))
        t2 = time.process_time()
        secure = strategy.records
        dev_rounds = sum(len(r["devices"]) for r in plain)
        row = {"method": name, "device_rounds": dev_rounds, "secure_device_rounds": sum(len(r["devices"]) for r in secure),
               "plain_up": sum(r["bytes_up"] for r in plain), "secure_up": sum(r["bytes_up"] for r in secure),
               "masked_up": sum(r["secagg"]["masked_bytes_up"] for r in secure),
               "protocol_up": sum(r["secagg"]["protocol_bytes_up"] for r in secure),
               "protocol_down": sum(r["secagg"]["protocol_bytes_down"] for r in secure),
               "plain_down": sum(r["bytes_down"] for r in plain), "secure_down": sum(r["bytes_down"] for r in secure),
               "plain_accuracy": plain[-1]["accuracy"], "secure_accuracy": secure[-1]["accuracy"],
               "max_error": secure[0]["secagg"]["max_error"],
               "cpu_plain_s": t1 - t0, "cpu_secure_s": t2 - t1}
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cost.json").write_text(json.dumps({"rounds": a.rounds, "devices": a.devices, "rows": rows}, indent=1))
    print(f"\n{a.devices} devices, {a.rounds} rounds; kB per device-round\n")
    print("| method | plain upload | SecAgg+ upload (masked vector + protocol) | x plain | protocol down |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        n = r["device_rounds"]
        print(f"| {r['method']} | {r['plain_up'] / n / 1e3:.1f} | {r['secure_up'] / n / 1e3:.1f} "
              f"({r['masked_up'] / n / 1e3:.1f} + {r['protocol_up'] / n / 1e3:.2f}) | "
              f"x{r['secure_up'] / r['plain_up']:.2f} | {r['protocol_down'] / n / 1e3:.2f} |")


if __name__ == "__main__":
    main()
