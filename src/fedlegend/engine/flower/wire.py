"""The Flower engine's wire format: what a device is sent and what it answers (pure functions).

Keys of the RecordDicts:
  TRAIN  server -> node: "payload" ArrayRecord, "plan" ConfigRecord
         node -> server: "update" ArrayRecord, "metrics" MetricRecord, "reply" ConfigRecord
  QUERY  server -> node: "query" ConfigRecord;  node -> server: "reply" ConfigRecord (device-id)
A measured reply's "metrics" also carry STAMP_KEYS (timing.py); a simulated device's, the
worker process it ran in ("worker-pid", "worker-builds").
"""

from __future__ import annotations

import hashlib
import math
import tomllib

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from ...client import LocalResult
from ...config import Config, build_config
from ...devices import RoundTime
from ...methods.base import Assignment, LoraPlan, StatusReport
from ...spec import AdapterState, state_bytes
from ..local import DeviceFailure, DeviceResult, Dispatch


DEVICE_ID_KEY = "device-id"        # node config key naming the device a SuperNode plays
PARTITION_ID_KEY = "partition-id"  # what Flower's simulation puts in each node's config
TIME_KEYS = ("download_s", "forward_s", "backward_s", "upload_s")
REPORT_KEYS = ("fixed_s", "backward_per_layer_s", "upload_per_rank_s")
STATUS_MODES = ("fleet", "measured")
STAMP_KEYS = ("recv-at", "done-at")  # a measured reply's wall-clock stamps (device clock, seconds since epoch)


class MalformedMessage(ValueError):
    """A message whose records do not follow the wire format above."""


def state_to_record(state: AdapterState) -> ArrayRecord:
    return ArrayRecord({k: t.detach().contiguous() for k, t in state.items()})


def record_to_state(rec: ArrayRecord) -> AdapterState:
    # np.array copies: the decoded buffers are read-only and torch wants writable memory
    return {k: torch.from_numpy(np.array(a.numpy())) for k, a in rec.items()}


def config_hash(config_toml: str) -> str:
    return hashlib.sha256(config_toml.encode()).hexdigest()[:16]


def config_from_toml(config_toml: str) -> Config:
    return build_config(tomllib.loads(config_toml), source="the server's config")


def assignment_to_content(a: Dispatch, config_toml: str, status: str = "fleet") -> RecordDict:
    """What one device receives: its adapter slice, its plan, and the experiment's config."""
    plan = ConfigRecord({DEVICE_ID_KEY: a.device, "round": a.round, "status": status, "layers": a.plan.layers,
                         "ranks": [a.plan.ranks[l] for l in a.plan.layers], "lr": float(a.lr), "steps": a.steps,
                         "frozen": ",".join(a.plan.frozen),   # e.g. FFA-LoRA's lora_A
                         # the wire size the server's method decided (FLoRA: stacks, not dense weights)
                         "download-bytes": int(a.download_bytes),
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


def content_to_assignment(content: RecordDict) -> tuple[Dispatch, str]:
    """The Dispatch and config TOML of a TRAIN message; MalformedMessage if it does not parse."""
    plan = _record(content, "plan", ConfigRecord)
    layers, ranks = _get(plan, "layers", list, "plan"), _get(plan, "ranks", list, "plan")
    if not layers or len(layers) != len(ranks):
        raise MalformedMessage(f"plan has {len(layers)} layers but {len(ranks)} ranks")
    config_toml = _get(plan, "config", str, "plan")
    if _get(plan, "config-hash", str, "plan") != config_hash(config_toml):
        raise MalformedMessage("plan's config does not match its hash")
    dev = _get(plan, DEVICE_ID_KEY, int, "plan")
    frozen = tuple(p for p in str(plan.get("frozen", "")).split(",") if p)
    lora = LoraPlan(dev, {int(l): int(r) for l, r in zip(layers, ranks)}, frozen)
    payload = record_to_state(_record(content, "payload", ArrayRecord))
    down = int(plan.get("download-bytes", -1))
    a = Dispatch(_get(plan, "round", int, "plan"), Assignment(lora, payload, state_bytes(payload) if down < 0 else down),
                 _get(plan, "steps", int, "plan"), float(_get(plan, "lr", (int, float), "plan")))
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
