"""The device activation cache (docs/device_cache.md): tables from run folders, and a cost-model replay.

    python bench/device_cache.py table NAME=RUN_DIR ... [--target ACC] [--rounds N]
    python bench/device_cache.py replay --methods legend,fedlora [--config TOML] [--rounds N] [--devices N] [--out DIR]

table: each RUN_DIR holds a records.jsonl (a run folder, e.g. runs/device-cache/on-legend/legend-seed0). The
target is the paper's rule, the lowest final accuracy among the runs given, unless --target; --rounds N
compares the first N rounds only (runs still going). The first run named fedlora* is the reference of the
ratios. Prints a markdown table: final accuracy, time to target and FedLoRA's time over it, mean round time,
traffic to target, mean waiting, mean depth, peak per-device cache storage and the cache's hit shares.

replay: the virtual clock of a run without training. LEGEND's and FedLoRA's plans depend only on the
devices' status reports, which come from the cost model and the batches a device draws (a pure function of
seed, device and round), never on the trained values; so every round's plan, time, traffic, waiting and
cache use is exactly the real run's (checked against real records), for the cost of building the model and
tokenizing the batches. Accuracy needs training, so the replay has none; FedAdapter's search reads the
training loss, so it cannot be replayed. Writes DIR/METHOD-off.jsonl and METHOD-on.jsonl (records without
accuracy) and prints the table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fedlegend.results import read_records, time_to_target


def load(spec: str, rounds: int | None) -> tuple[str, list[dict]]:
    name, _, path = spec.partition("=")
    recs = read_records(Path(path) / "records.jsonl")
    return name, recs[:rounds] if rounds else recs


def row(name: str, recs: list[dict], target: float, ref_t: float | None, clock_ref: list[dict] | None = None) -> str:
    """One table row; with `clock_ref` (a replay: no accuracy) the ratio column is the reference's
    virtual time over this run's, at the same number of rounds."""
    evals = [r["accuracy"] for r in recs if r["accuracy"] is not None]
    t, b, rnd = time_to_target(recs, target)
    steps = {k: sum(r.get(f"device_cache_{k}", 0) for r in recs) for k in ("hits", "partial", "misses")}
    total = sum(steps.values())
    peak = max((r.get("device_cache_mb", 0.0) for r in recs), default=0.0)
    depth = np.mean([d["depth"] for r in recs for d in r["devices"]])
    cells = [name, f"{100 * evals[-1]:.1f}" if evals else "-",
             f"{t:.0f} (r{rnd})" if t is not None else "not reached",
             (f"{clock_ref[len(recs) - 1]['virtual_time_s'] / recs[-1]['virtual_time_s']:.2f}x (clock)" if clock_ref
              else f"{ref_t / t:.2f}x" if t and ref_t else "-"),
             f"{np.mean([r['round_time_s'] for r in recs]):.2f}",
             f"{b / 1e6:.1f}" if b is not None else "-",
             f"{np.mean([r['mean_waiting_s'] for r in recs]):.2f}", f"{depth:.2f}",
             f"{peak:.1f}" if "device_cache_mb" in recs[-1] else "off",
             (f"{100 * steps['hits'] / total:.0f} / {100 * steps['partial'] / total:.0f} / "
              f"{100 * steps['misses'] / total:.0f}") if total else "-"]
    return "| " + " | ".join(cells) + " |"


def replay(cfg) -> list[dict]:
    """The records (no accuracy) of `cfg`'s run on the virtual clock, every device's update its payload."""
    from fedlegend.client import LocalResult
    from fedlegend.engine.local import Server, device_result, planned_shapes
    from fedlegend.experiment import build_experiment
    from fedlegend.methods.base import trained_part

    exp = build_experiment(cfg)
    if cfg.fleet.dropout_rate or cfg.fleet.cutoff_s or cfg.method.name not in ("legend", "fedlora"):
        raise SystemExit("replay: LEGEND or FedLoRA, without drop-outs or a cutoff")
    server = Server(exp)
    records = []
    for h in range(1, cfg.run.rounds + 1):
        rp = server.plan(h)
        replies = {}
        for dev, a in rp.assignments.items():
            shapes = planned_shapes(exp, a)
            local = LocalResult(trained_part(a.payload, a.plan), sum(s[0] for s in shapes), 0.0, shapes)
            replies[dev] = device_result(exp, a, local)
        out = server.finish(rp, replies)
        records.append({"round": h, "virtual_time_s": server.clock, "accuracy": None, **out.record})
    return records


def cmd_replay(a) -> None:
    import json

    from fedlegend.config import load_config

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for m in a.methods.split(","):
        for on in (False, True) if m != "fedlora" else (False,):
            over = {"method.name": m, "fleet.device_activation_cache": on, "run.rounds": a.rounds,
                    "fleet.devices": a.devices}
            cfg = load_config(a.config, {k: v for k, v in over.items() if v is not None})
            recs = replay(cfg)
            name = f"{m}-{'on' if on else 'off'}"
            (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
            runs.append((name, recs))
    print(f"replay of {a.config or 'the default config'} (no training: no accuracy) -> {out}")
    print()
    header()
    ref = next((recs for name, recs in runs if name.startswith("fedlora")), None)   # None: no ratio column
    for name, recs in runs:
        print(row(name, recs, 2.0, None, clock_ref=ref))


def header() -> None:
    print("| run | final acc. (%) | time to target (s) | FedLoRA / it | mean round (s) | traffic to target (MB) "
          "| mean waiting (s) | mean depth | peak cache per device (MB) | hits / partial / misses (%) |")
    print("|---|---|---|---|---|---|---|---|---|---|")


def cmd_table(a) -> None:
    runs = [load(s, a.rounds) for s in a.runs]
    finals = [next((r["accuracy"] for r in reversed(recs) if r["accuracy"] is not None), None) for _, recs in runs]
    target = a.target if a.target is not None else min(f for f in finals if f is not None)
    ref = next((recs for name, recs in runs if name.startswith("fedlora")), None)
    ref_t = time_to_target(ref, target)[0] if ref else None
    print(f"target accuracy {100 * target:.1f} %" + (" (--target)" if a.target is not None else
                                                       " (the lowest final accuracy)")
          + (f", first {a.rounds} rounds" if a.rounds else ""))
    print()
    header()
    for name, recs in runs:
        print(row(name, recs, target, ref_t))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("table")
    t.add_argument("runs", nargs="+", help="NAME=RUN_DIR")
    t.add_argument("--target", type=float)
    t.add_argument("--rounds", type=int)
    r = sub.add_parser("replay")
    r.add_argument("--methods", default="legend,fedlora")
    r.add_argument("--config")
    r.add_argument("--rounds", type=int)
    r.add_argument("--devices", type=int)
    r.add_argument("--out", default="runs/device-cache/replay")
    a = p.parse_args(argv)
    (cmd_table if a.cmd == "table" else cmd_replay)(a)


if __name__ == "__main__":
    main()
