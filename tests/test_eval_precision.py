"""run.eval_precision: evaluation's own precision (training keeps run.precision). Fast: no model."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest

from fedlegend.config import ConfigError, build_config
from fedlegend.engine import local
from fedlegend.tasks import Score


def test_default_is_run_precision():
    cfg = build_config({}, {})
    assert cfg.run.eval_precision is None
    assert build_config({}, {"run.eval_precision": "bf16"}).run.eval_precision == "bf16"
    with pytest.raises((ConfigError, ValueError)):
        build_config({}, {"run.eval_precision": "fp16"})


@pytest.mark.parametrize("precision, eval_precision, used", [
    ("fp32", None, "fp32"), ("bf16", None, "bf16"), ("fp32", "bf16", "bf16"), ("bf16", "fp32", "fp32")])
def test_record_round_scores_at_eval_precision(monkeypatch, precision, eval_precision, used):
    seen = {}

    def fake_evaluate(host, task, state, data, batch_size, pad_id, precision="fp32"):
        seen["precision"] = precision
        return Score(0.5, 0.7)

    monkeypatch.setattr(local, "evaluate", fake_evaluate)
    cfg = build_config({}, {"run.precision": precision, "run.eval_precision": eval_precision, "run.rounds": 2,
                            "run.eval_every": 1})
    exp = SimpleNamespace(cfg=cfg, host=None, task=None, test=None, pad_id=0)
    rec = local.record_round(exp, 1, 0.0, {}, local.RoundOutcome({}, {"round": 1}))
    assert seen["precision"] == used and rec["accuracy"] == 0.5


def test_cli_flag():
    from fedlegend.cli import _add_common, _overrides

    p = argparse.ArgumentParser()
    _add_common(p)
    assert _overrides(p.parse_args(["--eval-precision", "bf16"]))["run.eval_precision"] == "bf16"
    assert _overrides(p.parse_args([]))["run.eval_precision"] is None
