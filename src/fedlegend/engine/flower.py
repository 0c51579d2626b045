"""The Flower engine: the same rounds as engine/local.py, as Flower 1.41 messages.

Server (ServerApp + MethodStrategy): `plan_round` -> one TRAIN message per device with its
own plan (ConfigRecord) and adapter slice (ArrayRecord) -> `finish_round` over the replies,
which validates each one and aggregates with `method.aggregate` (heterogeneous keys and
shapes, so not Flower's FedAvg). Client (ClientApp): rebuilds the Assignment from the
message and calls the local engine's `run_device`, so training and the fleet's cost model
(virtual seconds) are the same code. Replies that are malformed, come from a node that
serves no device, or never arrive are recorded in the round's events and left out.

Wire format (keys of the RecordDicts):
  TRAIN  server -> node: "payload" ArrayRecord, "plan" ConfigRecord
         node -> server: "update" ArrayRecord, "metrics" MetricRecord, "reply" ConfigRecord
  QUERY  server -> node: "query" ConfigRecord;  node -> server: "reply" ConfigRecord (device-id)

Status (what a device's times and its status report are made of), the plan's "status":
  fleet     the fleet's cost model (virtual seconds), as the local engine; the simulation's only mode
  measured  on real machines: the device times its forward passes and the rest of its local
            training with its own clock (time.perf_counter), and stamps when it got the message
            and when its reply was ready (time.time); the server adds when it sent the message
            and when the reply arrived, and derives download and upload (measured_round_time).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
import tomllib
from dataclasses import dataclass, field, replace
from logging import INFO
from typing import Callable, Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from flwr.common.constant import ErrorCode
from flwr.supercore import log

from ..client import LocalResult
from ..config import Config, build_config, dump_config
from ..devices import RoundTime
from ..experiment import Experiment, build_experiment
from ..lora import AdapterState
from ..methods.base import Estimator, LoraPlan, StatusReport
from .local import (Assignment, DeviceFailure, DeviceResult, RoundOutcome, RoundPlan, finish_round, plan_round,
                    record_round, run_device, status_report)

DEVICE_ID_KEY = "device-id"        # node config key naming the device a SuperNode plays
PARTITION_ID_KEY = "partition-id"  # what Flower's simulation puts in each node's config
TIME_KEYS = ("download_s", "forward_s", "backward_s", "upload_s")
REPORT_KEYS = ("fixed_s", "backward_per_layer_s", "upload_per_rank_s")
STATUS_MODES = ("fleet", "measured")
STAMP_KEYS = ("recv-at", "done-at")  # a measured reply's wall-clock stamps (device clock, seconds since epoch)


class MalformedMessage(ValueError):
    """A message whose records do not follow the wire format above."""


# ------------------------------------------------------------------ wire format (pure)
def state_to_record(state: AdapterState) -> ArrayRecord:
    return ArrayRecord({k: t.detach().contiguous() for k, t in state.items()})


def record_to_state(rec: ArrayRecord) -> AdapterState:
    # np.array copies: the decoded buffers are read-only and torch wants writable memory
    return {k: torch.from_numpy(np.array(a.numpy())) for k, a in rec.items()}


def config_hash(config_toml: str) -> str:
    return hashlib.sha256(config_toml.encode()).hexdigest()[:16]


def config_from_toml(config_toml: str) -> Config:
    return build_config(tomllib.loads(config_toml), source="the server's config")


def assignment_to_content(a: Assignment, config_toml: str, status: str = "fleet") -> RecordDict:
    """What one device receives: its adapter slice, its plan, and the experiment's config."""
    plan = ConfigRecord({DEVICE_ID_KEY: a.device, "round": a.round, "status": status, "layers": a.plan.layers,
                         "ranks": [a.plan.ranks[l] for l in a.plan.layers], "lr": float(a.lr), "steps": a.steps,
                         "frozen": ",".join(a.plan.extras.get("frozen", ())),   # e.g. FFA-LoRA's lora_A
                         # the wire size the server's method decided (FLoRA: stacks, not dense weights)
                         "download-bytes": -1 if a.download_bytes is None else int(a.download_bytes),
                         "config": config_toml, "config-hash": config_hash(config_toml)})
    return RecordDict({"payload": state_to_record(a.payload), "plan": plan})


