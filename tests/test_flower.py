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

from fedlegend.config import build_config  # noqa: E402
from fedlegend.errors import UserError  # noqa: E402
from fedlegend.engine import flower as fl  # noqa: E402
from fedlegend.engine.flower import client as fl_client  # noqa: E402
from fedlegend.engine.flower.flwr_compat import TaskIdentity  # noqa: E402
from fedlegend.engine.local import finish_round, plan_round, run_device, run_local, status_report  # noqa: E402
from fedlegend.experiment import build_experiment  # noqa: E402
from fedlegend.engine.flower import roster as roster_mod  # noqa: E402
from fedlegend.methods.base import Estimator, LoraPlan  # noqa: E402
from fedlegend.spec import state_bytes  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One torch thread here, as in each Ray worker: on a busy 2-core machine two OpenMP threads
    per process made a training step 20-30 times slower. Restored for the other test modules."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
    # the poisoned update went on the wire before it was rejected: its bytes count; the malformed reply had none
    assert rec["devices"] == [] and rec["bytes_up"] == state_bytes(poisoned.local.state) > 0
    assert rec["round_time_s"] == poisoned.time.total_s    # the server waited for the rejected reply
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
    rp = plan_round(exp, 1, g, Estimator(exp.method.info.rho))
    expected = finish_round(exp, rp, g, Estimator(exp.method.info.rho), {0: good})
    for k in g:
        torch.testing.assert_close(strategy.state[k], expected.state[k], atol=0, rtol=0)
    assert strategy._outcome.record["devices"] == expected.record["devices"]
    # the two malformed replies' updates were uploaded too: the record counts the bytes that went on the wire
    wire = roster_mod.wire_bytes(fl.result_to_content(good, 1))
    assert wire >= state_bytes(good.local.state) > 0
    assert strategy._outcome.record["bytes_up"] == expected.record["bytes_up"] + 2 * wire


def test_wire_round_trip(exp):
    from fedlegend.engine.local import Dispatch
    from fedlegend.methods import Assignment, RoundView

    given = exp.method.configure(RoundView(1, [0, 1, 2]), exp.initial_state)[1]
    plan, payload = given.plan, given.payload
    a = Dispatch(1, given, 2, 0.001)
    back, toml = fl.content_to_assignment(fl.assignment_to_content(a, "x = 1\n"))
    assert back.plan.ranks == plan.ranks and (back.round, back.steps, back.lr) == (1, 2, 0.001) and toml == "x = 1\n"
    assert all(torch.equal(back.payload[k], payload[k]) for k in payload)
    assert back.download_bytes == given.download_bytes
    sized = fl.content_to_assignment(fl.assignment_to_content(Dispatch(1, Assignment(plan, payload, 1234), 2, 0.001),
                                                              ""))[0]
    assert sized.download_bytes == 1234     # the server's wire size (FLoRA) reaches the device's cost model
    res = run_device(exp, a)
    parsed = fl.content_to_result(fl.result_to_content(res, 1), 1, 1)
    assert parsed.time == res.time and parsed.report == res.report and parsed.local.batch_shapes == res.local.batch_shapes
    assert all(torch.equal(parsed.local.state[k], res.local.state[k]) for k in res.local.state)



def test_wire_checks_the_batch_outputs(exp):
    """Each step's output-layer positions travel with its size and width (the cost model prices the
    head or lm_head there); a reply without them, or with a count beyond its width, is malformed."""
    from fedlegend.engine.local import Dispatch
    from fedlegend.methods import RoundView

    a = Dispatch(1, exp.method.configure(RoundView(1, [0, 1, 2]), exp.initial_state)[1], 2, 0.001)
    content = fl.result_to_content(run_device(exp, a), 1)
    assert list(content["reply"]["batch-outputs"]) == [1, 1]       # an encoder's pooled head: once per sequence
    for outputs, match in ((None, "2 batch sizes, 2 batch widths and 0 batch outputs"), ([1], "1 batch outputs"),
                           ([1, 0], r"batch-outputs\[1\] = 0 is outside"),
                           ([1, 10**6], r"batch-outputs\[1\] = 1000000 is outside")):
        reply = dict(content["reply"].items())
        reply.pop("batch-outputs")
        if outputs is not None:
            reply["batch-outputs"] = outputs
        bad = RecordDict({"update": content["update"], "metrics": content["metrics"], "reply": ConfigRecord(reply)})
        with pytest.raises(fl.MalformedMessage, match=match):
            fl.content_to_result(bad, 1, 1)


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


