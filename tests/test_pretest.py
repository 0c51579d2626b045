"""fedlegend pretest: layer sets, rank distributions, the fixed-layout method, outputs, CLI errors."""

import csv
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlegend.cli import main
from fedlegend.pretest import (DEPTH_FIELDS, DISTRIBUTIONS, PAPER, POSITION_FIELDS, RANKS_FIELDS, FixedLayout,
                               PretestError, depth_layers, fit_per_layer, position_layers,
                               rank_distribution)
from fedlegend.pretest_measure import _cpu_peak_bytes


def test_position_thirds_of_the_papers_12_layers_and_of_minilm():
    p = position_layers(12)
    assert p == {"all": list(range(12)), "shallow": [0, 1, 2, 3], "middle": [4, 5, 6, 7], "deep": [8, 9, 10, 11]}
    p = position_layers(6)
    assert (p["shallow"], p["middle"], p["deep"]) == ([0, 1], [2, 3], [4, 5])
    p = position_layers(7)   # the first thirds take the extra layer
    assert (p["shallow"], p["middle"], p["deep"]) == ([0, 1, 2], [3, 4], [5, 6])
    with pytest.raises(PretestError, match="at least 3 layers"):
        position_layers(2)


def test_depth_is_the_top_k_layers_and_a_bad_depth_is_refused():
    assert depth_layers(6, 1) == [5]
    assert depth_layers(6, 6) == list(range(6))
    for bad in (0, 7):
        with pytest.raises(PretestError, match=r"outside 1\.\.6"):
            depth_layers(6, bad)


def test_rank_distributions_of_the_papers_budget():
    inc = rank_distribution("inc", 12, 96)
    assert sum(inc) == 96 and inc[0] == PAPER["ranks"]["inc"][0] and inc == sorted(inc)
    assert max(abs(a - b) for a, b in zip(inc, PAPER["ranks"]["inc"])) <= 1   # the paper's 4..13 ramp, within 1
    assert rank_distribution("dec", 12, 96) == inc[::-1]
    assert rank_distribution("uniform", 12, 96) == [8] * 12
    assert rank_distribution("inc", 6, 48) == [4, 6, 7, 9, 10, 12]
    assert rank_distribution("random", 12, 96, seed=3) == rank_distribution("random", 12, 96, seed=3)
    with pytest.raises(PretestError, match="cannot give each"):
        rank_distribution("inc", 12, 11)
    with pytest.raises(PretestError, match="unknown rank distribution"):
        rank_distribution("zigzag", 12, 96)


@settings(max_examples=60, deadline=None)
@given(L=st.integers(1, 48), extra=st.integers(0, 400), seed=st.integers(0, 2**16))
def test_every_distribution_spends_the_budget_with_its_shape(L, extra, seed):
    budget = L + extra
    d = {k: rank_distribution(k, L, budget, seed) for k in DISTRIBUTIONS}
    for k, ranks in d.items():
        assert len(ranks) == L and sum(ranks) == budget and min(ranks) >= 1, k
    assert d["inc"] == sorted(d["inc"])
    assert d["dec"] == sorted(d["dec"], reverse=True)
    assert max(d["uniform"]) - min(d["uniform"]) <= 1 and d["uniform"] == sorted(d["uniform"])


def test_fixed_layout_trains_exactly_its_layers_on_every_device(method_ctx):
    from fedlegend.methods.base import RoundView, Skip

    ctx = method_ctx(L=6, n=3)
    m = FixedLayout(ctx, {4: 8, 5: 8}, "deep")
    assert m.info.name == "deep" and m.global_ranks() == {4: 8, 5: 8}
    state = {f"layers.{l}.q.lora_A": torch.zeros(8, 32) for l in range(6)}
    out = m.configure(RoundView(1, [0, 1, 2]), state)
    assert not any(isinstance(a, Skip) for a in out.values())
    assert all(a.plan.ranks == {4: 8, 5: 8} for a in out.values())
    assert all(set(a.payload) == {"layers.4.q.lora_A", "layers.5.q.lora_A"} for a in out.values())
    with pytest.raises(PretestError, match="outside the model's layers"):
        FixedLayout(ctx, {6: 8})


def test_fit_per_layer_and_cpu_peak_memory():
    slope, inc = fit_per_layer([1, 2, 3], [10.0, 15.0, 20.0])
    assert slope == pytest.approx(5.0) and inc == pytest.approx(100.0)
    assert fit_per_layer([1], [3.0]) == (None, None)
    lin = torch.nn.Linear(256, 256)
    x = torch.randn(512, 256)

    def step():
        lin(x).square().sum().backward()
    peak = _cpu_peak_bytes(step)
    assert peak >= 512 * 256 * 4   # at least the output activation