def _get(rec, key: str, kind: type | tuple[type, ...], where: str):
    if rec is None or key not in rec:
        raise MalformedMessage(f"{where} lacks {key!r}")
    value = rec[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise MalformedMessage(f"{where}[{key!r}] is {type(value).__name__}, expected {kind}")
    return value


def _record(content: RecordDict, key: str, kind: type):
    rec = content.get(key)
    if not isinstance(rec, kind):
        raise MalformedMessage(f"message lacks the {kind.__name__} {key!r}")
    return rec


def content_to_assignment(content: RecordDict) -> tuple[Assignment, str]:
    """The Assignment and config TOML of a TRAIN message; MalformedMessage if it does not parse."""
    plan = _record(content, "plan", ConfigRecord)
    layers, ranks = _get(plan, "layers", list, "plan"), _get(plan, "ranks", list, "plan")
    if not layers or len(layers) != len(ranks):
        raise MalformedMessage(f"plan has {len(layers)} layers but {len(ranks)} ranks")
    config_toml = _get(plan, "config", str, "plan")
    if _get(plan, "config-hash", str, "plan") != config_hash(config_toml):
        raise MalformedMessage("plan's config does not match its hash")
    dev = _get(plan, DEVICE_ID_KEY, int, "plan")
    frozen = tuple(p for p in str(plan.get("frozen", "")).split(",") if p)
    lora = LoraPlan(dev, {int(l): int(r) for l, r in zip(layers, ranks)}, {"frozen": frozen} if frozen else {})
    payload = record_to_state(_record(content, "payload", ArrayRecord))
    down = int(plan.get("download-bytes", -1))
    a = Assignment(_get(plan, "round", int, "plan"), lora, payload, _get(plan, "steps", int, "plan"),
                   float(_get(plan, "lr", (int, float), "plan")), None if down < 0 else down)
    return a, config_toml


def result_to_content(res: DeviceResult | DeviceFailure, round_: int, extra: dict | None = None) -> RecordDict:
    """A device's reply: its update and numbers, echoing its device id and the round."""
    if isinstance(res, DeviceFailure):
        return RecordDict({"reply": ConfigRecord({DEVICE_ID_KEY: res.device, "round": round_, "status": "failed",
                                                  "detail": res.detail})})
    metrics = {"samples": res.local.samples, "loss": float(res.local.loss),
               **{k: float(getattr(res.time, k)) for k in TIME_KEYS},
               **{k: float(getattr(res.report, k)) for k in REPORT_KEYS}, **(extra or {})}
    shapes = res.local.batch_shapes
    reply = ConfigRecord({DEVICE_ID_KEY: res.device, "round": round_, "status": "ok",
                          "batch-sizes": [int(b) for b, _ in shapes], "batch-widths": [int(w) for _, w in shapes]})
    return RecordDict({"update": state_to_record(res.local.state), "metrics": MetricRecord(metrics), "reply": reply})


def content_to_result(content: RecordDict, device: int, round_: int) -> DeviceResult | DeviceFailure:
    """Parse and sanity-check the reply of `device` for `round_`; MalformedMessage if it is not one.

    Keys, shapes and NaN of the update are checked later against what was sent (check_update).
    """
    reply = _record(content, "reply", ConfigRecord)
    echoed = _get(reply, DEVICE_ID_KEY, int, "reply")
    if echoed != device:
        raise MalformedMessage(f"reply names device {echoed}, but the node serves device {device}")
    if _get(reply, "round", int, "reply") != round_:
        raise MalformedMessage(f"reply is for round {reply['round']}, not {round_}")
    status = _get(reply, "status", str, "reply")
    if status == "failed":
        return DeviceFailure(device, "rejected", str(reply.get("detail", "local training failed")))
    if status != "ok":
        raise MalformedMessage(f"reply status {status!r} is neither 'ok' nor 'failed'")
    metrics = _record(content, "metrics", MetricRecord)
    nums = {k: _get(metrics, k, (int, float), "metrics") for k in ("samples", "loss", *TIME_KEYS, *REPORT_KEYS)}
    bad = [k for k, v in nums.items() if not math.isfinite(v) or (k != "loss" and v < 0)]
    if bad:
        raise MalformedMessage(f"metrics {bad} are negative or not finite")
    state = record_to_state(_record(content, "update", ArrayRecord))
    shapes = list(zip(reply.get("batch-sizes", []), reply.get("batch-widths", [])))
    local = LocalResult(state, int(nums["samples"]), float(nums["loss"]), [(int(b), int(w)) for b, w in shapes])
    rt = RoundTime(*(float(nums[k]) for k in TIME_KEYS))
    report = StatusReport(device, *(float(nums[k]) for k in REPORT_KEYS), samples=int(nums["samples"]))
    return DeviceResult(device, local, rt, report)


def worker_of(msg: Message) -> tuple[int, int] | None:
    """(process id, model builds in that process) a simulated device reports, if it does."""
    if msg.has_error() or not isinstance(m := msg.content.get("metrics"), MetricRecord):
        return None
    pid, builds = m.get("worker-pid"), m.get("worker-builds")
    return (int(pid), int(builds)) if isinstance(pid, int) and isinstance(builds, int) else None


def reply_to_device_id(content: RecordDict) -> int:
    return _get(_record(content, "reply", ConfigRecord), DEVICE_ID_KEY, int, "reply")


# ------------------------------------------------------------------ measured status (real machines)
class ForwardTimer:
    """Seconds spent in `module`'s forward passes while active (hooks on the outermost module)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module, self.seconds, self._t0, self._hooks = module, 0.0, 0.0, []

    def __enter__(self) -> "ForwardTimer":
        self._hooks = [self.module.register_forward_pre_hook(self._start),
                       self.module.register_forward_hook(self._stop)]
        return self

    def _start(self, *_) -> None:
        self._t0 = time.perf_counter()

    def _stop(self, *_) -> None:
        self.seconds += time.perf_counter() - self._t0

    def __exit__(self, *_) -> None:
        for h in self._hooks:
            h.remove()


def measured_round_time(sent_at: float, arrived_at: float, recv_at: float, done_at: float, forward_s: float,
                        backward_s: float, bytes_down: int, bytes_up: int) -> tuple[RoundTime, bool]:
    """A device's measured round: (download, forward, backward, upload) and whether the clocks agreed.

    sent_at, arrived_at: the server's clock when it pushed the TRAIN message and when it pulled
    the reply; recv_at, done_at: the device's clock when its ClientApp got the message and when
    the reply was ready; forward_s, backward_s: the device's own timing of its training.
    When the two clocks agree (one machine, or NTP; sent <= recv <= done <= arrived), download =
    recv - sent and upload = arrived - done. Otherwise the time the server waited beyond the
    device's busy time (done - recv) is split between download and upload by their bytes.
    Either way both include Flower's delivery delays (polling of SuperNode and server).
    """
    busy = max(done_at - recv_at, 0.0)
    if sent_at <= recv_at <= done_at <= arrived_at:
        return RoundTime(recv_at - sent_at, forward_s, backward_s, arrived_at - done_at), True
    comm = max(arrived_at - sent_at - busy, 0.0)
    total = bytes_down + bytes_up
    down = comm * bytes_down / total if total > 0 else comm / 2
    return RoundTime(down, forward_s, backward_s, comm - down), False


def measured_stamps(content: RecordDict) -> tuple[float, float] | None:
    """(recv-at, done-at) of a measured reply; None for a fleet-model reply."""
    m = content.get("metrics")
    if not isinstance(m, MetricRecord) or not all(k in m for k in STAMP_KEYS):
        return None
    stamps = tuple(float(m[k]) for k in STAMP_KEYS)
    if not all(math.isfinite(v) for v in stamps):
        raise MalformedMessage(f"metrics {STAMP_KEYS} are not finite")
    return stamps  # type: ignore[return-value]


# ------------------------------------------------------------------ client side
def device_id_of(context: Context) -> int:
    """The device this node plays: node config `device-id`, else the simulation's partition-id."""
    for key in (DEVICE_ID_KEY, PARTITION_ID_KEY):
        if key in context.node_config:
            return int(context.node_config[key])
    raise ValueError(f"node config has neither {DEVICE_ID_KEY!r} nor {PARTITION_ID_KEY!r}; "
                     f"start the SuperNode with --node-config '{DEVICE_ID_KEY}=N'")


class _DeviceSide:
    """At most one built Experiment (base model, data, fleet) per process, for one config.

    Why process-global: Flower's Ray backend passes the ClientApp (and so any object its
    closures hold) as an argument of every call, `actor.run.remote(app_fn, message, ...)`,
    so it is unpickled afresh for each message; Context.state only holds records and
    belongs to the node, not to the worker process. Only module state outlives a message
    in the worker. One slot (not a cache keyed by config): a new config replaces the model.
    """

    def __init__(self) -> None:
        self._key: str | None = None
        self._exp: Experiment | None = None
        self.builds = 0

    def get(self, config_toml: str) -> Experiment:
        key = config_hash(config_toml)
        if key != self._key:
            self._exp = None  # free the old model before loading another
            self._exp = build_experiment(config_from_toml(config_toml))
            self._key = key
            self.builds += 1
        return self._exp


_DEVICE_SIDE = _DeviceSide()


def handle_train(message: Message, context: Context) -> Message:
    """A TRAIN message: run the device's round, or say why it cannot."""
    recv_at = time.time()  # measured status only: a real device's wall clock, never a simulation's
    dev = device_id_of(context)
    round_ = -1
    try:
        a, config_toml = content_to_assignment(message.content)
        round_ = a.round
        if a.device != dev:
            raise MalformedMessage(f"plan is for device {a.device}, but this node is device {dev}")
        status = str(message.content["plan"].get("status", "fleet"))
        if status not in STATUS_MODES:
            raise MalformedMessage(f"plan's status {status!r} is not one of {STATUS_MODES}")
    except (MalformedMessage, ValueError, TypeError) as err:  # an undecodable payload is malformed too
        return Message(result_to_content(DeviceFailure(dev, "rejected", f"bad TRAIN message: {err}"), round_),
                       reply_to=message)
    exp = _DEVICE_SIDE.get(config_toml)
    extra = {"worker-pid": os.getpid(), "worker-builds": _DEVICE_SIDE.builds}
    if status == "fleet":
        res = run_device(exp, a)
    else:
        with ForwardTimer(exp.host.model) as fwd:
            t0 = time.perf_counter()
            res = run_device(exp, a)  # its fleet-model times are replaced by measured ones below
            train_s = time.perf_counter() - t0
        if isinstance(res, DeviceResult):
            rt = RoundTime(0.0, fwd.seconds, max(train_s - fwd.seconds, 0.0), 0.0)  # comm: the server's part
            res = replace(res, time=rt, report=status_report(dev, rt, a.plan.depth, sum(a.plan.ranks.values()),
                                                             res.local.samples))
        extra.update({"recv-at": recv_at, "done-at": time.time()})
    return Message(result_to_content(res, a.round, extra), reply_to=message)


def handle_query(message: Message, context: Context) -> Message:
    return Message(RecordDict({"reply": ConfigRecord({DEVICE_ID_KEY: device_id_of(context)})}), reply_to=message)


def make_client_app() -> ClientApp:
    app = ClientApp()
    app.train()(handle_train)
    app.query()(handle_query)
    return app


# ------------------------------------------------------------------ server side
@dataclass
class Roster:
    """Which node plays which device, from the nodes' QUERY replies.

    A node is asked once, when it first shows up. A node that names a device already served by
    a connected node waits (`waiting`) and takes the device over when that node leaves; nodes
    whose answer was unusable are not asked again (`refused`). Estimates are keyed by device, so
    they follow a device across restarts whatever node id it comes back with.
    """
    node_device: dict[int, int] = field(default_factory=dict)
    events: list[dict] = field(default_factory=list)
    waiting: dict[int, int] = field(default_factory=dict)
    refused: set[int] = field(default_factory=set)
    served: set[int] = field(default_factory=set)  # devices some node has played in this run

    def node_of(self, device: int) -> int | None:
        return next((n for n, d in self.node_device.items() if d == device), None)

    def known(self) -> set[int]:
        return set(self.node_device) | set(self.waiting) | self.refused

    def admit(self, replies: Iterable[Message], num_devices: int, asked: set[int]) -> list[dict]:
        """Take in QUERY replies; returns (and keeps in .events) what went wrong or changed."""
        events: list[dict] = []
        asked = set(asked)
        for msg in sorted(replies, key=lambda m: m.metadata.src_node_id):
            node = msg.metadata.src_node_id
            if node not in asked:
                continue  # not a reply to this query (e.g. the SuperLink's own error reply); see below
            asked.discard(node)
            if msg.has_error():
                self.refused.add(node)
                events.append({"device": None, "kind": "unknown-node",
                               "detail": f"node {node} failed to name its device: {msg.error.reason}"})
                continue
            try:
                dev = reply_to_device_id(msg.content)
            except MalformedMessage as err:
                self.refused.add(node)
                events.append({"device": None, "kind": "unknown-node", "detail": f"node {node}: {err}"})
                continue
            if not 0 <= dev < num_devices:
                self.refused.add(node)
                events.append({"device": dev, "kind": "unknown-device",
                               "detail": f"node {node} names device {dev}; the fleet has 0..{num_devices - 1}"})
            elif (other := self.node_of(dev)) is not None:
                self.waiting[node] = dev
                events.append({"device": dev, "kind": "unknown-device",
                               "detail": f"node {node} names device {dev}, already served by node {other}; "
                                         "it takes over if that node leaves"})
            else:
                self._assign(node, dev, events)
        for node in sorted(asked):
            self.refused.add(node)
            events.append({"device": None, "kind": "unknown-node", "detail": f"node {node} did not answer"})
        self.events.extend(events)
        return events

    def _assign(self, node: int, dev: int, events: list[dict]) -> None:
        if dev in self.served:
            events.append({"device": dev, "kind": "rejoined", "detail": f"node {node} now plays device {dev}; "
                           "its estimates carry over"})
        self.node_device[node] = dev
        self.served.add(dev)

    def update(self, connected: set[int]) -> list[dict]:
        """Forget nodes that left; a waiting node takes over a device whose node left."""
        events: list[dict] = []
        for node in sorted(set(self.node_device) - connected):
            dev = self.node_device.pop(node)
            events.append({"device": dev, "kind": "node-left", "detail": f"node {node} (device {dev}) "
                           "left the federation"})
        for node in sorted(set(self.waiting) - connected):
            del self.waiting[node]
        for node, dev in sorted(self.waiting.items()):
            if self.node_of(dev) is None:
                del self.waiting[node]
                self._assign(node, dev, events)
        self.refused &= connected
        self.events.extend(events)
        return events


def build_roster(replies: Iterable[Message], num_devices: int, asked: set[int]) -> Roster:
    """Accept each node's device id once; unknown, duplicate or unreadable ids are events."""
    roster = Roster()
    roster.admit(replies, num_devices, asked)
    return roster


def collect_replies(replies: Iterable[Message], roster: Roster, rp: RoundPlan, sent: dict[int, int],
                    sent_ids: dict[str, int] | None = None) -> tuple[dict[int, DeviceResult | DeviceFailure],
                                                                     list[dict], dict[int, Message]]:
    """Map TRAIN replies to devices; anything from a node that was not sent this round's plan is an event.

    An error reply the SuperLink writes itself (src node 0, e.g. the node went unavailable) is
    mapped to its device through the id of the message it answers (`sent_ids`: message id ->
    device). Also returns each device's accepted reply message (for measured status).
    """
    by_device: dict[int, DeviceResult | DeviceFailure] = {}
    messages: dict[int, Message] = {}
    events: list[dict] = []
    for msg in replies:
        node = msg.metadata.src_node_id
        dev = roster.node_device.get(node)
        if (dev is None or sent.get(dev) != node) and msg.has_error() and sent_ids:
            dev = sent_ids.get(msg.metadata.reply_to_message_id)
            node = sent.get(dev) if dev is not None else node
        if dev is None or sent.get(dev) != node:
            events.append({"device": None, "kind": "unknown-node", "detail": f"reply from node {node}, which was "
                           f"sent no plan this round; ignored"})
            continue
        if dev in by_device:
            events.append({"device": dev, "kind": "malformed", "detail": "second reply this round; ignored"})
            continue
        if msg.has_error():
            kind = "dropped" if msg.error.code == ErrorCode.NODE_UNAVAILABLE else "failed"
            by_device[dev] = DeviceFailure(dev, kind, f"client error {msg.error.code}: {msg.error.reason}")
            continue
        try:
            by_device[dev] = content_to_result(msg.content, dev, rp.round)
            messages[dev] = msg
        except (MalformedMessage, ValueError, TypeError) as err:
            by_device[dev] = DeviceFailure(dev, "malformed", str(err))
    return by_device, events, messages


class TimedGrid:
    """A Grid whose send_and_receive polls every `poll_s` (Flower's deployed Grid: 3 s) and notes,
    per message id, when it was pushed and when its reply was pulled (server clock, time.time)."""

    def __init__(self, grid: Grid, poll_s: float = 0.2) -> None:
        self.grid, self.poll_s = grid, poll_s
        self.sent_at: dict[str, float] = {}
        self.arrived_at: dict[str, float] = {}

    def __getattr__(self, name: str):
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        if not messages:
            return []
        now = time.time()
        pending = {i for i in self.grid.push_messages(messages) if i}
        self.sent_at.update({i: now for i in pending})
        end = time.monotonic() + (timeout if timeout is not None else math.inf)
        out: list[Message] = []
        while pending:
            got = list(self.grid.pull_messages(pending))
            now = time.time()
            for msg in got:
                self.arrived_at[msg.metadata.reply_to_message_id] = now
                pending.discard(msg.metadata.reply_to_message_id)
            out.extend(got)
            if not pending or time.monotonic() >= end:
                break
            time.sleep(self.poll_s)
        return out


class MethodStrategy(Strategy):
    """A Flower strategy around a fedlegend Method: per-device plans, heterogeneous aggregation.

    Holds the global adapter, the estimator and the virtual clock; `records` grows by one
    record per round, exactly as the local engine writes them. `status` ("fleet" or
    "measured") says where devices' times come from (module docstring); Flower's simulation
    takes "fleet" only.
    """

    def __init__(self, exp: Experiment, on_record: Callable[[dict], None] | None = None,
                 node_wait_s: float = 120.0, status: str = "fleet", poll_s: float = 0.2) -> None:
        if status not in STATUS_MODES:
            raise ValueError(f"status must be one of {STATUS_MODES}, not {status!r}")
        self.exp = exp
        self.config_toml = dump_config(exp.cfg)
        self.on_record = on_record
        self.node_wait_s = node_wait_s
        self.status = status
        self.poll_s = poll_s
        self.estimator = Estimator(exp.method.rho)
        self.state: AdapterState = exp.initial_state
        self.roster = Roster()
        self.records: list[dict] = []
        self.workers: dict[int, int] = {}  # worker process id -> model builds it reported (load once each)
        self.clock = 0.0
        self.query_timeout_s = 600.0
        self.clock_mismatch = 0  # measured replies whose stamps disagreed with the server's clock
        self._round: RoundPlan | None = None
        self._sent: dict[int, int] = {}
        self._messages: dict[int, Message] = {}
        self._pending_events: list[dict] = []
        self._outcome: RoundOutcome | None = None

    # -- discovery
    def _query(self, grid: Grid, nodes: list[int]) -> list[dict]:
        n = len(self.exp.fleet)
        query = [Message(RecordDict({"query": ConfigRecord({"num-devices": n})}), dst_node_id=node,
                         message_type=MessageType.QUERY) for node in nodes]
        replies = grid.send_and_receive(query, timeout=self.query_timeout_s)
        return self.roster.admit(replies, n, set(nodes))

    def connect(self, grid: Grid, timeout: float) -> Roster:
        """Wait for the fleet's nodes (up to node_wait_s), then ask each which device it plays."""
        n = len(self.exp.fleet)
        self.query_timeout_s = timeout
        deadline = time.monotonic() + self.node_wait_s
        while len(nodes := sorted(grid.get_node_ids())) < n and time.monotonic() < deadline:
            time.sleep(0.5)
        log(INFO, "fedlegend: %d nodes for %d devices", len(nodes), n)
        self._pending_events = self._query(grid, nodes)
        return self.roster

    def refresh(self, grid: Grid) -> None:
        """Between rounds: forget nodes that left, ask nodes that joined (a restarted SuperNode)."""
        connected = set(grid.get_node_ids())
        self._pending_events += self.roster.update(connected)
        new = sorted(connected - self.roster.known())
        if new:
            log(INFO, "fedlegend: new nodes %s; asking which devices they play", new)
            self._pending_events += self._query(grid, new)

    # -- training
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.refresh(grid)
        # self.state is the global adapter (`arrays` mirrors it): no tensor round trip on the server
        self._round = plan_round(self.exp, server_round, self.state, self.estimator)
        self._sent, self._messages = {}, {}
        for dev, a in self._round.assignments.items():
            node = self.roster.node_of(dev)
            if node is None:
                continue  # no node plays this device: finish_round records it as dropped
            self._sent[dev] = node
            self._messages[dev] = Message(assignment_to_content(a, self.config_toml, self.status), dst_node_id=node,
                                          message_type=MessageType.TRAIN, group_id=str(server_round))
        return list(self._messages.values())

    def _measured(self, dev: int, res: DeviceResult, reply: Message, grid: TimedGrid | None) -> DeviceResult:
        """A measured reply's RoundTime and status report, with the server's send and arrival times."""
        stamps = measured_stamps(reply.content)
        if stamps is None:
            raise MalformedMessage("a measured round's reply lacks its time stamps (recv-at, done-at)")
        mid = self._messages[dev].metadata.message_id
        if grid is None or mid not in grid.sent_at or mid not in grid.arrived_at:
            raise MalformedMessage("the server has no send/arrival time for this reply")
        a = self._round.assignments[dev]
        from ..lora import state_bytes

        rt, agreed = measured_round_time(grid.sent_at[mid], grid.arrived_at[mid], *stamps, res.time.forward_s,
                                         res.time.backward_s, state_bytes(a.payload), state_bytes(res.local.state))
        self.clock_mismatch += not agreed
        log(INFO, "fedlegend: round %d device %d measured download %.3f forward %.3f backward %.3f upload %.3f s%s",
            self._round.round, dev, rt.download_s, rt.forward_s, rt.backward_s, rt.upload_s,
            "" if agreed else " (clocks disagree: comm split by bytes)")
        report = status_report(dev, rt, a.plan.depth, sum(a.plan.ranks.values()), res.local.samples)
        return replace(res, time=rt, report=report)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._round is None or self._round.round != server_round:
            raise RuntimeError(f"aggregate_train({server_round}) without configure_train for that round")
        replies = list(replies)
        self.workers.update(w for w in map(worker_of, replies) if w is not None)
        sent_ids = {m.metadata.message_id: dev for dev, m in self._messages.items() if m.metadata.message_id}
        by_device, events, messages = collect_replies(replies, self.roster, self._round, self._sent, sent_ids)
        if self.status == "measured":
            for dev, msg in messages.items():
                try:
                    by_device[dev] = self._measured(dev, by_device[dev], msg, self._grid)
                except MalformedMessage as err:
                    by_device[dev] = DeviceFailure(dev, "malformed", str(err))
        out = finish_round(self.exp, self._round, self.state, self.estimator, by_device,
                           self._pending_events + events)
        self._pending_events = []
        self.state = out.state
        self.clock += out.record["round_time_s"]
        self._outcome = out
        metrics = {"round_time_s": out.record["round_time_s"], "accepted": len(out.record["devices"])}
        if out.record["train_loss"] is not None:
            metrics["train_loss"] = out.record["train_loss"]
        return state_to_record(self.state), MetricRecord(metrics)

    # -- evaluation: centrally on the server's test set, as the local engine does
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def evaluate_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Closes round `server_round`: its record (evaluated on eval rounds) goes out."""
        if server_round == 0 or self._outcome is None:
            return None
        rec = record_round(self.exp, server_round, self.clock, self.state, self._outcome)
        self._outcome = None
        self.records.append(rec)
        if self.on_record:
            self.on_record(rec)
        return MetricRecord({"accuracy": rec["accuracy"], "loss": rec["loss"]}) if rec["accuracy"] is not None else None

    def summary(self) -> None:
        log(INFO, "\t├── fedlegend method: %s on %d devices, %s status", self.exp.method.name, len(self.exp.fleet),
            self.status)

    _grid: TimedGrid | None = None

    def run(self, grid: Grid, timeout: float) -> None:
        self._grid = TimedGrid(grid, self.poll_s)
        self.connect(self._grid, timeout)
        self.start(self._grid, state_to_record(self.state), num_rounds=self.exp.cfg.run.rounds, timeout=timeout,
                   evaluate_fn=self.evaluate_round)


def make_server_app(strategy: MethodStrategy, round_timeout_s: float = 3600.0) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy.run(grid, round_timeout_s)

    return app


# ------------------------------------------------------------------ simulation
def simulate(strategy: MethodStrategy, cpus_per_client: float = 1.0, round_timeout_s: float = 3600.0) -> None:
    """Run `strategy` on Flower's simulation engine (Ray), one SuperNode per device."""
    from flwr.simulation import run_simulation

    if strategy.status != "fleet":
        raise ValueError("Flower's simulation runs on the virtual clock: its devices report the fleet model's "
                         "times (status 'fleet'), never the host's clock")
    # Flower's telemetry phones home by default; an offline research harness should not
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    backend = {"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
               "init_args": {"include_dashboard": False}}
    run_simulation(make_server_app(strategy, round_timeout_s), make_client_app(),
                   num_supernodes=len(strategy.exp.fleet), backend_config=backend)
    if len(strategy.records) != strategy.exp.cfg.run.rounds:
        raise RuntimeError(f"the Flower run stopped after {len(strategy.records)} of {strategy.exp.cfg.run.rounds} "
                           "rounds; see Flower's log above")


def run_flower(exp: Experiment, on_record: Callable[[dict], None] | None = None, progress: bool = True,
               cpus_per_client: float = 1.0, round_timeout_s: float = 3600.0) -> tuple[AdapterState, list[dict]]:
    """All rounds on Flower's simulation engine; returns the final global adapter and the records,
    like engine.local.run_local."""
    from tqdm.auto import tqdm

    bar = tqdm(total=exp.cfg.run.rounds, desc=f"{exp.method.name} (flower)", unit="round", disable=not progress)

    def emit(rec: dict) -> None:
        bar.update(1)
        if rec["accuracy"] is not None:
            bar.set_postfix(acc=f"{rec['accuracy']:.3f}", vtime=f"{rec['virtual_time_s']:.0f}s")
        if on_record:
            on_record(rec)

    strategy = MethodStrategy(exp, emit)
    try:
        simulate(strategy, cpus_per_client, round_timeout_s)
    finally:
        bar.close()
    return strategy.state, strategy.records