# ------------------------------------------------------------------ faults across rounds
def run_round_on(strategy, grid, round_, drop=(), tamper=None):
    """configure_train -> each device trains (run_device) -> replies (minus `drop` devices) -> aggregate."""
    exp = strategy.exp
    msgs = list(strategy.configure_train(round_, fl.state_to_record(strategy.state), ConfigRecord(), grid=grid))
    replies = []
    for i, m in enumerate(msgs):
        m.metadata.__dict__["_message_id"] = f"m{round_}-{i}"   # what the Grid does when it pushes
        a, _ = fl.content_to_assignment(m.content)
        if a.device in drop:
            continue
        content = fl.result_to_content(run_device(exp, a), round_)
        replies.append(reply_from(m.metadata.dst_node_id, tamper(a.device, content) if tamper else content, round_))
    arrays, _ = strategy.aggregate_train(round_, replies)
    strategy.evaluate_round(round_, arrays)
    return msgs, strategy.records[-1]


def plan_of(msgs, device):
    for m in msgs:
        a, _ = fl.content_to_assignment(m.content)
        if a.device == device:
            return m.metadata.dst_node_id, a.plan.layers, a.plan.ranks
    return None


def test_restarted_supernode_keeps_its_device_and_estimates(exp, flower_identity):
    """Node 12 (device 1) leaves after round 1 and comes back as node 22: device 1's estimates carry over."""
    ref, restarted = fl.MethodStrategy(exp), fl.MethodStrategy(exp)
    ref_grid, grid = roster_for(ref, {11: 0, 12: 1, 13: 2}), roster_for(restarted, {11: 0, 12: 1, 13: 2})
    run_round_on(ref, ref_grid, 1)
    run_round_on(restarted, grid, 1)
    assert ref.estimator.estimates.keys() == restarted.estimator.estimates.keys() == {0, 1, 2}
    del grid.nodes[12]
    grid.nodes[22] = 1
    ref_msgs, ref_rec = run_round_on(ref, ref_grid, 2)
    msgs, rec = run_round_on(restarted, grid, 2)
    assert grid.queried == [22]                               # only the new node is asked who it is
    assert plan_of(msgs, 1) == (22, *plan_of(ref_msgs, 1)[1:])  # same plan as without the restart, to node 22
    assert [(e["kind"], e["device"]) for e in rec["events"]] == [("node-left", 1), ("rejoined", 1)]
    assert rec["devices"] == ref_rec["devices"] and sorted(d["id"] for d in rec["devices"]) == [0, 1, 2]
    for k in ref.state:
        torch.testing.assert_close(restarted.state[k], ref.state[k], atol=0, rtol=0)


def test_device_gone_between_rounds_then_back(exp, flower_identity):
    """Device 2's node leaves: round 2 goes on without it (dropped); its next node gets it back in round 3."""
    strategy = fl.MethodStrategy(exp)
    grid = roster_for(strategy, {11: 0, 12: 1, 13: 2})
    run_round_on(strategy, grid, 1)
    del grid.nodes[13]
    msgs, rec = run_round_on(strategy, grid, 2)
    assert sorted(m.metadata.dst_node_id for m in msgs) == [11, 12]
    assert [(e["kind"], e["device"]) for e in rec["events"]] == [("dropped", 2), ("node-left", 2)]
    assert sorted(d["id"] for d in rec["devices"]) == [0, 1]
    assert all(torch.isfinite(t).all() for t in strategy.state.values())
    grid.nodes[33] = 2
    msgs, rec = run_round_on(strategy, grid, 3)
    assert plan_of(msgs, 2)[0] == 33 and [(e["kind"], e["device"]) for e in rec["events"]] == [("rejoined", 2)]
    assert sorted(d["id"] for d in rec["devices"]) == [0, 1, 2]


