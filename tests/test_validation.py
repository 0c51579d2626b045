"""Update validation, fuzzed (issue 14, item 3).

1. Every registered method on a tiny host (a 4-layer, 32-wide random BERT): one round's
   assignments from `method.configure`, each device's reply either valid (its trained tensors
   plus noise) or malformed by one random mutation (NaN/Inf, wrong shape, wrong rank, unknown,
   missing, unassigned-layer or frozen keys, wrong dtype, oversized, not a tensor), through the
   engine's own `finish_round` (check_update + method.aggregate). Every malformed update must be
   recorded as "rejected" with its reason, every valid one aggregated, and the new global adapter
   must be finite, with the global keys and shapes, and bit for bit the adapter of the same round
   with the malformed devices absent.
2. The Flower wire: valid TRAIN / reply RecordDicts mutated at random (records removed or of the
   wrong kind, values of random types, absurd numbers, corrupted or foreign arrays) and wholly
   random RecordDicts through `content_to_assignment` / `content_to_result`: each either decodes
   to sane values or raises MalformedMessage (a ValueError); nothing else ever comes out.

The counts of what the fuzz tried are printed by test_zz_fuzz_counts (`pytest -s`). A run on
2026-12 (2-core CPU, about 10 s): see the numbers in that test's output; every malformed update
was rejected and no global adapter changed because of one.
"""

from __future__ import annotations

import io
import math
import pickle
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlegend.client import LocalResult
from fedlegend.config import Config, dump_config
from fedlegend.devices import RoundTime
from fedlegend.engine.local import DeviceFailure, DeviceResult, Dispatch, RoundPlan, finish_round
from fedlegend.hosts import build_host
from fedlegend.methods import METHODS, make_method
from fedlegend.methods.aggregation import with_zero_residuals
from fedlegend.methods.base import (Assignment, Estimator, LoraPlan, RoundView, Skip, StatusReport, UpdateRejected,
                                    check_update, rank_axis, trained_part)
from fedlegend.spec import inspect_model, key_layer

COUNTS: Counter = Counter()
N_DEVICES = 4
FUZZ = settings(max_examples=20, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])


# ---------------------------------------------------------------- a tiny host per method, built once
def _tiny_model():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2)
    return BertForSequenceClassification(cfg)


_SETUPS: dict[str, SimpleNamespace] = {}


def setup_of(name: str, method_ctx) -> SimpleNamespace:
    """The method after configuring round 1 on a tiny host: its state (to restore before each
    example), the global adapter and the round's plan."""
    if name in _SETUPS:
        return _SETUPS[name]
    model = _tiny_model()
    spec = inspect_model(model, ("query", "value"))
    cfg = Config()
    ctx = method_ctx(n=N_DEVICES, spec=spec, steps=1, label_counts=[(5, 3), (2, 6), (4, 4), (7, 1)])
    method = make_method(name, ctx, cfg.method.model_dump())
    host = build_host(method.info.host, model, spec, method.global_ranks())
    state = host.read(host.GLOBAL)
    if method.info.residual:
        state = with_zero_residuals(state)
    configured = method.configure(RoundView(1, list(range(N_DEVICES))), state)
    assignments = {d: Dispatch(1, a, 1, 1e-3) for d, a in configured.items() if isinstance(a, Assignment)}
    skipped = {d: a.reason for d, a in configured.items() if isinstance(a, Skip)}
    assert assignments, f"{name}: no device assigned in round 1"
    rp = RoundPlan(1, 1e-3, list(range(N_DEVICES)), assignments, skipped)
    s = SimpleNamespace(name=name, method=method, method_state=method.state_dict(), state=state, rp=rp,
                        exp=SimpleNamespace(cfg=cfg, method=method, fleet=SimpleNamespace(cache=None)),
                        L=spec.num_layers)
    _SETUPS[name] = s
    return s


def reply(dev: int, state: dict, plan: LoraPlan) -> DeviceResult:
    rt = RoundTime(1.0, 2.0, 3.0, 1.0 + dev)
    report = StatusReport(dev, 3.0, 3.0 / max(plan.depth, 1), 1.0 / max(sum(plan.ranks.values()), 1), 8)
    return DeviceResult(dev, LocalResult(state, 8 + dev, 0.5, [(4, 16, 1)]), rt, report)


# ---------------------------------------------------------------- malformed updates
MUTATIONS = ("nan", "inf", "shape", "rank", "unknown", "missing", "unassigned", "frozen", "dtype", "oversized",
             "not-a-tensor")


def valid_update(sent: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + 1e-3 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in sent.items()}