@pytest.mark.parametrize("argv, message", [
    (["pretest", "depth", "--depths", "0,2"], r"outside 1\.\.6"),
    (["pretest", "ranks", "--positions", "top"], "unknown layer position"),
    (["pretest", "position", "--engine", "flower"], "local engine"),
    (["pretest", "depth", "--depths", "1,x"], "comma-separated integers"),
    (["pretest", "ranks", "--measure-only"], "depth pre-test's"),
])
def test_cli_refuses_bad_requests_in_one_line(argv, message, capsys, tmp_path):
    assert main(argv + ["--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_cli_refuses_an_unknown_kind(capsys):
    with pytest.raises(SystemExit) as err:
        main(["pretest", "width"])
    assert err.value.code == 2 and "invalid choice" in capsys.readouterr().err


TINY_TOML = """
[data]
eval_subset = 16
[train]
local_steps = 1
batch_size = 4
[run]
eval_every = 1
"""


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_position_pretest_end_to_end(tmp_path):
    (tmp_path / "tiny.toml").write_text(TINY_TOML)
    out = tmp_path / "out"
    assert main(["pretest", "position", "--config", str(tmp_path / "tiny.toml"), "--devices", "2", "--rounds", "1",
                 "--out", str(out), "--quiet"]) == 0
    with open(out / "position.csv") as f:
        assert next(csv.reader(f)) == POSITION_FIELDS
    rows = _rows(out / "position.csv")
    assert [r["variant"] for r in rows] == ["all", "shallow", "middle", "deep"]
    assert rows[3]["layers"] == "4 5" and rows[0]["ranks"] == "8 8 8 8 8 8"
    # the deep third's backward stops 4 layers above the shallow third's: its rounds are shorter
    assert float(rows[3]["mean_round_time_s"]) < float(rows[1]["mean_round_time_s"])
    assert (out / "position.png").stat().st_size > 0 and (out / "position.md").exists()
    assert (out / "position" / "deep-seed0" / "records.jsonl").exists()
    # --resume reads the finished layouts back
    assert main(["pretest", "position", "--config", str(tmp_path / "tiny.toml"), "--devices", "2", "--rounds", "1",
                 "--out", str(out), "--quiet", "--resume"]) == 0
    assert _rows(out / "position.csv") == rows


@pytest.mark.slow
def test_depth_and_ranks_pretests_end_to_end(tmp_path):
    (tmp_path / "tiny.toml").write_text(TINY_TOML)
    out = tmp_path / "out"
    common = ["--config", str(tmp_path / "tiny.toml"), "--devices", "2", "--rounds", "1", "--out", str(out), "--quiet"]
    assert main(["pretest", "depth", "--depths", "1,6", "--measure-steps", "1"] + common) == 0
    with open(out / "depth.csv") as f:
        assert next(csv.reader(f)) == DEPTH_FIELDS
    rows = _rows(out / "depth.csv")
    assert [r["depth"] for r in rows] == ["1", "6"] and rows[0]["measured_on"] == "cpu"
    assert all(float(r["cpu_ms_per_batch"]) > 0 and float(r["peak_mb"]) > 0 for r in rows)
    assert float(rows[1]["peak_mb"]) > float(rows[0]["peak_mb"])   # six layers keep more for backward than one
    assert (out / "depth.png").exists() and "+107 MB" in (out / "depth.md").read_text()
    assert main(["pretest", "ranks", "--budget", "12", "--positions", "deep", "--sweep-ranks", "1,2"] + common) == 0
    with open(out / "ranks.csv") as f:
        assert next(csv.reader(f)) == RANKS_FIELDS
    rows = _rows(out / "ranks.csv")
    assert [r["variant"] for r in rows] == list(DISTRIBUTIONS) + ["deep-r1", "deep-r2"]
    assert all(sum(map(int, r["ranks"].split())) == 12 for r in rows[:4])
    assert rows[4]["gain_vs_lowest_rank"] == "0.0" and (out / "ranks.png").exists()


@pytest.mark.slow
def test_depth_measure_only_measures_without_federated_runs(tmp_path):
    (tmp_path / "tiny.toml").write_text(TINY_TOML)
    out = tmp_path / "out"
    assert main(["pretest", "depth", "--measure-only", "--depths", "1,3,6", "--measure-steps", "1", "--config",
                 str(tmp_path / "tiny.toml"), "--out", str(out), "--quiet"]) == 0
    rows = _rows(out / "depth.csv")
    assert [r["depth"] for r in rows] == ["1", "3", "6"]
    assert all(r["final_accuracy"] == "" and r["mean_round_time_s"] == "" for r in rows)   # no federated run
    assert all(float(r["cpu_ms_per_batch"]) > 0 for r in rows)
    assert float(rows[2]["peak_mb"]) > float(rows[0]["peak_mb"])
    assert not any((out / "depth").glob("depth*-seed0"))   # no run folders
    assert (out / "depth" / "measure.json").exists() and (out / "depth.png").stat().st_size > 0
    assert "| 6 | 0-5 | - | - |" in (out / "depth.md").read_text()
