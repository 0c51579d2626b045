"""A run stopped after any round and resumed from its checkpoint ends exactly as the uninterrupted run."""

import json

import pytest
from safetensors.torch import load_file

from fedlegend import rundir as runner


@pytest.fixture(scope="session")
def cfg_for(tiny_cfg):
    """The tiny run for `method`, 3 rounds evaluated every 2 (a stop after round 1 splits an
    evaluation period, and FedAdapter's 2-round search period)."""
    def make(method: str, **over):
        return tiny_cfg(**{"method.name": method, "run.rounds": 3, "data.eval_subset": 32, "run.eval_every": 2,
                           "method.fedadapter.trial_rounds": 2, **over})
    return make


class Stop(Exception):
    pass


def stop_after(monkeypatch, round_: int):
    """Make the runner die right after writing the checkpoint of `round_` (as a killed process would)."""
    real = runner.save_checkpoint

    def save_then_stop(path, cfg, snap, wall_clock_s):
        real(path, cfg, snap, wall_clock_s)
        if snap.round == round_:
            raise Stop

    monkeypatch.setattr(runner, "save_checkpoint", save_then_stop)


def outputs(d):
    adapter = {k: v for f in sorted((d / "adapter").glob("*.safetensors")) for k, v in load_file(f).items()}
    summary = json.loads((d / "summary.json").read_text())
    for volatile in ("wall_clock_s", "peak_rss_mb"):
        summary.pop(volatile)
    return (d / "records.jsonl").read_text(), adapter, summary


# methods that carry state between rounds: estimates (legend), rank pruning (hetlora), a search
# period with per-group models (fedadapter, stopped mid-period), a seeded restart counter (flora),
# group clocks and ticks (hierfedlora)
@pytest.mark.slow   # two real 3-round runs per method: 7-9 s each on 2 cores
@pytest.mark.parametrize("method", ["legend", "hetlora", "fedadapter", "flora", "hierfedlora"])
def test_resumed_run_equals_uninterrupted(method, tmp_path, monkeypatch, cfg_for):
    cfg = cfg_for(method)
    runner.run_experiment(cfg, tmp_path / "whole", progress=False)
    assert not (tmp_path / "whole" / runner.CHECKPOINT).exists()       # removed once the run ends

    stop_after(monkeypatch, 1)
    with pytest.raises(Stop):
        runner.run_experiment(cfg, tmp_path / "cut", progress=False)
    assert (tmp_path / "cut" / runner.CHECKPOINT).exists()
    assert len((tmp_path / "cut" / "records.jsonl").read_text().splitlines()) == 1
    monkeypatch.undo()

    runner.run_experiment(cfg, tmp_path / "cut", progress=False, resume=True)
    whole, cut = outputs(tmp_path / "whole"), outputs(tmp_path / "cut")
    assert cut[0] == whole[0]                                           # every record, byte for byte
    assert cut[1].keys() == whole[1].keys()
    assert all((cut[1][k] == whole[1][k]).all() for k in whole[1])      # the same final adapter
    assert cut[2] == whole[2]
    assert not (tmp_path / "cut" / runner.CHECKPOINT).exists()


def test_checkpoint_of_another_config_is_not_continued(tmp_path, monkeypatch, capsys, cfg_for):
    cfg = cfg_for("legend", **{"run.rounds": 2})
    stop_after(monkeypatch, 1)
    with pytest.raises(Stop):
        runner.run_experiment(cfg, tmp_path, progress=False)
    monkeypatch.undo()
    other = cfg.model_copy(deep=True)
    other.train.lr = cfg.train.lr / 2
    assert runner.load_checkpoint(tmp_path / runner.CHECKPOINT, other) is None
    assert runner.load_checkpoint(tmp_path / runner.CHECKPOINT, cfg) is not None
    runner.run_experiment(other, tmp_path, progress=False, resume=True)
    assert "another config; starting afresh" in capsys.readouterr().err
    records = [json.loads(l) for l in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2] and records[0]["lr"] == pytest.approx(other.train.lr)


def test_without_resume_a_checkpoint_is_ignored(tmp_path, monkeypatch, cfg_for):
    cfg = cfg_for("fedlora", **{"run.rounds": 2})
    stop_after(monkeypatch, 1)
    with pytest.raises(Stop):
        runner.run_experiment(cfg, tmp_path / "a", progress=False)
    monkeypatch.undo()
    calls = []
    real = runner.load_checkpoint
    monkeypatch.setattr(runner, "load_checkpoint", lambda *a: calls.append(a) or real(*a))
    runner.run_experiment(cfg, tmp_path / "a", progress=False)          # a fresh run from round 1
    assert calls == []
    assert len((tmp_path / "a" / "records.jsonl").read_text().splitlines()) == 2


