"""End to end on the real default model and data, kept tiny: 2 devices, 2 rounds, a small test slice."""

import json

import numpy as np
import pytest
import torch

from fedlegend.client import LocalTrainingError, evaluate, train_local
from fedlegend.engine.local import run_local
from fedlegend.experiment import build_experiment
from fedlegend.methods.base import Estimator, RoundView, UpdateRejected, check_update
from fedlegend.rundir import run_experiment
from fedlegend.tasks import Score


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_cfg):

    out = tmp_path_factory.mktemp("run")
    summary = run_experiment(tiny_cfg(), out, progress=False)
    return out, summary


def test_outputs_written(run_dir):
    out, summary = run_dir
    for f in ("records.jsonl", "config.toml", "summary.json", "accuracy_traffic.png", "partitions.json",
              "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert (out / f).exists(), f
    recs = [json.loads(l) for l in (out / "records.jsonl").read_text().splitlines()]
    assert [r["round"] for r in recs] == [1, 2]
    assert all(r["virtual_time_s"] > 0 and r["bytes_up"] > 0 for r in recs)
    assert recs[1]["virtual_time_s"] > recs[0]["virtual_time_s"]
    dev = recs[1]["devices"][0]
    assert {"id", "depth", "ranks", "time_s", "waiting_s"} <= set(dev)
    for key in ("method", "final_accuracy", "best_accuracy", "target_accuracy", "time_to_target_s",
                "bytes_to_target", "bytes_total", "mean_waiting_s", "virtual_time_s", "wall_clock_s", "peak_rss_mb"):
        assert key in summary
    assert json.loads((out / "summary.json").read_text())["final_accuracy"] == summary["final_accuracy"]


def test_adapter_reloads_with_peft_and_reproduces_accuracy(run_dir, tiny_cfg):
    from peft import PeftModel
    from fedlegend.assets import resolve_model
    from fedlegend.data import eval_batches
    from fedlegend.models import load_base_model

    out, summary = run_dir
    asset = resolve_model("minilm-l6")
    base = load_base_model(asset.path, num_labels=2)
    model = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    exp_test = build_experiment(tiny_cfg()).test     # the same 48-example slice
    correct = 0
    with torch.no_grad():
        for batch in eval_batches(exp_test, 16, 0):
            correct += int((model(**batch).logits.argmax(-1) == batch["labels"]).sum())
    assert correct / len(exp_test) == pytest.approx(summary["final_accuracy"])


def test_same_seed_same_records(run_dir, tmp_path, tiny_cfg):
    out, _ = run_dir
    run_experiment(tiny_cfg(), tmp_path, progress=False)
    strip = lambda p: [{k: v for k, v in json.loads(l).items()} for l in p.read_text().splitlines()]
    assert strip(tmp_path / "records.jsonl") == strip(out / "records.jsonl")


@pytest.fixture(scope="module")
def exp(tiny_cfg):
    return build_experiment(tiny_cfg())


def test_bad_update_rejected_global_unchanged(exp, monkeypatch, run_round):
    """A device update with NaN, or with a wrong shape, is rejected and recorded; the others aggregate."""
    import fedlegend.engine.local as local

    real = local.train_local
    calls = {"n": 0}

    def poisoned(*a, **k):
        res = real(*a, **k)
        calls["n"] += 1
        key = sorted(res.state)[0]
        if calls["n"] == 1:
            res.state[key] = torch.full_like(res.state[key], float("nan"))
        elif calls["n"] == 2:
            res.state[key] = torch.zeros(3, 3)
        return res

    monkeypatch.setattr(local, "train_local", poisoned)
    g = exp.initial_state
    out = run_round(exp, 1, g, Estimator())
    kinds = [e["kind"] for e in out.record["events"]]
    assert kinds == ["rejected", "rejected"]
    assert "NaN" in out.record["events"][0]["detail"] and "shape" in out.record["events"][1]["detail"]
    assert len(out.record["devices"]) == 1
    assert all(torch.isfinite(v).all() for v in out.state.values())


def test_all_updates_bad_keeps_global_adapter(exp, monkeypatch, run_round):
    import fedlegend.engine.local as local

    def nan_loss(*a, **k):
        raise LocalTrainingError("loss became nan at step 1")

    monkeypatch.setattr(local, "train_local", nan_loss)
    g = exp.initial_state
    out = run_round(exp, 1, g, Estimator())
    assert all(torch.equal(out.state[k], g[k]) for k in g)
    assert {e["kind"] for e in out.record["events"]} == {"rejected"}
    assert out.record["devices"] == []


def test_check_update():
    sent = {"a": torch.zeros(2, 2)}
    check_update({"a": torch.ones(2, 2)}, sent)
    with pytest.raises(UpdateRejected, match="Inf"):
        check_update({"a": torch.tensor([[1.0, float("inf")], [0, 0]])}, sent)
    with pytest.raises(UpdateRejected, match="keys differ"):
        check_update({"b": torch.ones(2, 2)}, sent)


def test_nan_loss_raises(exp):
    a = exp.method.configure(RoundView(1, [0]), exp.initial_state)[0]
    bad = {k: torch.full_like(v, float("nan")) if k.startswith("head") else v for k, v in a.payload.items()}
    with pytest.raises(LocalTrainingError, match="loss became nan"):
        train_local(exp.host, exp.task, a.plan, bad, exp.device_data(0), steps=1, batch_size=4, lr=1e-3,
                    rng=np.random.default_rng(0), pad_id=exp.pad_id)


@pytest.mark.parametrize("name", ["fedlora", "hetlora", "flexlora", "hlora", "fedra", "ffa-lora", "flora", "fedex-lora", "hierfedlora",
                                  "legend-wo-ld", "legend-wo-rd"])
def test_every_method_runs_two_rounds(name, tiny_cfg):
    exp = build_experiment(tiny_cfg(**{"method.name": name, "fleet.devices": 2}))
    _, records = run_local(exp, progress=False)
    assert len(records) == 2 and records[-1]["accuracy"] is not None
    assert all(not r["events"] for r in records)             # no update rejected
    assert all(d["samples"] > 0 for r in records for d in r["devices"])


def test_ffa_lora_trains_only_b_and_uploads_less(tiny_cfg, run_round):
    exp = build_experiment(tiny_cfg(**{"method.name": "ffa-lora", "fleet.devices": 2}))
    g = exp.initial_state
    out = run_round(exp, 1, g, Estimator())
    a_keys = [k for k in g if k.endswith("lora_A")]
    assert a_keys and all(torch.equal(out.state[k], g[k]) for k in a_keys)           # A frozen
    assert any(not torch.equal(out.state[k], g[k]) for k in g if k.endswith("lora_B"))
    assert out.record["bytes_up"] < out.record["bytes_down"]                            # B + head only


@pytest.mark.parametrize("name", ["flora", "fedex-lora"])
def test_residual_methods_fold_updates_into_the_weights(name, tmp_path, tiny_cfg, run_round):
    """After a round the residual is non-zero, the evaluated model uses it, and it is saved beside the adapter."""
    from safetensors.torch import load_file

    exp = build_experiment(tiny_cfg(**{"method.name": name, "fleet.devices": 2}))
    g = exp.initial_state
    res_keys = [k for k in g if k.endswith(".residual")]
    assert res_keys and all(torch.count_nonzero(g[k]) == 0 for k in res_keys)
    out = run_round(exp, 1, g, Estimator())
    assert all(torch.count_nonzero(out.state[k]) > 0 for k in res_keys)
    assert out.record["bytes_up"] > 0 and not out.record["events"]
    with_res = evaluate(exp.host, exp.task, out.state, exp.test, 16, exp.pad_id)
    without = evaluate(exp.host, exp.task, {k: v for k, v in out.state.items() if k not in res_keys}, exp.test, 16,
                       exp.pad_id)
    assert isinstance(with_res, Score)
    with_res, without = with_res.loss, without.loss
    assert with_res != without                                  # the loss sees the folded update
    if name == "flora":        # on the wire: the stacked factors, not the dense merged weights
        from fedlegend.engine.local import plan_round
        from fedlegend.spec import state_bytes
        rp = plan_round(exp, 2, out.state, Estimator())
        lora_head = lambda a: state_bytes({k: v for k, v in a.payload.items() if k not in res_keys})
        assert all(lora_head(a) < a.download_bytes < state_bytes(a.payload) for a in rp.assignments.values())
    if name == "fedex-lora":   # the dense residual is on the wire every round: more than the LoRA alone
        lora = sum(v.numel() * v.element_size() for k, v in g.items() if "lora_" in k)
        assert out.record["bytes_down"] > 2 * lora
    run_experiment(tiny_cfg(**{"method.name": name, "fleet.devices": 2, "run.rounds": 1}), tmp_path, progress=False)
    saved = load_file(str(tmp_path / "adapter" / "residual.safetensors"))
    assert len(saved) == len(res_keys) and all(k.endswith(".weight") for k in saved)
