"""Measured status: a device's times from real clocks instead of the fleet's cost model.

Status (what a device's times and its status report are made of), the plan's "status":
  fleet     the fleet's cost model (virtual seconds), as the local engine; the simulation's only mode
  measured  on real machines: the device times its forward passes and the rest of its local
            training with its own clock (time.perf_counter), and stamps when it got the message
            and when its reply was ready (time.time); the server adds when it sent the message
            and when the reply arrived (TimedGrid), and derives download and upload
            (measured_round_time).
"""

from __future__ import annotations

import math
import time
from typing import Iterable

import torch
from flwr.app import Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from ...devices import RoundTime
from .wire import STAMP_KEYS, MalformedMessage


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
