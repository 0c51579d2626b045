import csv

import pytest

from fedlegend.compare import markdown_table, run_compare
from fedlegend.config import build_config
from fedlegend.rundir import finished_run, run_relevant


def test_markdown_table_ratios_to_legend():
    rows = [{"method": "legend", "final_accuracy": 0.8, "time_to_target_s": 100.0, "bytes_to_target": 1e6,
             "mean_waiting_s": 1.0},
            {"method": "fedlora", "final_accuracy": 0.8, "time_to_target_s": 280.0, "bytes_to_target": 2e6,
             "mean_waiting_s": 4.0},
            {"method": "hetlora", "final_accuracy": 0.7, "time_to_target_s": None, "bytes_to_target": None,
             "mean_waiting_s": 2.0}]
    t = markdown_table(rows, ["legend", "fedlora", "hetlora"])
    fed = next(l for l in t.splitlines() if l.startswith("| fedlora"))
    assert "280 ± 0" in fed and "| 2.80 |" in fed and "| 4.00 |" in fed
    assert "never" in next(l for l in t.splitlines() if l.startswith("| hetlora"))


@pytest.mark.slow   # three real runs and the figures: ~12 s on 2 cores
def test_compare_writes_csv_table_and_figures(tmp_path, tiny_cfg):
    cfg = tiny_cfg(**{"fleet.devices": 2, "data.eval_subset": 32, "run.target_accuracy": 0.75})
    rows = run_compare(cfg, ["legend", "fedlora", "legend-wo-ld"], [0], tmp_path, progress=False)
    target = min(r["final_accuracy"] for r in rows)
    assert all(r["target_accuracy"] == target for r in rows)          # the paper's rule
    assert all(r["time_to_target_s"] is not None for r in rows)       # every method reaches the lowest final
    with open(tmp_path / "summary.csv") as f:
        got = list(csv.DictReader(f))
    assert [r["method"] for r in got] == ["legend", "fedlora", "legend-wo-ld"]
    for png in ("fig7_accuracy_vs_time", "fig8_time_to_target", "fig11_traffic_to_target", "fig12_waiting",
                "fig13_ablation"):
        assert (tmp_path / f"{png}.png").stat().st_size > 1000
    assert (tmp_path / "table.md").read_text().count("\n") == 5
    legend = cfg.model_copy(deep=True)
    legend.method.name = "legend"
    assert finished_run(tmp_path / "legend-seed0", legend)["final_accuracy"] == rows[0]["final_accuracy"]
    assert finished_run(tmp_path / "fedlora-seed0", legend) is None          # another method's run
    # --resume reads finished runs of the same config back instead of running them again
    before = (tmp_path / "legend-seed0" / "records.jsonl").stat().st_mtime_ns
    again = run_compare(cfg, ["legend", "fedlora", "legend-wo-ld"], [0], tmp_path, progress=False, resume=True)
    assert (tmp_path / "legend-seed0" / "records.jsonl").stat().st_mtime_ns == before
    assert [r["final_accuracy"] for r in again] == [r["final_accuracy"] for r in rows]
    changed = cfg.model_copy(deep=True)
    changed.train.lr = cfg.train.lr / 2                                 # another config: runs again
    run_compare(changed, ["legend"], [0], tmp_path, progress=False, resume=True)
    assert (tmp_path / "legend-seed0" / "records.jsonl").stat().st_mtime_ns != before


def test_resume_ignores_sections_of_other_methods():
    import tomllib
    from fedlegend.config import dump_config

    a = build_config({}, {"method.name": "fedlora"})
    b = build_config({}, {"method.name": "fedlora", "method.hetlora.rank_max": 4})
    c = build_config({}, {"method.name": "fedlora", "method.fedlora.rank": 4})
    rel = lambda cfg: run_relevant(tomllib.loads(dump_config(cfg)))
    assert rel(a) == rel(b) and rel(a) != rel(c)


def test_same_run_reads_a_saved_config_through_todays_defaults():
    """A knob added since a run finished (absent from its config.toml, at its default today) keeps it
    the same run; a changed value or a key that no longer exists makes it another."""
    import tomllib

    import tomli_w

    from fedlegend.config import build_config, dump_config
    from fedlegend.rundir import same_run

    cfg = build_config({}, {"fleet.devices": 3})
    saved = tomllib.loads(dump_config(cfg))
    del saved["fleet"]["downlink_factor"]                     # an "older" config without this knob
    assert same_run(tomli_w.dumps(saved), cfg)
    assert not same_run(tomli_w.dumps(saved), build_config({}, {"fleet.devices": 3, "fleet.downlink_factor": 2.0}))
    saved["fleet"]["gone_knob"] = 1
    assert not same_run(tomli_w.dumps(saved), cfg)
    assert not same_run("not [valid toml", cfg)