def mutate(kind: str, upd: dict, payload: dict, plan: LoraPlan, L: int, draw) -> dict:
    """`upd` (a valid update) made malformed by one mutation of `kind`."""
    upd = dict(upd)
    keys = sorted(upd)
    k = draw(st.sampled_from(keys))
    t = upd[k]
    if kind in ("nan", "inf"):
        t = t.clone().reshape(-1)
        t[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from(
            [float("nan")] if kind == "nan" else [float("inf"), float("-inf")]))
        upd[k] = t.reshape(upd[k].shape)
    elif kind == "shape":
        how = draw(st.sampled_from(["grow", "shrink", "flat", "extra-dim", "transpose"]))
        if how == "grow":
            upd[k] = torch.cat([t, t[:1]]) if t.dim() else t.reshape(1)
        elif how == "shrink" and t.shape[0] > 1:
            upd[k] = t[1:]
        elif how == "transpose" and t.dim() == 2 and t.shape[0] != t.shape[1]:
            upd[k] = t.t().contiguous()
        elif how == "flat" and t.dim() > 1:
            upd[k] = t.reshape(-1)
        else:
            upd[k] = t.unsqueeze(0)
    elif kind == "rank":
        ranked = [x for x in keys if rank_axis(x) is not None and key_layer(x) is not None]
        if not ranked:
            upd.pop(k)
            return upd
        layer = key_layer(draw(st.sampled_from(ranked)))
        r = plan.ranks[layer] + draw(st.sampled_from([-1, 1, 2, 7]))
        r = r if r > 0 else plan.ranks[layer] + 1
        for x in ranked:          # every rank tensor of the layer, consistently at the wrong rank
            if key_layer(x) == layer:
                axis, v = rank_axis(x), upd[x]
                shape = list(v.shape)
                shape[axis] = r
                upd[x] = torch.zeros(shape, dtype=v.dtype)
    elif kind == "unknown":
        extra = draw(st.sampled_from(["bogus", "head.extra", "layers.x.q.lora_A", f"{k}.copy",
                                      "layers.0.attention.self.key.lora_B"]))
        upd[extra] = torch.zeros(2, 2)
    elif kind == "missing":
        upd.pop(k)
    elif kind == "unassigned":
        outside = [l for l in range(L + 3) if l not in plan.ranks]
        l = draw(st.sampled_from(outside))
        upd[f"layers.{l}.attention.self.query.lora_A"] = torch.zeros(2, 32)
    elif kind == "frozen":
        frozen = sorted(set(payload) - set(trained_part(payload, plan)))
        if frozen:
            x = draw(st.sampled_from(frozen))
            upd[x] = payload[x].clone()
        else:  # nothing frozen in this plan: a LoRA/adapter tensor kind the plan does not train is unknown
            upd[k.rsplit(".", 1)[0] + ".residual"] = torch.zeros(2, 2)
    elif kind == "dtype":
        upd[k] = t.to(draw(st.sampled_from([torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.bool])))
    elif kind == "oversized":
        if draw(st.booleans()):
            upd[k] = torch.zeros((t.numel() + 1) * 64)
        else:
            upd["head.padding"] = torch.zeros(sum(v.numel() for v in upd.values()) + 1)
    elif kind == "not-a-tensor":
        upd[k] = draw(st.sampled_from([t.numpy(), t.tolist(), None, "tensor", t.to_sparse()]))
    return upd


