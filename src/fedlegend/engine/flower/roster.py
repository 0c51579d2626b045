"""Which node plays which device, and which device a TRAIN reply belongs to (server side)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from flwr.app import Message

from ...experiment import PartitionFacts
from ...methods.base import max_update_bytes, trained_part
from ..local import DeviceFailure, DeviceResult, RoundPlan
from .flwr_compat import ErrorCode
from .wire import MalformedMessage, content_to_result, reply_to_report


@dataclass
class Roster:
    """Which node plays which device, from the nodes' QUERY replies.

    A node is asked once, when it first shows up. A node that names a device already served by
    a connected node waits (`waiting`) and takes the device over when that node leaves; nodes
    whose answer was unusable are not asked again (`refused`). Estimates are keyed by device, so
    they follow a device across restarts whatever node id it comes back with. `reports`: the
    latest partition report (PartitionFacts) each device's node sent with its answer.
    """
    node_device: dict[int, int] = field(default_factory=dict)
    events: list[dict] = field(default_factory=list)
    waiting: dict[int, int] = field(default_factory=dict)
    refused: set[int] = field(default_factory=set)
    served: set[int] = field(default_factory=set)  # devices some node has played in this run
    reports: dict[int, PartitionFacts] = field(default_factory=dict)

    def node_of(self, device: int) -> int | None:
        return next((n for n, d in self.node_device.items() if d == device), None)

    def known(self) -> set[int]:
        return set(self.node_device) | set(self.waiting) | self.refused

    def admit(self, replies: Iterable[Message], num_devices: int, asked: set[int],
              num_labels: int | None = None) -> list[dict]:
        """Take in QUERY replies; returns (and keeps in .events) what went wrong or changed. With
        `num_labels`, a reply's partition report is checked against it and kept in `reports`; a node
        that says it has no usable data ("data-error") is refused with its reason."""
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
                dev, report, data_error = reply_to_report(msg.content, num_labels)
            except MalformedMessage as err:
                self.refused.add(node)
                events.append({"device": None, "kind": "unknown-node", "detail": f"node {node}: {err}"})
                continue
            if data_error is not None:
                self.refused.add(node)
                events.append({"device": dev, "kind": "no-data", "detail": f"node {node}: {data_error}"})
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
                if report is not None:
                    self.reports[dev] = PartitionFacts(*report)
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


def build_roster(replies: Iterable[Message], num_devices: int, asked: set[int],
                 num_labels: int | None = None) -> Roster:
    """Accept each node's device id once; unknown, duplicate or unreadable ids are events."""
    roster = Roster()
    roster.admit(replies, num_devices, asked, num_labels)
    return roster


def wire_bytes(content) -> int:
    """Bytes of the tensor buffers a reply's "update" record carried, whether or not they decode."""
    rec = content.get("update") if hasattr(content, "get") else None
    try:
        return sum(len(a.data) for a in rec.values()) if rec is not None else 0
    except (AttributeError, TypeError):
        return 0


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
            a = rp.assignments[dev]   # an update larger than the plan allows is refused before decoding
            by_device[dev] = content_to_result(msg.content, dev, rp.round,
                                               max_update_bytes(trained_part(a.payload, a.plan)))
            messages[dev] = msg
        except (MalformedMessage, ValueError, TypeError) as err:
            by_device[dev] = DeviceFailure(dev, "malformed", str(err), bytes_up=wire_bytes(msg.content))
    return by_device, events, messages