def test_second_claim_waits_until_the_device_is_free(exp, flower_identity):
    """A node that names a device another connected node plays is held back; it takes over when that node leaves."""
    strategy = fl.MethodStrategy(exp)
    grid = roster_for(strategy, {11: 0, 12: 1, 13: 2})
    grid.nodes[14] = 1
    msgs, rec = run_round_on(strategy, grid, 1)
    assert plan_of(msgs, 1)[0] == 12 and strategy.roster.waiting == {14: 1}
    assert [(e["kind"], e["device"]) for e in rec["events"]] == [("unknown-device", 1)]
    del grid.nodes[12]
    msgs, rec = run_round_on(strategy, grid, 2)
    assert plan_of(msgs, 1)[0] == 14 and grid.queried.count(14) == 1
    assert [(e["kind"], e["device"]) for e in rec["events"]] == [("node-left", 1), ("rejoined", 1)]


def test_disconnect_mid_round_superlink_error_reply(exp, flower_identity):
    """A node that disconnects mid-round: the SuperLink answers for it (src node 0, NODE_UNAVAILABLE);
    the round completes with the others and records the device as dropped."""
    from flwr.app import Error

    from fedlegend.engine.flower.flwr_compat import ErrorCode

    strategy = fl.MethodStrategy(exp)
    grid = roster_for(strategy, {11: 0, 12: 1, 13: 2})
    g = {k: v.clone() for k, v in strategy.state.items()}
    msgs = list(strategy.configure_train(1, fl.state_to_record(g), ConfigRecord(), grid=grid))
    replies = []
    for i, m in enumerate(msgs):
        m.metadata.__dict__["_message_id"] = f"m{i}"
        a, _ = fl.content_to_assignment(m.content)
        if a.device == 1:
            meta = Metadata(run_id=1, message_id="", src_node_id=0, dst_node_id=0, reply_to_message_id=f"m{i}",
                            group_id="1", created_at=0.0, ttl=60.0, message_type=MessageType.TRAIN)
            replies.append(Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="node went away"), metadata=meta))
        else:
            replies.append(reply_from(m.metadata.dst_node_id, fl.result_to_content(run_device(exp, a), 1)))
    arrays, _ = strategy.aggregate_train(1, replies)
    strategy.evaluate_round(1, arrays)
    rec = strategy.records[0]
    assert [(e["kind"], e["device"]) for e in rec["events"]] == [("dropped", 1)]
    assert "node went away" in rec["events"][0]["detail"]
    assert sorted(d["id"] for d in rec["devices"]) == [0, 2] and set(strategy.estimator.estimates) == {0, 2}
    assert any(not torch.equal(strategy.state[k], g[k]) for k in g)
    assert all(torch.isfinite(t).all() for t in strategy.state.values())


def test_simulation_refuses_measured_status(exp):
    with pytest.raises(ValueError, match="virtual clock"):
        fl.simulate(fl.MethodStrategy(exp, status="measured"))
    with pytest.raises(ValueError, match="status"):
        fl.MethodStrategy(exp, status="wall")


# ------------------------------------------------------------------ measured status
def test_measured_round_time_same_clock():
    rt, agreed = fl.measured_round_time(sent_at=100.0, arrived_at=110.0, recv_at=101.5, done_at=107.0,
                                        forward_s=1.0, backward_s=3.0, bytes_down=4000, bytes_up=1000)
    assert agreed and (rt.download_s, rt.forward_s, rt.backward_s, rt.upload_s) == (1.5, 1.0, 3.0, 3.0)
    rep = status_report(7, rt, LoraPlan(7, {0: 2, 1: 4, 2: 6}), samples=8)
    assert (rep.fixed_s, rep.backward_per_layer_s, rep.upload_per_rank_s) == (2.5, 1.0, 0.25)