@pytest.mark.parametrize("name", sorted(METHODS))
@FUZZ
@given(data=st.data())
def test_fuzz_updates_rejected_valid_aggregated(name, method_ctx, data):
    s = setup_of(name, method_ctx)
    devs = sorted(s.rp.assignments)
    malformed = set(data.draw(st.sets(st.sampled_from(devs), max_size=len(devs))))
    if len(devs) > 1 and len(malformed) == len(devs):
        malformed.discard(devs[0])   # at least one valid update whenever two devices train
    replies, kinds = {}, {}
    for d in devs:
        a = s.rp.assignments[d]
        upd = valid_update(trained_part(a.payload, a.plan), seed=data.draw(st.integers(0, 2**16)))
        if d in malformed:
            kinds[d] = data.draw(st.sampled_from(MUTATIONS))
            upd = mutate(kinds[d], upd, a.payload, a.plan, s.L, data.draw)
            COUNTS["updates-malformed"] += 1
            COUNTS[f"update:{kinds[d]}"] += 1
        else:
            COUNTS["updates-valid"] += 1
        replies[d] = reply(d, upd, a.plan)
    if data.draw(st.booleans()) and len(devs) > 2:   # a failed device in the same round changes nothing
        d = devs[-1]
        if d not in malformed:
            replies[d] = DeviceFailure(d, "rejected", "local training failed")
            malformed.add(d)
            kinds[d] = "failed"

    s.method.load_state_dict(s.method_state)
    out = finish_round(s.exp, s.rp, s.state, Estimator(), replies)
    events = {e["device"]: e for e in out.record["events"]}
    for d in malformed:
        assert d in events and events[d]["kind"] == "rejected" and events[d]["detail"], (name, kinds[d], events)
    assert sorted(r["id"] for r in out.record["devices"]) == sorted(set(devs) - malformed)
    new = out.state
    assert set(new) == set(s.state)
    for k, v in new.items():
        assert v.shape == s.state[k].shape and v.dtype == s.state[k].dtype, k
        assert torch.isfinite(v).all(), (name, k)
    # the malformed devices had no effect at all: the same round without them gives the same adapter
    s.method.load_state_dict(s.method_state)
    clean = finish_round(s.exp, s.rp, s.state, Estimator(), {d: r for d, r in replies.items() if d not in malformed})
    for k in new:
        assert torch.equal(new[k], clean.state[k]), (name, k)
    COUNTS["rounds"] += 1


def test_check_update_reasons():
    """Each kind of malformed update is rejected with its own reason."""
    plan = LoraPlan(0, {1: 2}, ("lora_A",))
    payload = {"layers.1.q.lora_A": torch.zeros(2, 4), "layers.1.q.lora_B": torch.zeros(4, 2),
               "head.weight": torch.zeros(2, 4)}
    sent = trained_part(payload, plan)
    ok = {k: v + 1 for k, v in sent.items()}
    check_update(ok, sent, plan)
    cases = {
        "NaN or Inf": {**ok, "head.weight": torch.full((2, 4), float("nan"))},
        "dtype": {**ok, "head.weight": torch.zeros(2, 4, dtype=torch.int32)},
        "rank 1 along axis 1, but its plan assigns layer 1 rank 2": {**ok, "layers.1.q.lora_B": torch.zeros(4, 1)},
        "shape": {**ok, "head.weight": torch.zeros(4, 2)},
        "freezes": {**ok, "layers.1.q.lora_A": torch.zeros(2, 4)},
        "does not assign": {**ok, "layers.0.q.lora_B": torch.zeros(1, 1)},
        "unexpected": {**ok, "bogus": torch.zeros(1)},
        "missing": {"head.weight": ok["head.weight"]},
        "oversized": {**ok, "head.weight": torch.zeros(2, 400)},
        "oversized: 96": {**ok, "head.weight": torch.zeros(2, 4, dtype=torch.float64)},
        "not a dense tensor": {**ok, "head.weight": [[0.0] * 4] * 2},
    }
    for reason, upd in cases.items():
        with pytest.raises(UpdateRejected, match=reason):
            check_update(upd, sent, plan)


# ---------------------------------------------------------------- the Flower wire
def _wire_samples():
    from fedlegend.engine.flower.wire import assignment_to_content, result_to_content

    plan = LoraPlan(2, {1: 2, 3: 4}, ("residual",))
    payload = {"layers.1.q.lora_A": torch.randn(2, 5), "layers.1.q.lora_B": torch.randn(5, 2),
               "layers.1.q.residual": torch.zeros(5, 5), "head.weight": torch.randn(2, 5)}
    toml = dump_config(Config())
    train = assignment_to_content(Dispatch(3, Assignment(plan, payload, 1234), 5, 2e-3), toml)
    res = DeviceResult(2, LocalResult(trained_part(payload, plan), 16, 0.7, [(8, 20, 1), (8, 31, 1)]),
                       RoundTime(0.5, 1.0, 2.0, 0.25), StatusReport(2, 1.5, 1.0, 0.05, 16))
    return train, result_to_content(res, 3), result_to_content(DeviceFailure(2, "rejected", "diverged"), 3)


