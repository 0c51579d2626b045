"""Same config, same seed -> same numbers: every registered method, a few rounds each.

    python scripts/regression.py --save DIR     # records + adapter digests of this checkout
    python scripts/regression.py --check DIR    # this checkout against the saved ones

docs/results/regression-v1 holds the saved records of the code before the architecture-v2
refactor.

Used to show that a refactor keeps the numbers: run --save on the code before the change
and --check after it. Every record field (accuracy, loss, virtual time, bytes, waiting,
plans, events) must be equal, and every tensor of the exported adapter bit for bit (by
SHA-256 of its bytes). The real pretrained model and data, three devices, three rounds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file

from fedlegend.config import build_config
from fedlegend.methods import METHODS
from fedlegend.rundir import run_experiment

BASE = {"fleet.devices": 3, "run.rounds": 3, "train.local_steps": 2, "train.batch_size": 4,
        "data.eval_subset": 64, "run.eval_every": 2, "run.target_accuracy": 0.5,
        "method.fedadapter.trial_rounds": 2, "run.threads": 2}
# extra cases beyond each method's defaults: the eq. 14-15 budget path, HetLoRA's self-pruning
EXTRA = {
    "legend-deadline": {"method.name": "legend", "fleet.round_deadline_s": 6.0},
    "hetlora-pruning": {"method.name": "hetlora", "method.hetlora.self_pruning": True,
                        "method.hetlora.prune_threshold": 0.5},
}


def cases() -> dict[str, dict]:
    out = {m: {"method.name": m} for m in sorted(METHODS)}
    out.update(EXTRA)
    return out


def run_case(over: dict) -> dict:
    cfg = build_config({}, {**BASE, **over})
    with tempfile.TemporaryDirectory() as d:
        run_experiment(cfg, d, progress=False)
        records = [json.loads(x) for x in (Path(d) / "records.jsonl").read_text().splitlines()]
        adapter = {}
        for f in sorted((Path(d) / "adapter").glob("*.safetensors")):
            for k, v in load_file(f).items():
                adapter[k] = hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest()
    return {"records": records, "adapter": adapter}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--save", type=Path)
    g.add_argument("--check", type=Path)
    ap.add_argument("--only", default="", help="comma-separated case names (default: all)")
    args = ap.parse_args()
    names = [n for n in cases() if not args.only or n in args.only.split(",")]
    failed = []
    for name in names:
        got = run_case(cases()[name])
        if args.save:
            args.save.mkdir(parents=True, exist_ok=True)
            (args.save / f"{name}.json").write_text(json.dumps(got, indent=1))
            print(f"{name}: saved {len(got['records'])} records, {len(got['adapter'])} adapter tensors")
            continue
        want = json.loads((args.check / f"{name}.json").read_text())
        diffs = [f"record of round {w['round']}: " + ", ".join(k for k in w if w.get(k) != g.get(k))
                 for w, g in zip(want["records"], got["records"]) if w != g]
        if len(want["records"]) != len(got["records"]):
            diffs.append(f"{len(got['records'])} records, saved {len(want['records'])}")
        if want["adapter"] != got["adapter"]:
            keys = sorted(k for k in set(want["adapter"]) | set(got["adapter"])
                          if want["adapter"].get(k) != got["adapter"].get(k))
            diffs.append(f"adapter tensors differ: {keys[:4]}{' ...' if len(keys) > 4 else ''}")
        print(f"{name}: {'same records and adapter' if not diffs else 'DIFFERS: ' + '; '.join(diffs)}")
        if diffs:
            failed.append(name)
    if args.check:
        print(f"{len(names) - len(failed)} same, {len(failed)} different" + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