def test_bad_checkpoint_stops_resume_unless_asked_to_start_afresh(tmp_path, monkeypatch, capsys, cfg_for):
    """A truncated tensor file: --resume stops with one line naming the file and the flag; with
    fresh_on_bad_checkpoint the run starts from round 1 and says why."""
    from fedlegend.checkpoint import CheckpointError

    cfg = cfg_for("legend", **{"run.rounds": 2})
    stop_after(monkeypatch, 1)
    with pytest.raises(Stop):
        runner.run_experiment(cfg, tmp_path, progress=False)
    monkeypatch.undo()
    tensors = next((tmp_path / runner.CHECKPOINT).glob("tensors-*.safetensors"))
    tensors.write_bytes(tensors.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"truncated or altered\); delete .* --fresh-on-bad-checkpoint") as err:
        runner.run_experiment(cfg, tmp_path, progress=False, resume=True)
    assert str(tensors) in str(err.value) and "\n" not in str(err.value)
    runner.run_experiment(cfg, tmp_path, progress=False, resume=True, fresh_on_bad_checkpoint=True)
    assert "(truncated or altered); starting afresh (--fresh-on-bad-checkpoint)" in capsys.readouterr().err
    assert [json.loads(l)["round"] for l in (tmp_path / "records.jsonl").read_text().splitlines()] == [1, 2]
    assert not (tmp_path / runner.CHECKPOINT).exists()


def test_cli_bad_checkpoint_one_line(tmp_path, capsys):
    """`fedlegend run --resume` on a folder whose checkpoint manifest is cut short: one error line, exit 2."""
    from fedlegend.cli import main

    (tmp_path / runner.CHECKPOINT).mkdir()
    (tmp_path / runner.CHECKPOINT / "checkpoint.json").write_text('{"kind": "fedlegend-checkpoint", "ver')
    assert main(["run", "--out", str(tmp_path), "--resume", "--quiet", "--rounds", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("fedlegend: error: ") and "checkpoint.json: not a readable checkpoint manifest" in err
    assert err.endswith(f"delete {tmp_path / runner.CHECKPOINT} to start the run afresh (or add "
                        "--fresh-on-bad-checkpoint to fedlegend run / compare --resume)")


def test_compare_resume_starts_a_run_with_a_bad_checkpoint_afresh_when_asked(tmp_path, monkeypatch, capsys, cfg_for):
    """`compare --resume`: a run whose checkpoint manifest is cut short stops the compare with the checkpoint's
    error; with --fresh-on-bad-checkpoint (the CLI passes it through) that run starts from round 1."""
    from fedlegend import cli, compare
    from fedlegend.checkpoint import CheckpointError

    cfg = cfg_for("fedlora", **{"run.rounds": 2})
    stop_after(monkeypatch, 1)
    with pytest.raises(Stop):
        compare.run_compare(cfg, ["fedlora"], [0], tmp_path, progress=False)
    monkeypatch.undo()
    ckpt = tmp_path / "fedlora-seed0" / runner.CHECKPOINT
    (ckpt / "checkpoint.json").write_text('{"kind": "fedlegend-checkpoint", "ver')
    with pytest.raises(CheckpointError, match="--fresh-on-bad-checkpoint"):
        compare.run_compare(cfg, ["fedlora"], [0], tmp_path, progress=False, resume=True)
    rows = compare.run_compare(cfg, ["fedlora"], [0], tmp_path, progress=False, resume=True,
                               fresh_on_bad_checkpoint=True)
    assert "starting afresh (--fresh-on-bad-checkpoint)" in capsys.readouterr().err and len(rows) == 1
    records = (tmp_path / "fedlora-seed0" / "records.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in records] == [1, 2] and not ckpt.exists()
    seen = []
    monkeypatch.setattr(compare, "run_compare", lambda *args, **kw: seen.append(kw))
    assert cli.main(["compare", "--out", str(tmp_path), "--resume", "--fresh-on-bad-checkpoint", "--quiet"]) == 0
    assert seen and seen[0]["resume"] and seen[0]["fresh_on_bad_checkpoint"]