def _bad_arrays():
    """Array objects that must not decode: foreign bytes, pickles, object / string / big-endian dtypes,
    declared shape or dtype not what the bytes hold, non-numpy serialisations."""
    from flwr.app import Array

    def npy(a):
        b = io.BytesIO()
        np.save(b, a, allow_pickle=True)
        return b.getvalue()

    good = npy(np.zeros((2, 3), np.float32))
    return [
        Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=b""),
        Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=b"junk" * 10),
        Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=good[:-5]),
        Array(dtype="float32", shape=(3, 2), stype="numpy.ndarray", data=good),
        Array(dtype="float64", shape=(2, 3), stype="numpy.ndarray", data=good),
        Array(dtype="float32", shape=(2, 3), stype="torch.Tensor", data=good),
        Array(dtype="object", shape=(2,), stype="numpy.ndarray", data=npy(np.array([None, {}], dtype=object))),
        Array(dtype="<U3", shape=(2,), stype="numpy.ndarray", data=npy(np.array(["abc", "de"]))),
        Array(dtype=">f4", shape=(2,), stype="numpy.ndarray", data=npy(np.zeros(2, ">f4"))),
        Array(dtype="float32", shape=(2,), stype="numpy.ndarray", data=pickle.dumps([1.0, 2.0])),
        Array(dtype="float32", shape=(2,), stype="numpy.ndarray", data=b"PK\x03\x04" + b"\x00" * 40),
    ]


def _value():
    scalars = st.one_of(st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
                        st.text(max_size=8), st.binary(max_size=8), st.booleans())
    absurd = st.sampled_from([-1, 0, 2**63, 2**80, -(2**40), 1e308, -1e308, float("nan"), float("inf"), 0.5, 1e-300])
    lists = st.one_of(st.lists(st.integers(-(2**40), 2**40), max_size=5), st.lists(st.floats(), max_size=5),
                      st.lists(st.text(max_size=3), max_size=5), st.lists(st.booleans(), max_size=3),
                      st.lists(st.binary(max_size=3), max_size=3))
    return st.one_of(scalars, absurd, lists)


def _metric_value():
    return st.one_of(st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
                     st.sampled_from([-1, 2**63, 1e308, float("nan"), float("-inf")]),
                     st.lists(st.integers(-5, 5), max_size=3), st.lists(st.floats(), max_size=3))


