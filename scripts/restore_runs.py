"""Rebuild finished run folders from records kept under docs/results, so that `fedlegend compare --resume`
reads them back instead of training them again (a long compare spread over sessions whose runs/ folder
did not survive: the kept records are the runs' own, written round by round).

    python scripts/restore_runs.py --records docs/results/depth-lever/mpnet-base \
        --config docs/results/depth-lever/mpnet.toml --out runs/lever/mpnet-base --workers 2

Each METHOD-seedS-records.jsonl in --records becomes --out/METHOD-seedS/ with records.jsonl, the run's
config.toml (the config and flags given here, with that method and seed: give the ones the compare will
be resumed with, --workers included) and summary.json (from the records; the wall clock from a
summary.csv beside them when it has the run, else null). A records file whose last round is not the
config's last round is skipped with a line: an unfinished run cannot be restored, only rerun.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path

from fedlegend.config import dump_config, load_config
from fedlegend.methods import check_method
from fedlegend.results import read_records, summarize

NAME = re.compile(r"^(?P<method>.+)-seed(?P<seed>\d+)-records\.jsonl$")


def wall_clocks(folder: Path) -> dict[tuple[str, int], float]:
    path = folder / "summary.csv"
    if not path.exists():
        return {}
    return {(r["method"], int(r["seed"])): float(r["wall_clock_s"]) for r in csv.DictReader(open(path))
            if r.get("wall_clock_s")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=Path, required=True, help="a folder of METHOD-seedS-records.jsonl files")
    ap.add_argument("--config", help="the compare's config file")
    ap.add_argument("--preset")
    ap.add_argument("--workers", type=int, help="run.workers of the compare to be resumed")
    ap.add_argument("--out", type=Path, required=True, help="the compare's --out")
    a = ap.parse_args()
    cfg = load_config(a.config, {"run.workers": a.workers} if a.workers else {}, preset=a.preset)
    walls = wall_clocks(a.records)
    for path in sorted(a.records.glob("*-seed*-records.jsonl")):
        m = NAME.match(path.name)
        method, seed = check_method(m["method"]), int(m["seed"])
        records = read_records(path)
        if not records or records[-1]["round"] != cfg.run.rounds:
            print(f"{path}: ends at round {records[-1]['round'] if records else 0} of {cfg.run.rounds}; skipped")
            continue
        run_cfg = cfg.model_copy(deep=True)
        run_cfg.method.name, run_cfg.run.seed = method, seed
        run = a.out / f"{method}-seed{seed}"
        run.mkdir(parents=True, exist_ok=True)
        (run / "records.jsonl").write_text(path.read_text())
        (run / "config.toml").write_text(dump_config(run_cfg))
        summary = summarize(records, method, run_cfg.run.target_accuracy, seed=seed, devices=run_cfg.fleet.devices,
                            wall_clock_s=walls.get((method, seed)), peak_rss_mb=None)
        (run / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"{run}: restored ({len(records)} rounds, final accuracy {summary['final_accuracy']})")


if __name__ == "__main__":
    main()
