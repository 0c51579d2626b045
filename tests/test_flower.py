"""The Flower engine: same rounds as the local engine; bad replies are rejected and recorded.

test_slow_flower_simulation_matches_local_engine starts Ray and one SuperNode per device
(about a minute on 2 cores); the others need no Ray.
"""

import math
import os

import pytest
import torch

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from fedlegend.config import build_config  # noqa: E402
from fedlegend.engine import flower as fl  # noqa: E402
from fedlegend.engine.local import finish_round, plan_round, run_device, run_local  # noqa: E402
from fedlegend.experiment import build_experiment  # noqa: E402
from fedlegend.methods.base import Estimator  # noqa: E402


def tiny_cfg(**over):
    base = {"fleet.devices": 3, "run.rounds": 2, "train.local_steps": 1, "train.batch_size": 4,
            "data.eval_subset": 32, "run.eval_every": 1, "run.target_accuracy": 0.5, "method.name": "legend"}
    base.update(over)
    return build_config({}, base)


def plans_of(records):
    return [[(d["id"], d["layers"], d["ranks"]) for d in r["devices"]] for r in records]


def test_slow_flower_simulation_matches_local_engine():
    """2 rounds of LEGEND, same seed: same plans, records and aggregated adapter (float tolerance)."""
    local_state, local_recs = run_local(build_experiment(tiny_cfg()), progress=False)
    seen = []
    strategy = fl.MethodStrategy(build_experiment(tiny_cfg(**{"run.engine": "flower"})), seen.append)
    fl.simulate(strategy, cpus_per_client=1)
    flower_state, flower_recs = strategy.state, strategy.records
    assert seen == flower_recs and [r["round"] for r in flower_recs] == [1, 2]
    assert plans_of(flower_recs) == plans_of(local_recs)
    for lr, fr in zip(local_recs, flower_recs):
        assert fr["events"] == [] and set(fr) == set(lr)
        for key in ("bytes_down", "bytes_up", "lr"):
            assert fr[key] == lr[key], key
        for key in ("virtual_time_s", "round_time_s", "mean_waiting_s", "accuracy", "loss", "train_loss"):
            assert fr[key] == pytest.approx(lr[key], rel=1e-4, abs=1e-6), key
        for ld, fd in zip(lr["devices"], fr["devices"]):
            assert fd["time_s"] == pytest.approx(ld["time_s"]) and fd["samples"] == ld["samples"]
    assert set(flower_state) == set(local_state)
    for k in local_state:
        torch.testing.assert_close(flower_state[k], local_state[k], atol=1e-5, rtol=1e-4)
    # the base model is loaded once per Ray worker process (2 on 2 cores), not once per message (6)
    assert strategy.workers and set(strategy.workers.values()) == {1}


# ------------------------------------------------------------------ no Ray below
@pytest.fixture(scope="module")
def exp():
    return build_experiment(tiny_cfg())