def _mutated(content, draw):
    """A copy of a RecordDict with 1-3 random mutations."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    records = {k: v for k, v in content.items()}
    for _ in range(draw(st.integers(1, 3))):
        what = draw(st.sampled_from(["drop-record", "swap-record", "config-value", "drop-key", "metric-value",
                                     "array", "extra-record"]))
        names = sorted(records)
        if what == "drop-record" and names:
            records.pop(draw(st.sampled_from(names)))
        elif what == "swap-record" and names:
            n = draw(st.sampled_from(names))
            records[n] = draw(st.sampled_from([ConfigRecord({"x": 1}), MetricRecord({"x": 1.0}),
                                               ArrayRecord({"x": torch.zeros(1)})]))
        elif what == "extra-record":
            records[draw(st.text(max_size=6))] = ConfigRecord({"x": draw(_value())})
        elif what in ("config-value", "drop-key"):
            cfgs = [n for n in names if isinstance(records[n], ConfigRecord)]
            if cfgs:
                n = draw(st.sampled_from(cfgs))
                rec = dict(records[n].items())
                key = draw(st.sampled_from(sorted(rec) + ["device-id", "round", "layers", "ranks", "frozen",
                                                          "batch-sizes", "batch-outputs", "download-bytes", "steps", "lr"]))
                if what == "drop-key":
                    rec.pop(key, None)
                else:
                    rec[key] = draw(_value())
                records[n] = ConfigRecord(rec)
        elif what == "metric-value":
            ms = [n for n in names if isinstance(records[n], MetricRecord)]
            if ms:
                n = draw(st.sampled_from(ms))
                rec = dict(records[n].items())
                rec[draw(st.sampled_from(sorted(rec) + ["samples", "loss"]))] = draw(_metric_value())
                records[n] = MetricRecord(rec)
        elif what == "array":
            arrs = [n for n in names if isinstance(records[n], ArrayRecord)]
            if arrs:
                n = draw(st.sampled_from(arrs))
                rec = dict(records[n].items())
                if draw(st.booleans()) and rec:
                    rec[draw(st.sampled_from(sorted(rec)))] = draw(st.sampled_from(_bad_arrays()))
                else:
                    rec[draw(st.text(min_size=1, max_size=12))] = Array(
                        draw(st.sampled_from([np.zeros((2, 2), np.float64), np.ones(3, np.int8),
                                              np.array([np.nan, np.inf], np.float32), np.zeros((0, 5), np.float32),
                                              np.zeros(4, np.complex64), np.zeros(2, np.bool_)])))
                records[n] = ArrayRecord(rec)
    return RecordDict(records)


def _random_content(draw):
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    names = ["plan", "payload", "reply", "metrics", "update", "query", "x"]
    out = {}
    for n in draw(st.lists(st.sampled_from(names), max_size=5, unique=True)):
        kind = draw(st.sampled_from(["config", "metric", "array"]))
        if kind == "config":
            out[n] = ConfigRecord({k: draw(_value()) for k in draw(st.lists(st.sampled_from(
                ["device-id", "round", "status", "layers", "ranks", "lr", "steps", "config", "config-hash", "detail",
                 "batch-sizes", "batch-widths", "batch-outputs", "frozen", "kind", "time-s"]), max_size=8,
                unique=True))})
        elif kind == "metric":
            out[n] = MetricRecord({k: draw(_metric_value()) for k in draw(st.lists(st.sampled_from(
                ["samples", "loss", "download_s", "forward_s", "backward_s", "upload_s", "fixed_s",
                 "backward_per_layer_s", "upload_per_rank_s"]), max_size=9, unique=True))})
        else:
            out[n] = ArrayRecord({"a": torch.zeros(2)})
    return RecordDict(out)


def _check_decoded(fn, content, *args):
    """fn(content, *args) either returns or raises a ValueError (MalformedMessage); returns whether it rejected."""
    try:
        out = fn(content, *args)
    except ValueError:
        return True
    if isinstance(out, tuple):   # content_to_assignment: a sane dispatch
        a, _ = out
        assert a.plan.ranks and all(r >= 1 for r in a.plan.ranks.values()) and a.steps >= 0
        assert math.isfinite(a.lr) and a.lr >= 0 and a.round >= 0
        assert all(isinstance(v, torch.Tensor) for v in a.payload.values())
    elif isinstance(out, DeviceResult):
        nums = [out.local.samples, out.local.loss, out.time.total_s, out.report.fixed_s,
                out.report.backward_per_layer_s, out.report.upload_per_rank_s]
        assert all(math.isfinite(v) for v in nums) and out.local.samples >= 0
        assert all(isinstance(v, torch.Tensor) for v in out.local.state.values())
        assert all(isinstance(b, int) and isinstance(w, int) and isinstance(o, int) and 1 <= o <= w
                   for b, w, o in out.local.batch_shapes)
    else:
        assert isinstance(out, DeviceFailure)
    return False


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_fuzz_wire_decoding(data):
    from fedlegend.engine.flower.wire import content_to_assignment, content_to_result

    train, ok, failed = _wire_samples()
    which = data.draw(st.sampled_from(["train", "result", "failed", "random"]))
    if which == "random":
        content = _random_content(data.draw)
        rejected = [_check_decoded(content_to_assignment, content), _check_decoded(content_to_result, content, 2, 3)]
        COUNTS["messages"] += 2
        COUNTS["messages-rejected"] += sum(rejected)
        return
    content = _mutated({"train": train, "result": ok, "failed": failed}[which], data.draw)
    if which == "train":
        rejected = _check_decoded(content_to_assignment, content)
    else:
        rejected = _check_decoded(content_to_result, content, 2, 3)
    COUNTS["messages"] += 1
    COUNTS["messages-rejected"] += rejected


def test_wire_valid_and_bad_arrays():
    """The valid samples decode; each foreign array is a MalformedMessage, in a payload and in an update."""
    from flwr.app import ArrayRecord, RecordDict

    from fedlegend.engine.flower.wire import MalformedMessage, content_to_assignment, content_to_result

    train, ok, failed = _wire_samples()
    a, _ = content_to_assignment(train)
    assert a.plan.ranks == {1: 2, 3: 4} and a.plan.frozen == ("residual",) and a.download_bytes == 1234
    assert isinstance(content_to_result(ok, 2, 3), DeviceResult)
    assert isinstance(content_to_result(failed, 2, 3), DeviceFailure)
    with pytest.raises(MalformedMessage, match="allows at most"):
        content_to_result(ok, 2, 3, max_update_bytes=10)
    for bad in _bad_arrays():
        for content, key, call in ((train, "payload", lambda c: content_to_assignment(c)),
                                   (ok, "update", lambda c: content_to_result(c, 2, 3))):
            rec = dict(content[key].items())
            rec[sorted(rec)[0]] = bad
            with pytest.raises(MalformedMessage):
                call(RecordDict({**dict(content.items()), key: ArrayRecord(rec)}))
            COUNTS["messages"] += 1
            COUNTS["messages-rejected"] += 1


def test_zz_fuzz_counts():
    """What the fuzz tried in this session (printed; `pytest -s` shows it)."""
    print("\nfuzz counts:", dict(sorted(COUNTS.items())))
    if COUNTS["updates-malformed"]:
        assert COUNTS["rounds"] > 0
