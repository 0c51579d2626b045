"""The Flower engine's server side: a Strategy that runs a fedlegend Method's rounds.

`plan_round` -> one TRAIN message per device with its own plan (ConfigRecord) and adapter
slice (ArrayRecord) -> `finish_round` over the replies, which validates each one and
aggregates with `method.aggregate` (heterogeneous keys and shapes, so not Flower's FedAvg).
Replies that are malformed, come from a node that serves no device, or never arrive are
recorded in the round's events and left out.
"""

from __future__ import annotations

import time
from dataclasses import replace
from logging import INFO
from typing import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from ...config import Config, dump_config
from ...experiment import Experiment, steps_per_device
from ...spec import AdapterState, state_bytes
from ..local import DeviceFailure, DeviceResult, RoundOutcome, RoundPlan, Server, Snapshot, status_report
from .flwr_compat import log
from .roster import Roster, collect_replies
from .timing import TimedGrid, measured_round_time, measured_stamps
from .wire import STATUS_MODES, MalformedMessage, assignment_to_content, query_content, state_to_record, worker_of


def without_data_paths(cfg: Config) -> Config:
    """The config a deployed server sends its devices: every device names its own data, so no path. The task
    kind is pinned first: 'auto' reads the server's file, which a device never sees."""
    from ...lmdata import task_kind

    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": None, "task": task_kind(cfg.data)})})


def wait_for_nodes(grid: Grid, num_devices: int, wait_s: float) -> list[int]:
    """The connected nodes, once there are `num_devices` of them or `wait_s` has passed."""
    deadline = time.monotonic() + wait_s
    while len(nodes := sorted(grid.get_node_ids())) < num_devices and time.monotonic() < deadline:
        time.sleep(0.5)
    log(INFO, "fedlegend: %d nodes for %d devices", len(nodes), num_devices)
    return nodes


def query_nodes(grid: Grid, roster: Roster, nodes: list[int], num_devices: int, config_toml: str,
                labels: list[str], timeout: float) -> list[dict]:
    """Ask `nodes` which device each plays and for its partition report; the roster takes the answers."""
    query = [Message(query_content(num_devices, config_toml, labels), dst_node_id=node, message_type=MessageType.QUERY)
             for node in nodes]
    replies = grid.send_and_receive(query, timeout=timeout)
    return roster.admit(replies, num_devices, set(nodes), len(labels))