def test_measured_round_time_skewed_clocks_split_by_bytes():
    """The device's clock runs 1000 s ahead: the server's wait beyond the device's busy time is split by bytes."""
    rt, agreed = fl.measured_round_time(sent_at=100.0, arrived_at=110.0, recv_at=1101.5, done_at=1107.0,
                                        forward_s=1.0, backward_s=3.0, bytes_down=4000, bytes_up=1000)
    assert not agreed
    assert rt.download_s == pytest.approx(4.5 * 0.8) and rt.upload_s == pytest.approx(4.5 * 0.2)
    rt, _ = fl.measured_round_time(100.0, 101.0, 0.0, 5.0, 1.0, 3.0, 0, 0)   # busy longer than the wait: no comm
    assert rt.download_s == rt.upload_s == 0.0


def test_forward_timer_counts_forward_passes_only():
    lin = torch.nn.Linear(4, 4)
    with fl.ForwardTimer(lin) as t:
        for _ in range(3):
            lin(torch.ones(2, 4)).sum().backward()
    assert t.seconds > 0 and not lin._forward_hooks and not lin._forward_pre_hooks
    before = t.seconds
    lin(torch.ones(2, 4))
    assert t.seconds == before


def test_measured_reply_end_to_end(exp, flower_identity, monkeypatch):
    """Device side stamps its reply; the server turns stamps + its own send/arrival times into the record."""
    strategy = fl.MethodStrategy(exp, status="measured")
    grid = roster_for(strategy, {11: 0, 12: 1, 13: 2})
    monkeypatch.setattr(fl_client._DEVICE_SIDE, "get", lambda *args: exp)   # the in-process experiment plays every node
    msgs = list(strategy.configure_train(1, fl.state_to_record(exp.initial_state), ConfigRecord(), grid=grid))
    timed = fl.TimedGrid(grid)
    strategy._grid = timed
    replies = []
    for i, m in enumerate(msgs):
        m.metadata.__dict__["_message_id"] = mid = f"m{i}"
        assert m.content["plan"]["status"] == "measured"
        timed.sent_at[mid] = __import__("time").time()
        ctx = Context(run_id=1, node_id=m.metadata.dst_node_id, state=RecordDict(), run_config={},
                      node_config={"device-id": fl.content_to_assignment(m.content)[0].device})
        reply = fl.handle_train(m, ctx)
        metrics = reply.content["metrics"]
        assert metrics["forward_s"] > 0 and metrics["backward_s"] > 0 and metrics["recv-at"] <= metrics["done-at"]
        timed.arrived_at[mid] = metrics["done-at"] + 0.5
        replies.append(reply_from(m.metadata.dst_node_id, reply.content))
    replies[0].content["metrics"].pop("done-at")                 # a measured reply without its stamps
    arrays, _ = strategy.aggregate_train(1, replies)
    strategy.evaluate_round(1, arrays)
    rec = strategy.records[0]
    bad = fl.content_to_assignment(msgs[0].content)[0].device
    assert [(e["kind"], e["device"]) for e in rec["events"]] == [("malformed", bad)]
    for row in rec["devices"]:
        rt_up = row["comm_s"]
        assert rt_up >= 0.5 and row["compute_s"] > 0
    assert strategy.clock_mismatch == 0 and len(strategy.estimator.estimates) == 2