@pytest.fixture
def flower_identity(monkeypatch):
    """Messages need Flower's run identity, which a simulation sets; restored after the test."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def reply_from(node: int, content: RecordDict, round_: int = 1) -> Message:
    meta = Metadata(run_id=1, message_id=f"r{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="",
                    group_id=str(round_), created_at=0.0, ttl=60.0, message_type=MessageType.TRAIN)
    return Message(content=content, metadata=meta)


def query_reply(node: int, device: int) -> Message:
    return reply_from(node, RecordDict({"reply": ConfigRecord({fl.DEVICE_ID_KEY: device})}))


class FakeGrid:
    """The nodes connected now and the device each new one names when queried (no Flower run)."""

    def __init__(self, nodes: dict[int, int]):
        self.nodes = dict(nodes)
        self.queried: list[int] = []

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in messages:
            assert m.metadata.message_type == MessageType.QUERY
            self.queried.append(m.metadata.dst_node_id)
            out.append(query_reply(m.metadata.dst_node_id, self.nodes[m.metadata.dst_node_id]))
        return out


def roster_for(strategy, nodes: dict[int, int]):
    replies = [query_reply(n, d) for n, d in nodes.items()]
    strategy.roster = fl.build_roster(replies, len(strategy.exp.fleet), set(nodes))
    strategy._pending_events = list(strategy.roster.events)
    return FakeGrid(nodes)


def test_roster_rejects_unknown_and_duplicate_devices():
    replies = [reply_from(n, RecordDict({"reply": ConfigRecord({fl.DEVICE_ID_KEY: d})}))
               for n, d in {11: 0, 12: 1, 13: 7, 14: 1}.items()]
    replies.append(reply_from(15, RecordDict({"reply": ConfigRecord({"something": 1})})))
    roster = fl.build_roster(replies, 3, {11, 12, 13, 14, 15, 16})
    assert roster.node_device == {11: 0, 12: 1}
    kinds = [(e["kind"], e["device"]) for e in roster.events]
    assert kinds == [("unknown-device", 7), ("unknown-device", 1), ("unknown-node", None), ("unknown-node", None)]
    assert "did not answer" in roster.events[-1]["detail"]


def test_bad_replies_rejected_recorded_global_unchanged(exp, flower_identity):
    """Malformed, poisoned, unknown-node and missing replies: all skipped and recorded; adapter kept."""
    strategy = fl.MethodStrategy(exp)
    grid = roster_for(strategy, {11: 0, 12: 1, 13: 2, 14: 9})
    g = {k: v.clone() for k, v in exp.initial_state.items()}
    msgs = list(strategy.configure_train(1, fl.state_to_record(g), ConfigRecord(), grid=grid))
    assert sorted(m.metadata.dst_node_id for m in msgs) == [11, 12, 13]
    a0, _ = fl.content_to_assignment(next(m for m in msgs if m.metadata.dst_node_id == 11).content)
    a1, _ = fl.content_to_assignment(next(m for m in msgs if m.metadata.dst_node_id == 12).content)
    good0 = run_device(exp, a0)
    poisoned = run_device(exp, a1)
    key = sorted(poisoned.local.state)[0]
    poisoned.local.state[key] = torch.full_like(poisoned.local.state[key], float("nan"))
    malformed = fl.result_to_content(good0, 1)
    del malformed["update"]
    replies = [reply_from(11, malformed), reply_from(12, fl.result_to_content(poisoned, 1)),
               reply_from(99, fl.result_to_content(good0, 1))]       # device 2 (node 13) never answers
    arrays, _ = strategy.aggregate_train(1, replies)
    strategy.evaluate_round(1, arrays)
    rec = strategy.records[0]
    events = [(e["kind"], e["device"]) for e in rec["events"]]
    assert events == [("malformed", 0), ("rejected", 1), ("dropped", 2), ("unknown-device", 9),
                      ("unknown-node", None)]
    assert "lacks the ArrayRecord 'update'" in rec["events"][0]["detail"] and "NaN" in rec["events"][1]["detail"]
    assert rec["devices"] == [] and rec["bytes_up"] == 0 and rec["round_time_s"] == 0.0
    assert all(torch.equal(strategy.state[k], g[k]) for k in g)
    assert all(torch.equal(t, torch.from_numpy(arrays[k].numpy())) for k, t in g.items())
    assert strategy.estimator.estimates == {}
    assert rec["accuracy"] is not None and math.isfinite(rec["loss"])


def test_good_reply_aggregates_like_local_engine(exp, flower_identity):
    """One valid reply among bad ones: the result equals the local server side fed that reply alone."""
    strategy = fl.MethodStrategy(exp)
    grid = roster_for(strategy, {11: 0, 12: 1, 13: 2})
    g = exp.initial_state
    msgs = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, fl.state_to_record(g), ConfigRecord(),
                                                                        grid=grid)}
    a0, _ = fl.content_to_assignment(msgs[11].content)
    good = run_device(exp, a0)
    wrong_echo = fl.result_to_content(good, 1)                  # node 12 claims to be device 0
    stale = fl.result_to_content(good, 1)                       # node 13 (device 2) answers for round 5
    stale["reply"][fl.DEVICE_ID_KEY], stale["reply"]["round"] = 2, 5
    strategy.aggregate_train(1, [reply_from(11, fl.result_to_content(good, 1)), reply_from(12, wrong_echo),
                                 reply_from(13, stale)])
    events = strategy._outcome.record["events"]
    assert [(e["kind"], e["device"]) for e in events] == [("malformed", 1), ("malformed", 2)]
    assert "serves device 1" in events[0]["detail"] and "round 5" in events[1]["detail"]
    rp = plan_round(exp, 1, g, Estimator(exp.method.rho))
    expected = finish_round(exp, rp, g, Estimator(exp.method.rho), {0: good})
    for k in g:
        torch.testing.assert_close(strategy.state[k], expected.state[k], atol=0, rtol=0)
    assert strategy._outcome.record["devices"] == expected.record["devices"]


def test_wire_round_trip(exp):
    plan = exp.method.plan(1, [0, 1, 2], {}, {})[1]
    payload = exp.method.assign(exp.initial_state, plan)
    from fedlegend.engine.local import Assignment

    a = Assignment(1, plan, payload, 2, 0.001)
    back, toml = fl.content_to_assignment(fl.assignment_to_content(a, "x = 1\n"))
    assert back.plan.ranks == plan.ranks and (back.round, back.steps, back.lr) == (1, 2, 0.001) and toml == "x = 1\n"
    assert all(torch.equal(back.payload[k], payload[k]) for k in payload)
    res = run_device(exp, a)
    parsed = fl.content_to_result(fl.result_to_content(res, 1), 1, 1)
    assert parsed.time == res.time and parsed.report == res.report and parsed.local.batch_shapes == res.local.batch_shapes
    assert all(torch.equal(parsed.local.state[k], res.local.state[k]) for k in res.local.state)


def test_client_refuses_plan_for_another_device(flower_identity):
    """A node that plays device 1 answers a plan for device 0 with a failure, without training."""
    ctx = Context(run_id=1, node_id=5, node_config={"partition-id": 1}, state=RecordDict(), run_config={})
    content = RecordDict({"plan": ConfigRecord({fl.DEVICE_ID_KEY: 0, "round": 3, "layers": [5], "ranks": [4],
                                                "lr": 0.1, "steps": 1, "config": "", "config-hash": fl.config_hash("")}),
                          "payload": ArrayRecord()})
    msg = Message(content, dst_node_id=5, message_type=MessageType.TRAIN)
    reply = fl.handle_train(msg, ctx)
    r = reply.content["reply"]
    assert r["status"] == "failed" and r[fl.DEVICE_ID_KEY] == 1 and "device 0" in r["detail"]
    assert fl.device_id_of(Context(run_id=1, node_id=5, node_config={"device-id": 2, "partition-id": 0},
                                   state=RecordDict(), run_config={})) == 2
    with pytest.raises(ValueError, match="device-id"):
        fl.device_id_of(Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={}))
