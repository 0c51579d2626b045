"""The Flower engine's client side: a ClientApp that plays one device of the fleet.

It rebuilds the Dispatch from a TRAIN message and calls the local engine's `run_device`,
so training and the fleet's cost model (virtual seconds) are the same code as in
engine/local.py; in measured status it times the training with its own clock (timing.py).
"""

from __future__ import annotations

import os
import time
from dataclasses import replace

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from ...devices import RoundTime
from ...execution import ExecutionError
from ...experiment import Experiment, build_experiment
from ..local import DeviceFailure, DeviceResult, run_device, status_report
from .timing import ForwardTimer
from .wire import (DEVICE_ID_KEY, PARTITION_ID_KEY, STATUS_MODES, MalformedMessage, config_from_toml, config_hash,
                   content_to_assignment, result_to_content)


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
    try:
        exp = _DEVICE_SIDE.get(config_toml)
    except ExecutionError as err:  # run.device / run.precision this node cannot honour (cuda without a GPU)
        return Message(result_to_content(DeviceFailure(dev, "rejected", f"device {dev}: {err}"), round_),
                       reply_to=message)
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
            res = replace(res, time=rt, report=status_report(dev, rt, a.plan, res.local.samples))
        extra.update({"recv-at": recv_at, "done-at": time.time()})
    return Message(result_to_content(res, a.round, extra), reply_to=message)


def handle_query(message: Message, context: Context) -> Message:
    return Message(RecordDict({"reply": ConfigRecord({DEVICE_ID_KEY: device_id_of(context)})}), reply_to=message)


def make_client_app() -> ClientApp:
    app = ClientApp()
    app.train()(handle_train)
    app.query()(handle_query)
    return app