@pytest.mark.parametrize("name", ["flora", "fedadapter", "hierfedlora"])
def test_other_hosts_and_schedules_on_the_flower_strategy(name, flower_identity):
    """Every kind of method through Flower's messages: a residual in the payload and a wire size
    (FLoRA), bottleneck adapters (FedAdapter), devices idle in a round and a parallel group clock
    (HierFedLoRA). Two rounds give the same records and global state as the local engine."""
    import copy
    import dataclasses

    from fedlegend.engine.local import Server

    exp = build_experiment(tiny_cfg(**{"method.name": name, "fleet.devices": 3}))
    local = Server(dataclasses.replace(exp, method=copy.deepcopy(exp.method)))   # same host, its own method state
    local_recs = []
    for h in (1, 2):
        rp = local.plan(h)
        local_recs.append(local.finish(rp, {dev: run_device(local.exp, a) for dev, a in rp.assignments.items()}).record)
    state = local.state
    strategy = fl.MethodStrategy(exp)
    grid = roster_for(strategy, {11: 0, 12: 1, 13: 2})
    flower_recs = [run_round_on(strategy, grid, h)[1] for h in (1, 2)]
    for lr, fr in zip(local_recs, flower_recs):
        assert fr["devices"] == lr["devices"] and fr["events"] == lr["events"]
        assert (fr["bytes_down"], fr["bytes_up"], fr["round_time_s"]) == (lr["bytes_down"], lr["bytes_up"], lr["round_time_s"])
    assert set(strategy.state) == set(state)
    for k in state:
        torch.testing.assert_close(strategy.state[k], state[k], atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------ the package and its Flower internals
def test_flwr_version_check():
    """flwr_compat refuses any Flower but the one its internal imports are written for, and says how to fix it."""
    from fedlegend.engine.flower.flwr_compat import SUPPORTED_FLWR, check_flwr_version

    check_flwr_version(SUPPORTED_FLWR)
    with pytest.raises(ImportError) as err:
        check_flwr_version("1.42.0")
    msg = str(err.value)
    assert "1.42.0" in msg and SUPPORTED_FLWR in msg and f"pip install 'flwr[simulation]=={SUPPORTED_FLWR}'" in msg


PUBLIC_FLWR = {"flwr.app", "flwr.clientapp", "flwr.serverapp", "flwr.serverapp.strategy", "flwr.simulation"}


def test_non_public_flower_imports_only_in_flwr_compat():
    """Every `import flwr...` / `from flwr... import` in src/ and tests/ is Flower's public API or goes
    through engine/flower/flwr_compat.py (flwr.clientapp: ClientApp only)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    bad = []
    for path in [*(root / "src").rglob("*.py"), *(root / "tests").rglob("*.py")]:
        if path.name == "flwr_compat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [(node.module, [a.name for a in node.names])]
            elif isinstance(node, ast.Import):
                mods = [(a.name, []) for a in node.names]
            else:
                continue
            for mod, names in mods:
                if mod != "flwr" and not mod.startswith("flwr."):
                    continue
                if mod not in PUBLIC_FLWR or (mod == "flwr.clientapp" and set(names) - {"ClientApp"}):
                    bad.append(f"{path.relative_to(root)}:{node.lineno} {mod} {names}")
    assert not bad, bad


def test_package_exports_import_lazily():
    """`from fedlegend.engine.flower import X` keeps working for the old module's names; the command-line
    helpers (federation, certs) import neither torch nor Flower."""
    import subprocess
    import sys

    for name in fl.__all__:
        assert getattr(fl, name) is not None, name
    code = ("import sys; import fedlegend.engine.flower.federation, fedlegend.engine.flower.certs; "
            "print(sorted(m for m in ('torch', 'flwr') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------ checkpoints and resume
def resume_cfg(**over):
    """3 rounds evaluated every 2, FedAdapter's 2-round search period: a stop after round 1 splits both."""
    return tiny_cfg(**{"method.name": "fedadapter", "run.rounds": 3, "run.eval_every": 2,
                       "method.fedadapter.trial_rounds": 2, "run.engine": "flower", **over})


class Stop(Exception):
    pass


def run_outputs(d):
    from safetensors.torch import load_file
    adapter = {k: v for f in sorted((d / "adapter").glob("*.safetensors")) for k, v in load_file(f).items()}
    return (d / "records.jsonl").read_text(), adapter


def assert_same_outputs(a, b):
    assert a[0] == b[0]                                          # every record, byte for byte
    assert a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


class InProcessGrid(FakeGrid):
    """A Grid on this process: QUERY replies name each node's device and its partition report (from
    `exp`, the devices' side in process), TRAIN messages run the local engine's run_device on `exp`
    (fleet status). Push/pull, as TimedGrid drives a deployed Grid; `sent` keeps every message."""

    def __init__(self, nodes: dict[int, int], exp=None):
        super().__init__(nodes)
        self.exp, self.n, self.replies, self.sent = exp, 0, {}, []

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))

    def push_messages(self, messages):
        ids = []
        for m in messages:
            self.n += 1
            mid = f"m{self.n}"
            m.metadata.__dict__["_message_id"] = mid
            node = m.metadata.dst_node_id
            self.sent.append(m)
            if m.metadata.message_type == MessageType.QUERY:
                facts = self.exp.facts[self.nodes[node]]
                content = fl.report_to_content(self.nodes[node], facts.samples, list(facts.label_counts))
            else:
                a, _ = fl.content_to_assignment(m.content)
                content = fl.result_to_content(run_device(self.exp, a), a.round)
            meta = Metadata(run_id=1, message_id=f"r{self.n}", src_node_id=node, dst_node_id=0,
                            reply_to_message_id=mid, group_id=m.metadata.group_id, created_at=0.0, ttl=60.0,
                            message_type=m.metadata.message_type)
            self.replies[mid] = Message(content=content, metadata=meta)
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


