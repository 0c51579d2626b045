"""The Flower engine's client side: a ClientApp that plays one device of the fleet.

A node trains on its own data, named by its node config (device_data.py: a file, or a demo
partition of a registered dataset; under Flower's simulation, its partition of the run's
dataset). To a QUERY it answers its device id and its partition report (sample count, label
histogram). A TRAIN message is rebuilt into the Dispatch and run by the local engine's
`run_device`, so training and the fleet's cost model (virtual seconds) are the same code as in
engine/local.py; in measured status it times the training with its own clock (timing.py).
"""

from __future__ import annotations

import os
import time
from dataclasses import replace

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from ...config import Config
from ...data import Encoded
from ...device_data import DataSource, load_device_data, source_from_node_config
from ...devices import RoundTime
from ...errors import UserError
from ...experiment import DeviceExperiment, ModelSource, build_device, facts_of, load_model_source, load_split
from ..local import DeviceFailure, DeviceResult, run_device, status_report
from . import secagg
from .timing import ForwardTimer
from .wire import (DEVICE_ID_KEY, PARTITION_ID_KEY, STATUS_MODES, MalformedMessage, config_from_toml, config_hash,
                   content_labels, content_to_assignment, content_to_query, report_to_content, result_to_content)


def device_id_of(context: Context) -> int:
    """The device this node plays: node config `device-id`, else the simulation's partition-id."""
    for key in (DEVICE_ID_KEY, PARTITION_ID_KEY):
        if key in context.node_config:
            return int(context.node_config[key])
    raise ValueError(f"node config has neither {DEVICE_ID_KEY!r} nor {PARTITION_ID_KEY!r}; "
                     f"start the SuperNode with --node-config '{DEVICE_ID_KEY}=N'")


def source_of(context: Context, cfg: Config) -> DataSource:
    """The node's data source; a simulation node (partition-id, no device-id) plays its partition of the
    run's own dataset, as the in-process engines partition it."""
    nc = context.node_config
    simulated = (int(nc[PARTITION_ID_KEY]), cfg.fleet.devices) if PARTITION_ID_KEY in nc and DEVICE_ID_KEY not in nc \
        else None
    return source_from_node_config(nc, simulated)


class _DeviceSide:
    """Per process: one base model with its host (for one config and label set), and each device's data.

    Why process-global: Flower's Ray backend passes the ClientApp (and so any object its
    closures hold) as an argument of every call, `actor.run.remote(app_fn, message, ...)`,
    so it is unpickled afresh for each message; Context.state only holds records and
    belongs to the node, not to the worker process. Only module state outlives a message
    in the worker. One model slot (not a cache keyed by config): a new config replaces the
    model; the data of the devices this process played (a simulation's actor plays several)
    stay with it, as does the tokenized split their partitions come from.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._cfg: Config | None = None
        self._source: ModelSource | None = None
        self._base: DeviceExperiment | None = None
        self._data: dict[DataSource, tuple[Encoded, list[str]]] = {}
        self._splits: dict[str, object] = {}
        self.builds = 0

    def _config(self, config_toml: str, labels: list[str] | None) -> Config:
        key = (config_hash(config_toml), tuple(labels or ()))
        if key != self._key:
            self._base = self._cfg = self._source = None  # free the old model before loading another
            self._data, self._splits = {}, {}
            self._cfg = config_from_toml(config_toml)
            self._source = load_model_source(self._cfg)
            self._key = key
        return self._cfg

    def _split(self, cfg: Config, source: ModelSource):
        key = cfg.data.model_dump_json()
        if key not in self._splits:
            self._splits[key] = load_split(cfg, source)
        return self._splits[key]

    def data(self, config_toml: str, labels: list[str] | None, context: Context) -> tuple[Encoded, list[str]]:
        """This node's training examples (tokenized) and the label names they are counted in."""
        cfg = self._config(config_toml, labels)
        src = source_of(context, cfg)
        if src not in self._data:
            self._data[src] = load_device_data(src, cfg, self._source, labels, self._split)
        return self._data[src]

    def get(self, config_toml: str, labels: list[str] | None, context: Context, device: int) -> DeviceExperiment:
        data, names = self.data(config_toml, labels, context)
        if self._base is None:
            self._base = build_device(self._cfg, device, self._source, data, names)
            self.builds += 1
        return replace(self._base, device=device, data=data)


_DEVICE_SIDE = _DeviceSide()


def _failed(dev: int, round_: int, detail: str, message: Message) -> Message:
    return Message(result_to_content(DeviceFailure(dev, "rejected", detail), round_), reply_to=message)


def handle_train(message: Message, context: Context) -> Message:
    """A TRAIN message: run the device's round, or say why it cannot."""
    recv_at = time.time()  # measured status only: a real device's wall clock, never a simulation's
    dev = device_id_of(context)
    round_ = -1
    try:
        a, config_toml = content_to_assignment(message.content)
        labels = content_labels(message.content)
        round_ = a.round
        if a.device != dev:
            raise MalformedMessage(f"plan is for device {a.device}, but this node is device {dev}")
        status = str(message.content["plan"].get("status", "fleet"))
        if status not in STATUS_MODES:
            raise MalformedMessage(f"plan's status {status!r} is not one of {STATUS_MODES}")
    except (MalformedMessage, ValueError, TypeError) as err:  # an undecodable payload is malformed too
        return _failed(dev, round_, f"bad TRAIN message: {err}", message)
    try:
        exp = _DEVICE_SIDE.get(config_toml, labels, context, dev)
    except UserError as err:  # its data, or run.device / run.precision this node cannot honour (cuda without a GPU)
        return _failed(dev, round_, f"device {dev}: {err}", message)
    extra = {"worker-pid": os.getpid(), "worker-builds": _DEVICE_SIDE.builds}
    secure = secagg.device_plan(message.content)   # a SecAgg+ round: the update goes masked (secagg.py)
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
    if secure is not None:
        if isinstance(res, DeviceFailure) and res.kind == "dropped":   # gone: SecAgg+ recovers without it
            raise RuntimeError(f"device {dev} {res.detail}")
        return Message(secagg.device_content(secure, exp.cfg.fleet.cutoff_s, a, res, extra), reply_to=message)
    return Message(result_to_content(res, a.round, extra), reply_to=message)


def handle_query(message: Message, context: Context) -> Message:
    """A QUERY: this node's device id and, when the server sends its config and labels, the device's
    partition report (sample count, label histogram) - or, if its data is unusable, why."""
    dev = device_id_of(context)
    try:
        config_toml, labels = content_to_query(message.content)
    except MalformedMessage as err:
        return Message(report_to_content(dev, error=f"bad QUERY message: {err}"), reply_to=message)
    if config_toml is None:
        return Message(report_to_content(dev), reply_to=message)
    try:
        data, names = _DEVICE_SIDE.data(config_toml, labels, context)
    except UserError as err:
        return Message(report_to_content(dev, error=f"device {dev}: {err}"), reply_to=message)
    facts = facts_of(data, len(names))
    return Message(report_to_content(dev, facts.samples, list(facts.label_counts)), reply_to=message)


def make_client_app() -> ClientApp:
    app = ClientApp()
    app.train(mods=[secagg.secagg_mod])(handle_train)   # SecAgg+ rounds only; plain TRAIN messages pass through
    app.query()(handle_query)
    return app
