"""Execution device and precision plumbing (run.device, run.precision), tested on a CPU machine.

CI has no GPU: these tests cover what can fail without one (device names, the errors a machine
without CUDA gives, CPU canonical states, CPU records unchanged by the plumbing); the GPU figures
come from bench/gpu.py on a GPU machine."""

import json

import pytest
import torch

from fedlegend.cli import main
from fedlegend.config import ConfigError, build_config
from fedlegend.errors import UserError
from fedlegend.execution import (ExecutionError, autocast, check_precision, model_device, resolve_device, to_cpu,
                                 to_device)

NO_CUDA = not torch.cuda.is_available()


@pytest.mark.parametrize("name, available, count, want", [
    ("auto", False, 0, "cpu"), ("auto", True, 2, "cuda:0"), ("cpu", True, 2, "cpu"),
    ("cuda", True, 1, "cuda:0"), ("cuda:1", True, 2, "cuda:1"),
])
def test_resolve_device(name, available, count, want):
    assert resolve_device(name, cuda_available=available, cuda_count=count) == torch.device(want)


def test_cuda_without_a_gpu_is_a_clear_user_error():
    with pytest.raises(ExecutionError, match=r"'cuda:7'.*no usable CUDA GPU.*--device cpu") as err:
        resolve_device("cuda:7", cuda_available=False)
    assert isinstance(err.value, UserError)


def test_cuda_index_beyond_the_visible_gpus():
    with pytest.raises(ExecutionError, match=r"only 2 CUDA GPU\(s\).*cuda:0..cuda:1"):
        resolve_device("cuda:7", cuda_available=True, cuda_count=2)


@pytest.mark.parametrize("bad", ["gpu", "cuda:", "cuda:x", "CPU", "mps"])
def test_bad_device_names_fail_in_the_config(bad):
    with pytest.raises(ConfigError, match=r"run.device: use 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        build_config({}, {"run.device": bad})
    with pytest.raises(ExecutionError):
        resolve_device(bad)


def test_precision_names():
    assert check_precision("fp32", torch.device("cpu")) == "fp32"
    assert check_precision("bf16", torch.device("cpu")) == "bf16"   # CPU autocast: allowed (execution.py says why)
    with pytest.raises(ExecutionError, match="run.precision"):
        check_precision("fp16", torch.device("cpu"))
    with pytest.raises(ConfigError, match="run.precision"):
        build_config({}, {"run.precision": "fp16"})


def test_autocast_is_off_at_fp32_and_bf16_under_bf16():
    lin = torch.nn.Linear(4, 4)
    with autocast(torch.device("cpu"), "fp32"):
        assert lin(torch.ones(2, 4)).dtype == torch.float32
    with autocast(torch.device("cpu"), "bf16"):
        assert lin(torch.ones(2, 4)).dtype == torch.bfloat16
    assert lin.weight.dtype == torch.float32   # weights stay fp32


def test_batches_on_their_device_are_not_copied():
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "n": 3}
    moved = to_device(batch, torch.device("cpu"))
    assert moved["input_ids"] is batch["input_ids"] and moved["n"] == 3
    assert model_device(torch.nn.Linear(2, 2)) == torch.device("cpu")


def test_canonical_state_is_a_detached_cpu_copy():
    p = torch.nn.Parameter(torch.ones(3))
    state = to_cpu({"w": p})
    assert state["w"].device.type == "cpu" and not state["w"].requires_grad
    state["w"].add_(1.0)
    assert torch.equal(p.detach(), torch.ones(3))  # a copy, not a view of the parameter


@pytest.mark.skipif(not NO_CUDA, reason="the machine has a GPU")
def test_cli_device_without_cuda_prints_one_error_line(capsys, tmp_path):
    rc = main(["run", "--device", "cuda:7", "--rounds", "1", "--out", str(tmp_path / "x"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "cuda:7" in err and "--device cpu" in err and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.skipif(not NO_CUDA, reason="auto means CUDA on a GPU machine")
def test_cpu_and_auto_give_identical_records_and_cpu_host(tmp_path, tiny_cfg):
    from fedlegend.experiment import build_experiment
    from fedlegend.rundir import run_experiment

    runs = {}
    for device in ("cpu", "auto"):
        run_experiment(tiny_cfg(**{"run.device": device}), tmp_path / device, progress=False)
        runs[device] = [json.loads(l) for l in (tmp_path / device / "records.jsonl").read_text().splitlines()]
    assert runs["cpu"] == runs["auto"]
    exp = build_experiment(tiny_cfg(**{"run.device": "auto"}))
    assert model_device(exp.host.model).type == "cpu"
    assert all(t.device.type == "cpu" for t in exp.initial_state.values())


@pytest.mark.slow
def test_bf16_trains_and_evaluates_through_the_same_path(tmp_path, tiny_cfg):
    """bf16 autocast (here on the CPU, the GPU's code path): the run completes with finite losses, its
    numbers differ from fp32's, its canonical state and export stay fp32 CPU tensors."""
    from safetensors.torch import load_file

    from fedlegend.rundir import run_experiment

    recs = {}
    for p in ("fp32", "bf16"):
        run_experiment(tiny_cfg(**{"run.device": "cpu", "run.precision": p}), tmp_path / p, progress=False)
        recs[p] = [json.loads(l) for l in (tmp_path / p / "records.jsonl").read_text().splitlines()]
    assert all(r["train_loss"] == r["train_loss"] and r["loss"] == r["loss"] for r in recs["bf16"])  # not NaN
    assert [r["train_loss"] for r in recs["bf16"]] != [r["train_loss"] for r in recs["fp32"]]
    assert abs(recs["bf16"][-1]["train_loss"] - recs["fp32"][-1]["train_loss"]) < 0.1
    tensors = load_file(str(tmp_path / "bf16" / "adapter" / "adapter_model.safetensors"))
    assert tensors and all(t.dtype == torch.float32 for t in tensors.values())


@pytest.mark.skipif(not NO_CUDA, reason="the machine has a GPU")
def test_flower_node_without_the_configured_gpu_replies_a_failure(monkeypatch, tiny_cfg):
    """A SuperNode asked to train on cuda:7 without a GPU answers with a failure naming why (no crash)."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

    from fedlegend.config import dump_config
    from fedlegend.engine.flower import client as fl_client
    from fedlegend.engine.flower import wire
    from fedlegend.engine.flower.flwr_compat import TaskIdentity

    for k, v in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, k, v)
    monkeypatch.setattr(fl_client, "_DEVICE_SIDE", fl_client._DeviceSide())
    toml = dump_config(tiny_cfg(**{"run.device": "cuda:7"}))
    content = RecordDict({"plan": ConfigRecord({wire.DEVICE_ID_KEY: 1, "round": 1, "layers": [5], "ranks": [4],
                                                "lr": 0.1, "steps": 1, "config": toml,
                                                "config-hash": wire.config_hash(toml)}),
                          "payload": ArrayRecord()})
    ctx = Context(run_id=1, node_id=5, node_config={"partition-id": 1}, state=RecordDict(), run_config={})
    reply = fl_client.handle_train(Message(content, dst_node_id=5, message_type=MessageType.TRAIN), ctx)
    r = reply.content["reply"]
    assert r["status"] == "failed" and "cuda:7" in r["detail"] and "--device cpu" in r["detail"]