def grid_engine(cfg):
    """The deployed ServerApp's engine (app.run_on_grid) over an InProcessGrid of 3 devices, whose
    data are the in-process partitions of `cfg`."""
    from fedlegend.engine.flower import app

    engine = app.run_on_grid(InProcessGrid({11: 0, 12: 1, 13: 2}, build_experiment(cfg)), 60.0, "fleet")
    assert engine.supports_resume and engine.build is not None
    return engine


def test_deployed_engine_resumes_from_its_checkpoint(tmp_path, monkeypatch, flower_identity):
    """The ServerApp's engine under rundir.run_experiment: stopped after round 1, resumed from its
    checkpoint, its records and adapter are those of the uninterrupted run (Flower's rounds 1-2 of
    the resumed run are our rounds 2-3)."""
    from fedlegend import rundir

    cfg = resume_cfg()
    rundir.run_experiment(cfg, tmp_path / "whole", progress=False, engine=grid_engine(cfg))
    assert not (tmp_path / "whole" / rundir.CHECKPOINT).exists()
    real = rundir.save_checkpoint

    def save_then_stop(path, cfg_, snap, wall_clock_s):
        real(path, cfg_, snap, wall_clock_s)
        if snap.round == 1:
            raise Stop

    with monkeypatch.context() as m, pytest.raises(Stop):   # (monkeypatch.undo would undo flower_identity too)
        m.setattr(rundir, "save_checkpoint", save_then_stop)
        rundir.run_experiment(cfg, tmp_path / "cut", progress=False, engine=grid_engine(cfg))
    assert (tmp_path / "cut" / rundir.CHECKPOINT).exists()
    rundir.run_experiment(cfg, tmp_path / "cut", progress=False, engine=grid_engine(cfg), resume=True)
    assert_same_outputs(run_outputs(tmp_path / "cut"), run_outputs(tmp_path / "whole"))
    assert [__import__("json").loads(l)["round"] for l in (tmp_path / "cut" / "records.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_deployed_server_app_resumes_by_default(monkeypatch, tmp_path):
    """main() passes resume (default on) and fresh-on-bad-checkpoint from the run config to run_experiment."""
    from fedlegend import rundir
    from fedlegend.engine.flower import app

    seen = []
    monkeypatch.setattr(rundir, "run_experiment", lambda cfg, out, **kw: seen.append(kw))
    for rc in ({"out": str(tmp_path)}, {"out": str(tmp_path), "resume": False, "fresh-on-bad-checkpoint": "true"}):
        app.main(object(), Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=rc))
    assert [(kw["resume"], kw["fresh_on_bad_checkpoint"]) for kw in seen] == [(True, False), (False, True)]
    assert all(kw["engine"].supports_resume for kw in seen)


def test_slow_flower_simulation_resumes_from_checkpoint(tmp_path, monkeypatch):
    """Flower's simulation engine: a run resumed from the checkpoint of its round 1 (taken from an
    uninterrupted run) ends with the uninterrupted run's records and adapter, byte for byte."""
    import shutil

    from fedlegend import rundir

    cfg = resume_cfg()
    real = rundir.save_checkpoint

    def save_and_keep_round_1(path, cfg_, snap, wall_clock_s):
        real(path, cfg_, snap, wall_clock_s)
        if snap.round == 1:
            shutil.copytree(path, tmp_path / "cut" / rundir.CHECKPOINT)

    monkeypatch.setattr(rundir, "save_checkpoint", save_and_keep_round_1)
    rundir.run_experiment(cfg, tmp_path / "whole", progress=False)
    monkeypatch.undo()
    assert (tmp_path / "cut" / rundir.CHECKPOINT / "checkpoint.json").exists()
    rundir.run_experiment(cfg, tmp_path / "cut", progress=False, resume=True)
    assert_same_outputs(run_outputs(tmp_path / "cut"), run_outputs(tmp_path / "whole"))
    assert not (tmp_path / "cut" / rundir.CHECKPOINT).exists()


# ------------------------------------------------------------------ device-local data (deployment)
def write_jsonl(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_device_data_named_by_node_config(tmp_path):
    """A node names its file (or a demo partition); its labels map onto the server's; bad files and node
    configs stop with the file, line, field or key."""
    from fedlegend.device_data import DataSource, DeviceDataError, file_examples, source_from_node_config

    cfg = tiny_cfg()
    f = write_jsonl(tmp_path / "mine.jsonl", [{"text": "a fine film", "label": "fresh"},
                                              {"text": "dull", "label": "rotten"}, {"text": "a fine film", "label": "fresh"},
                                              {"text": "great", "label": "fresh"}])
    src = source_from_node_config({"device-id": 0, "data-file": str(f)})
    ds = file_examples(src, cfg, ["rotten", "fresh"])
    assert ds.texts == ["a fine film", "dull", "great"] and ds.labels == [1, 0, 1]   # duplicate text kept once
    assert source_from_node_config({"dataset": "rotten-tomatoes", "partition": 2, "num-partitions": 3}) == \
        DataSource(dataset="rotten-tomatoes", partition=2, num_partitions=3)
    assert source_from_node_config({"partition-id": 1}, simulated=(1, 3)) == DataSource(partition=1, num_partitions=3)
    with pytest.raises(DeviceDataError, match="names no training data.*data-file="):
        source_from_node_config({"device-id": 0})
    with pytest.raises(DeviceDataError, match="partition=3 is not below num-partitions=3"):
        source_from_node_config({"dataset": "rotten-tomatoes", "partition": 3, "num-partitions": 3})
    with pytest.raises(DeviceDataError, match="line 3: field 'label' = 'meh' is not one of the server's labels"):
        file_examples(source_from_node_config({"data-file": str(write_jsonl(tmp_path / "b.jsonl", [
            {"text": "x", "label": "fresh"}, {"text": "y", "label": "rotten"}, {"text": "z", "label": "meh"}]))}),
            cfg, ["rotten", "fresh"])
    with pytest.raises(DeviceDataError, match=r"lacks column\(s\) \['label'\].*label-column="):
        file_examples(DataSource(path=str(write_jsonl(tmp_path / "c.jsonl", [{"text": "x", "y": 1}]))), cfg, ["0", "1"])
    with pytest.raises(UserError, match=r"c2.jsonl, line 2: field 'text' is empty"):
        file_examples(DataSource(path=str(write_jsonl(tmp_path / "c2.jsonl", [{"text": "x", "label": 1},
                                                                              {"text": " ", "label": 0}]))), cfg, ["0", "1"])
    with pytest.raises(DeviceDataError, match="not found on this device"):
        file_examples(DataSource(path=str(tmp_path / "nope.csv")), cfg, ["0", "1"])


def test_node_reports_its_partition_and_nothing_else(tmp_path, flower_identity, monkeypatch):
    """QUERY with the server's (path-free) config and labels: the node answers its device id, sample count
    and label histogram only; a node whose file is bad answers why, naming the file and line."""
    from fedlegend.config import dump_config

    monkeypatch.setattr(fl_client, "_DEVICE_SIDE", fl_client._DeviceSide())
    cfg = tiny_cfg(**{"data.name": "file", "data.path": "/server/only/test.jsonl"})
    toml = dump_config(fl.without_data_paths(cfg))
    assert "/server/only" not in toml and "/server/only" in dump_config(cfg)
    rows = [{"text": f"snippet number {i}", "label": ["rotten", "fresh"][i % 3 == 0]} for i in range(9)]
    f = write_jsonl(tmp_path / "dev1.jsonl", rows)
    ctx = Context(run_id=1, node_id=5, node_config={"device-id": 1, "data-file": str(f)}, state=RecordDict(),
                  run_config={})
    query = Message(fl.query_content(3, toml, ["rotten", "fresh"]), dst_node_id=5, message_type=MessageType.QUERY)
    reply = fl.handle_query(query, ctx).content["reply"]
    assert dict(reply) == {fl.DEVICE_ID_KEY: 1, "samples": 9, "label-counts": [6, 3]}
    assert fl.reply_to_report(RecordDict({"reply": reply}), 2) == (1, (9, (6, 3)), None)
    write_jsonl(f, rows + [{"text": "odd one", "label": "neutral"}])
    monkeypatch.setattr(fl_client, "_DEVICE_SIDE", fl_client._DeviceSide())
    reply = fl.handle_query(query, ctx).content["reply"]
    assert "samples" not in reply and f"{f}, line 10: field 'label' = 'neutral'" in reply["data-error"]
    roster = fl.build_roster([reply_from(5, RecordDict({"reply": reply}))], 3, {5}, num_labels=2)
    assert roster.node_device == {} and roster.events[0]["kind"] == "no-data" and "line 10" in roster.events[0]["detail"]
    bad = RecordDict({"reply": ConfigRecord({fl.DEVICE_ID_KEY: 1, "samples": 9, "label-counts": [6, 2]})})
    with pytest.raises(fl.MalformedMessage, match="summing to its 9 samples"):
        fl.reply_to_report(bad, 2)


def test_deployed_server_builds_from_reports_and_takes_late_ones(exp, flower_identity):
    """The deployed ServerApp asks every node before round 1 and builds the method's context from the reports
    (local steps, label counts); a report that arrives later (a node that joined late) sets that device's steps.
    The server holds no device's data."""
    from fedlegend.engine.flower import app
    from fedlegend.experiment import PartitionFacts

    cfg = tiny_cfg(**{"train.local_steps": 0, "train.local_epochs": 0.5})
    devices = build_experiment(cfg)      # the devices' side, in process
    grid = InProcessGrid({11: 0, 12: 1, 13: 2}, devices)
    server, roster, events = app.discover(grid, cfg, node_wait_s=0)
    assert events == [] and server.train is None and server.facts == devices.facts
    assert server.steps == devices.steps and len(set(server.steps)) > 1      # epochs: steps follow the sample counts
    assert server.method.ctx.label_counts == tuple(f.label_counts for f in devices.facts)
    with pytest.raises(RuntimeError, match="no device's data"):
        server.device_data(0)
    q = grid.sent[0].content["query"]
    assert q["labels"] == devices.label_names and "path" not in fl.config_from_toml(q["config"]).data.model_dump(
        exclude_none=True)
    strategy = fl.MethodStrategy(server, send_data_paths=False, roster=roster)
    roster.reports[2] = PartitionFacts(40, (10, 30))
    late = strategy._take_reports()
    assert server.steps[2] == 5 and [e["kind"] for e in late] == ["report"] and "40 samples" in late[0]["detail"]


def test_worker_checks_its_data_file_at_start(tmp_path, capsys):
    """`worker --check-data FILE`: an unusable file stops the worker before it serves, with one line naming
    the file, line and field."""
    from fedlegend.engine.flower import worker

    bad = write_jsonl(tmp_path / "mine.jsonl", [{"text": "fine", "label": "fresh"}, {"text": "", "label": "rotten"}])
    assert worker.main(["--runtime-api-address", "127.0.0.1:1", "--check-data", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"fedlegend worker: error: {bad}, line 2: field 'text' is empty; give every example its text "
                   "or delete that line")