class MethodStrategy(Strategy):
    """A Flower strategy around a fedlegend Method: per-device plans, heterogeneous aggregation.

    Its `server` (engine.local.Server, as in the local loop) holds the global adapter, the
    estimates, the virtual clock and the records, one per round, exactly as the local engine
    writes them. `status` ("fleet" or
    "measured") says where devices' times come from (module docstring); Flower's simulation
    takes "fleet" only.

    With `resume` (a Snapshot) the server continues after the snapshot's round: Flower counts the
    remaining rounds from 1, and Flower's round r is our round `offset + r`. `on_snapshot` gets the
    server's state after every closed round (the run folder saves it as a checkpoint).

    Devices are sent the config and the label names of the server's test set. `send_data_paths`
    False (deployment): the config goes without data.path, each device trains on the data its node
    names, and a device's partition report that arrives later than the first (a node that joined or
    came back) sets its local steps. True (simulation): each node partitions the run's dataset.
    `roster`: nodes already asked (a deployed server asks them before it builds the experiment).
    """

    def __init__(self, exp: Experiment, on_record: Callable[[dict], None] | None = None,
                 node_wait_s: float = 120.0, status: str = "fleet", poll_s: float = 0.2,
                 resume: Snapshot | None = None, on_snapshot: Callable[[Snapshot], None] | None = None,
                 send_data_paths: bool = True, roster: Roster | None = None) -> None:
        if status not in STATUS_MODES:
            raise ValueError(f"status must be one of {STATUS_MODES}, not {status!r}")
        self.exp = exp
        self.config_toml = dump_config(exp.cfg if send_data_paths else without_data_paths(exp.cfg))
        self.on_record = on_record
        self.node_wait_s = node_wait_s
        self.status = status
        self.poll_s = poll_s
        self.server = Server(exp, resume)
        self.offset = self.server.round   # rounds done before this Flower run (resume)
        self.on_snapshot = on_snapshot
        self.roster = roster or Roster()
        self.connected = roster is not None
        self.workers: dict[int, int] = {}  # worker process id -> model builds it reported (load once each)
        self.query_timeout_s = 600.0
        self.clock_mismatch = 0  # measured replies whose stamps disagreed with the server's clock
        self._round: RoundPlan | None = None
        self._sent: dict[int, int] = {}
        self._messages: dict[int, Message] = {}
        self._pending_events: list[dict] = []
        self._outcome: RoundOutcome | None = None
        self.secure = bool(exp.cfg.privacy.secure_aggregation)   # SecAgg+ (secagg.py): the server sees only sums
        self._secure = None

    @property
    def state(self) -> AdapterState:
        return self.server.state

    @property
    def records(self) -> list[dict]:
        return self.server.records

    @property
    def estimator(self):
        return self.server.estimator

    # -- discovery
    def _query(self, grid: Grid, nodes: list[int]) -> list[dict]:
        events = query_nodes(grid, self.roster, nodes, len(self.exp.fleet), self.config_toml, self.exp.label_names,
                             self.query_timeout_s)
        return events + self._take_reports()

    def _take_reports(self) -> list[dict]:
        """Partition reports that differ from what the experiment was built with: a deployed server takes
        them (the device's local steps follow its sample count; the method's context stays as built);
        in process, where the server built every partition itself, a difference is only recorded."""
        exp, events = self.exp, []
        for dev, facts in sorted(self.roster.reports.items()):
            if facts == exp.facts[dev]:
                continue
            if exp.train is None:
                exp.facts[dev], exp.steps[dev] = facts, steps_per_device(exp.cfg, [facts])[0]
                events.append({"device": dev, "kind": "report", "detail": f"device {dev} reports {facts.samples} "
                               f"samples (labels {list(facts.label_counts)}); {exp.steps[dev]} local steps a round"})
            else:
                events.append({"device": dev, "kind": "report", "detail": f"device {dev} reports {facts}, "
                               f"the server's partition is {exp.facts[dev]}; kept the server's"})
        return events

    def connect(self, grid: Grid, timeout: float) -> Roster:
        """Wait for the fleet's nodes (up to node_wait_s), then ask each which device it plays."""
        self.query_timeout_s = timeout
        nodes = wait_for_nodes(grid, len(self.exp.fleet), self.node_wait_s)
        self._pending_events = self._query(grid, nodes)
        self.connected = True
        return self.roster

    # between rounds, how long to wait for a device whose node left (a restarting SuperNode) to come back;
    # each absence is waited for once, so a device that is gone for good costs one wait, not one per round
    rejoin_wait_s: float = 0.0
    _rejoin_waited: frozenset[int] = frozenset()

    def refresh(self, grid: Grid) -> None:
        """Between rounds: forget nodes that left, ask nodes that joined (a restarted SuperNode).

        With rejoin_wait_s > 0, a device some node played earlier but none plays now is waited
        for (up to rejoin_wait_s, once per absence) before the round is planned without it."""
        self._refresh_once(grid)
        deadline = time.monotonic() + self.rejoin_wait_s
        while (absent := self._absent() - self._rejoin_waited) and time.monotonic() < deadline:
            time.sleep(0.5)
            self._refresh_once(grid)
        if absent:
            log(INFO, "fedlegend: devices %s did not come back within %.0f s; planning without them", sorted(absent),
                self.rejoin_wait_s)
        self._rejoin_waited = frozenset((self._rejoin_waited | absent) & self._absent())

    def _absent(self) -> set[int]:
        return {dev for dev in self.roster.served if self.roster.node_of(dev) is None}

    def _refresh_once(self, grid: Grid) -> None:
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
        round_ = self.offset + server_round
        # self.state is the global adapter (`arrays` mirrors it): no tensor round trip on the server
        self._round = self.server.plan(round_)
        self._sent, self._messages = {}, {}
        for dev, a in self._round.assignments.items():
            node = self.roster.node_of(dev)
            if node is None:
                continue  # no node plays this device: finish_round records it as dropped
            self._sent[dev] = node
            self._messages[dev] = Message(assignment_to_content(a, self.config_toml, self.status, self.exp.label_names),
                                          dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(round_))
        if self.secure:   # the round runs here, as SecAgg+'s four stages; Flower's loop gets no message
            self._run_secure(grid, round_)
            return []
        return list(self._messages.values())

    def _run_secure(self, grid: Grid, round_: int) -> None:
        from .secagg import SecureRound

        self._secure = SecureRound.plan(self.exp, self._round, self.state)
        for dev, m in self._messages.items():
            self._secure.add_fields(dev, m.content)
        self._secure.run(grid, {self._sent[dev]: m.content for dev, m in self._messages.items()}, round_,
                         self.query_timeout_s)
        # the stage that carried each device's TRAIN records stands for its message (ids, measured times)
        sent = self._secure.grid.train_messages
        self._messages = {dev: sent[node] for dev, node in self._sent.items() if node in sent}

    def _measured(self, dev: int, res: DeviceResult, reply: Message, grid: TimedGrid | None) -> DeviceResult:
        """A measured reply's RoundTime and status report, with the server's send and arrival times."""
        stamps = measured_stamps(reply.content)
        if stamps is None:
            raise MalformedMessage("a measured round's reply lacks its time stamps (recv-at, done-at)")
        mid = self._messages[dev].metadata.message_id
        if grid is None or mid not in grid.sent_at or mid not in grid.arrived_at:
            raise MalformedMessage("the server has no send/arrival time for this reply")
        a = self._round.assignments[dev]
        rt, agreed = measured_round_time(grid.sent_at[mid], grid.arrived_at[mid], *stamps, res.time.forward_s,
                                         res.time.backward_s, state_bytes(a.payload), state_bytes(res.local.state))
        self.clock_mismatch += not agreed
        log(INFO, "fedlegend: round %d device %d measured download %.3f forward %.3f backward %.3f upload %.3f s%s",
            self._round.round, dev, rt.download_s, rt.forward_s, rt.backward_s, rt.upload_s,
            "" if agreed else " (clocks disagree: comm split by bytes)")
        report = status_report(dev, rt, a.plan, res.local.samples)
        return replace(res, time=rt, report=report)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._round is None or self._round.round != self.offset + server_round:
            raise RuntimeError(f"aggregate_train({server_round}) without configure_train for that round")
        replies = list(replies) if self._secure is None else self._secure.replies
        self.workers.update(w for w in map(worker_of, replies) if w is not None)
        sent_ids = {m.metadata.message_id: dev for dev, m in self._messages.items() if m.metadata.message_id}
        by_device, events, messages = collect_replies(replies, self.roster, self._round, self._sent, sent_ids)
        if self.status == "measured":
            for dev, msg in messages.items():
                try:
                    by_device[dev] = self._measured(dev, by_device[dev], msg, self._grid)
                except MalformedMessage as err:
                    by_device[dev] = DeviceFailure(dev, "malformed", str(err))
        secure, self._secure = self._secure, None
        if secure is not None:
            by_device = secure.accepted(by_device)
            events += [{"device": None, "kind": "secagg", "detail": secure.halted}] if secure.halted else []
        out = self.server.finish(self._round, by_device, self._pending_events + events,
                                 aggregate=None if secure is None else secure.aggregate)
        if secure is not None:
            secure.account(out.record, self._sent)
        self._pending_events = []
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
        """Closes round `server_round` (ours: offset + server_round): its record (evaluated on eval
        rounds) goes out, then the server's snapshot."""
        if server_round == 0 or self._outcome is None:
            return None
        rec = self.server.close(self.offset + server_round, self._outcome)
        self._outcome = None
        if self.on_record:
            self.on_record(rec)
        if self.on_snapshot:
            self.on_snapshot(self.server.snapshot())
        return MetricRecord({"accuracy": rec["accuracy"], "loss": rec["loss"]}) if rec["accuracy"] is not None else None

    def summary(self) -> None:
        log(INFO, "\t├── fedlegend method: %s on %d devices, %s status", self.exp.method.info.name, len(self.exp.fleet),
            self.status)

    _grid: TimedGrid | None = None

    def run(self, grid: Grid, timeout: float) -> None:
        self._grid = TimedGrid(grid, self.poll_s)
        self.query_timeout_s = timeout
        if not self.connected:
            self.connect(self._grid, timeout)
        self.start(self._grid, state_to_record(self.state), num_rounds=self.exp.cfg.run.rounds - self.offset,
                   timeout=timeout, evaluate_fn=self.evaluate_round)
