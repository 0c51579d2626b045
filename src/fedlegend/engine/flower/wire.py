"""The Flower engine's wire format: what a device is sent and what it answers (pure functions).

Keys of the RecordDicts:
  TRAIN  server -> node: "payload" ArrayRecord, "plan" ConfigRecord (with the config, without data paths,
                         and the label names of the server's test set)
         node -> server: "update" ArrayRecord, "metrics" MetricRecord, "reply" ConfigRecord (with BATCH_KEYS)
  QUERY  server -> node: "query" ConfigRecord (num-devices, config, labels)
         node -> server: "reply" ConfigRecord: device-id and the device's partition report (samples,
                         label-counts: all it says about its data), or data-error (why it has none)
A measured reply's "metrics" also carry STAMP_KEYS (timing.py); a simulated device's, the
worker process it ran in ("worker-pid", "worker-builds"). A device that fails answers only a
"reply" with status "failed", its "detail", "kind" (FAILURE_KINDS) and, if known, "time-s": the
virtual time at which it failed (a drop-out's).

Decoding never trusts a message: `content_to_assignment` and `content_to_result` raise
MalformedMessage (a ValueError) for a missing or mistyped record or value, an array that does
not decode to a numeric tensor of its declared dtype and shape, and absurd numbers (negative or
non-finite times, counts beyond MAX_COUNT, seconds beyond MAX_SECONDS, ranks < 1, repeated
layers); no other exception comes out of them. The update's keys, shapes, ranks, dtype and
size are then checked against what was sent (methods.base.check_update, in finish_round).
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
# a reply's training steps for the cost model (client.step_shape): batch size, padded width, and the
# positions per sequence at which the output layer ran (in [1, width]; lists of equal length)
BATCH_KEYS = ("batch-sizes", "batch-widths", "batch-outputs")
STATUS_MODES = ("fleet", "measured")
FAILURE_KINDS = ("rejected", "dropped")  # what a device may say of its own failure (anything else: rejected)
STAMP_KEYS = ("recv-at", "done-at")  # a measured reply's wall-clock stamps (device clock, seconds since epoch)


MAX_COUNT = 2**31 - 1      # the most samples, steps, layers, ranks, bytes or batch entries a message may name
MAX_SECONDS = 1e9          # the longest time a reply may report (about 32 years)
ARRAY_KINDS = "biufc"      # numpy dtype kinds a tensor may have: bool, int, uint, float, complex


class MalformedMessage(ValueError):
    """A message whose records do not follow the wire format above."""


def state_to_record(state: AdapterState) -> ArrayRecord:
    return ArrayRecord({k: t.detach().contiguous() for k, t in state.items()})


def _decode_array(key: str, a) -> torch.Tensor:
    """One Array as a writable torch tensor of its declared dtype and shape, or MalformedMessage."""
    try:
        arr = a.numpy()
    except Exception as err:  # np.load on foreign bytes raises ValueError, OSError, EOFError, UnpicklingError ...
        raise MalformedMessage(f"array {key!r} does not decode ({type(err).__name__}: {err})") from None
    if not isinstance(arr, np.ndarray):
        raise MalformedMessage(f"array {key!r} decodes to a {type(arr).__name__}, not an array")
    if arr.dtype.kind not in ARRAY_KINDS or not arr.dtype.isnative or arr.dtype.hasobject:
        raise MalformedMessage(f"array {key!r} has dtype {arr.dtype.str}, not a native numeric one")
    if str(arr.dtype) != str(a.dtype) or tuple(arr.shape) != tuple(a.shape):
        raise MalformedMessage(f"array {key!r} holds {arr.dtype} {tuple(arr.shape)} but declares "
                               f"{a.dtype} {tuple(a.shape)}")
    try:
        # np.array copies: the decoded buffers are read-only and torch wants writable memory
        return torch.from_numpy(np.array(arr))
    except (TypeError, ValueError, RuntimeError) as err:   # a dtype torch has no tensor of
        raise MalformedMessage(f"array {key!r} ({arr.dtype}) is no torch tensor: {err}") from None


def record_to_state(rec: ArrayRecord) -> AdapterState:
    """The tensors of an ArrayRecord; MalformedMessage if one is not a numeric array of its declared dtype/shape."""
    if not isinstance(rec, ArrayRecord):
        raise MalformedMessage(f"expected an ArrayRecord, got a {type(rec).__name__}")
    return {str(k): _decode_array(str(k), a) for k, a in rec.items()}


def config_hash(config_toml: str) -> str:
    return hashlib.sha256(config_toml.encode()).hexdigest()[:16]


def config_from_toml(config_toml: str) -> Config:
    return build_config(tomllib.loads(config_toml), source="the server's config")


def assignment_to_content(a: Dispatch, config_toml: str, status: str = "fleet",
                          labels: list[str] | None = None) -> RecordDict:
    """What one device receives: its adapter slice, its plan, the experiment's config and (if given)
    the server's label names, onto which a device maps its own data's labels."""
    plan = ConfigRecord({**({"labels": list(labels)} if labels else {}),DEVICE_ID_KEY: a.device, "round": a.round, "status": status, "layers": a.plan.layers,
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


def _count(value, what: str, low: int = 0, high: int = MAX_COUNT) -> int:
    """An integer count within [low, high] (a float only if integral), else MalformedMessage."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MalformedMessage(f"{what} is {type(value).__name__}, expected an integer")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise MalformedMessage(f"{what} = {value!r} is not an integer")
    if not low <= value <= high:
        raise MalformedMessage(f"{what} = {value!r} is outside [{low}, {high}]")
    return int(value)


def _int_list(rec, key: str, where: str, low: int = 0, default: list | None = None) -> list[int]:
    if default is not None and key not in rec:
        return default
    values = _get(rec, key, list, where)
    return [_count(v, f"{where}[{key!r}] entry", low) for v in values]


def _record(content: RecordDict, key: str, kind: type):
    rec = content.get(key)
    if not isinstance(rec, kind):
        raise MalformedMessage(f"message lacks the {kind.__name__} {key!r}")
    return rec


def content_to_assignment(content: RecordDict) -> tuple[Dispatch, str]:
    """The Dispatch and config TOML of a TRAIN message; MalformedMessage if it does not parse."""
    if not isinstance(content, RecordDict):
        raise MalformedMessage(f"message content is a {type(content).__name__}, not a RecordDict")
    plan = _record(content, "plan", ConfigRecord)
    layers, ranks = _int_list(plan, "layers", "plan"), _int_list(plan, "ranks", "plan", low=1)
    if not layers or len(layers) != len(ranks):
        raise MalformedMessage(f"plan has {len(layers)} layers but {len(ranks)} ranks")
    if len(set(layers)) != len(layers):
        raise MalformedMessage(f"plan names a layer twice: {layers}")
    config_toml = _get(plan, "config", str, "plan")
    if _get(plan, "config-hash", str, "plan") != config_hash(config_toml):
        raise MalformedMessage("plan's config does not match its hash")
    dev = _count(_get(plan, DEVICE_ID_KEY, int, "plan"), "plan's device id")
    frozen = tuple(p for p in _get(plan, "frozen", str, "plan").split(",") if p) if "frozen" in plan else ()
    lora = LoraPlan(dev, dict(zip(layers, ranks)), frozen)
    payload = record_to_state(_record(content, "payload", ArrayRecord))
    down = _count(_get(plan, "download-bytes", int, "plan"), "plan's download-bytes") if "download-bytes" in plan else -1
    lr = float(_get(plan, "lr", (int, float), "plan"))
    if not (math.isfinite(lr) and lr >= 0):   # 0: the cosine schedule's end
        raise MalformedMessage(f"plan's lr = {lr!r} is negative or not finite")
    a = Dispatch(_count(_get(plan, "round", int, "plan"), "plan's round"),
                 Assignment(lora, payload, state_bytes(payload) if down < 0 else down),
                 _count(_get(plan, "steps", int, "plan"), "plan's steps"), lr)
    return a, config_toml


def content_labels(content: RecordDict, record: str = "plan") -> list[str] | None:
    """The server's label names in a TRAIN plan (or a QUERY's "query"); None if it names none."""
    rec = content.get(record) if isinstance(content, RecordDict) else None
    if not isinstance(rec, ConfigRecord) or "labels" not in rec:
        return None
    labels = _get(rec, "labels", list, record)
    if len(labels) < 2 or not all(isinstance(x, str) for x in labels) or len(set(labels)) != len(labels):
        raise MalformedMessage(f"{record}'s labels must be two or more distinct names, got {labels!r}")
    return list(labels)


def query_content(num_devices: int, config_toml: str | None = None, labels: list[str] | None = None) -> RecordDict:
    """The QUERY a server sends a new node: which device do you play, and what is your partition?"""
    q = {"num-devices": num_devices}
    if config_toml is not None:
        q.update({"config": config_toml, "config-hash": config_hash(config_toml)})
    if labels:
        q["labels"] = list(labels)
    return RecordDict({"query": ConfigRecord(q)})


def content_to_query(content: RecordDict) -> tuple[str | None, list[str] | None]:
    """(config TOML, label names) of a QUERY; (None, None) from a server that asks only for the device id."""
    q = _record(content, "query", ConfigRecord)
    if "config" not in q:
        return None, None
    config_toml = _get(q, "config", str, "query")
    if _get(q, "config-hash", str, "query") != config_hash(config_toml):
        raise MalformedMessage("query's config does not match its hash")
    return config_toml, content_labels(content, "query")


def report_to_content(device: int, samples: int | None = None, label_counts: list[int] | None = None,
                      error: str | None = None) -> RecordDict:
    """A node's QUERY reply: its device id and partition report (or why it has no data)."""
    reply: dict = {DEVICE_ID_KEY: device}
    if error is not None:
        reply["data-error"] = error
    elif samples is not None:
        reply.update({"samples": int(samples), "label-counts": [int(c) for c in label_counts or []]})
    return RecordDict({"reply": ConfigRecord(reply)})


def reply_to_report(content: RecordDict, num_labels: int | None
                    ) -> tuple[int, tuple[int, tuple[int, ...]] | None, str | None]:
    """(device id, (samples, label counts) or None, data error or None) of a QUERY reply; MalformedMessage
    if the report is inconsistent (counts of another label set, or not summing to the samples).
    `num_labels` None: the device id (and a data error) only."""
    reply = _record(content, "reply", ConfigRecord)
    dev = _get(reply, DEVICE_ID_KEY, int, "reply")
    if "data-error" in reply:
        return dev, None, str(_get(reply, "data-error", str, "reply"))
    if "samples" not in reply or num_labels is None:
        return dev, None, None
    samples = _count(_get(reply, "samples", int, "reply"), "reply's samples", low=1)
    counts = _int_list(reply, "label-counts", "reply")
    if len(counts) != num_labels or sum(counts) != samples:
        raise MalformedMessage(f"reply's label-counts {counts} are not {num_labels} counts summing to its "
                               f"{samples} samples")
    return dev, (samples, tuple(counts)), None


def result_to_content(res: DeviceResult | DeviceFailure, round_: int, extra: dict | None = None) -> RecordDict:
    """A device's reply: its update and numbers, echoing its device id and the round."""
    if isinstance(res, DeviceFailure):
        failed = {DEVICE_ID_KEY: res.device, "round": round_, "status": "failed", "detail": res.detail, "kind": res.kind}
        if res.time_s is not None:  # the virtual time at which it failed (a drop-out's)
            failed["time-s"] = float(res.time_s)
        return RecordDict({"reply": ConfigRecord(failed)})
    metrics = {"samples": res.local.samples, "loss": float(res.local.loss),
               **{k: float(getattr(res.time, k)) for k in TIME_KEYS},
               **{k: float(getattr(res.report, k)) for k in REPORT_KEYS}, **(extra or {})}
    shapes = res.local.batch_shapes
    reply = ConfigRecord({DEVICE_ID_KEY: res.device, "round": round_, "status": "ok",
                          "batch-sizes": [int(b) for b, _, _ in shapes], "batch-widths": [int(w) for _, w, _ in shapes],
                          "batch-outputs": [int(o) for _, _, o in shapes]})
    return RecordDict({"update": state_to_record(res.local.state), "metrics": MetricRecord(metrics), "reply": reply})


def content_to_result(content: RecordDict, device: int, round_: int,
                      max_update_bytes: int | None = None) -> DeviceResult | DeviceFailure:
    """Parse and sanity-check the reply of `device` for `round_`; MalformedMessage if it is not one.

    Keys, shapes, ranks, dtypes, size and NaN of the update are checked later against what was
    sent (check_update); `max_update_bytes`, if given, rejects a larger update before decoding it.
    """
    if not isinstance(content, RecordDict):
        raise MalformedMessage(f"message content is a {type(content).__name__}, not a RecordDict")
    reply = _record(content, "reply", ConfigRecord)
    echoed = _get(reply, DEVICE_ID_KEY, int, "reply")
    if echoed != device:
        raise MalformedMessage(f"reply names device {echoed}, but the node serves device {device}")
    if _get(reply, "round", int, "reply") != round_:
        raise MalformedMessage(f"reply is for round {reply['round']}, not {round_}")
    status = _get(reply, "status", str, "reply")
    if status == "failed":
        kind = reply.get("kind", "rejected")
        t = _get(reply, "time-s", (int, float), "reply") if "time-s" in reply else None
        if t is not None and not (math.isfinite(t) and 0 <= t <= MAX_SECONDS):
            raise MalformedMessage(f"reply's time-s = {t!r} is negative, not finite or beyond {MAX_SECONDS:g}")
        return DeviceFailure(device, kind if kind in FAILURE_KINDS else "rejected",
                             str(reply.get("detail", "local training failed")), None if t is None else float(t))
    if status != "ok":
        raise MalformedMessage(f"reply status {status!r} is neither 'ok' nor 'failed'")
    metrics = _record(content, "metrics", MetricRecord)
    nums = {k: _get(metrics, k, (int, float), "metrics") for k in ("samples", "loss", *TIME_KEYS, *REPORT_KEYS)}
    bad = [k for k, v in nums.items() if not math.isfinite(v) or (k != "loss" and v < 0) or abs(v) > MAX_SECONDS]
    if bad:
        raise MalformedMessage(f"metrics {bad} are negative, not finite or beyond {MAX_SECONDS:g}")
    samples = _count(nums["samples"], "metrics' samples")
    sizes, widths, outputs = (_int_list(reply, k, "reply", default=[]) for k in BATCH_KEYS)
    if not len(sizes) == len(widths) == len(outputs):
        raise MalformedMessage(f"reply has {len(sizes)} batch sizes, {len(widths)} batch widths and "
                               f"{len(outputs)} batch outputs")
    bad = next((j for j, (w, o) in enumerate(zip(widths, outputs)) if not 1 <= o <= w), None)
    if bad is not None:
        raise MalformedMessage(f"reply's batch-outputs[{bad}] = {outputs[bad]} is outside [1, its batch width "
                               f"{widths[bad]}]")
    rec = _record(content, "update", ArrayRecord)
    if max_update_bytes is not None:
        size = sum(len(a.data) for a in rec.values())
        if size > max_update_bytes + 128 * len(rec):   # + the .npy header of each array
            raise MalformedMessage(f"update of {size} bytes; its plan allows at most {max_update_bytes}")
    state = record_to_state(rec)
    local = LocalResult(state, samples, float(nums["loss"]), list(zip(sizes, widths, outputs)))
    rt = RoundTime(*(float(nums[k]) for k in TIME_KEYS))
    report = StatusReport(device, *(float(nums[k]) for k in REPORT_KEYS), samples=samples)
    return DeviceResult(device, local, rt, report)


def worker_of(msg: Message) -> tuple[int, int] | None:
    """(process id, model builds in that process) a simulated device reports, if it does."""
    if msg.has_error() or not isinstance(m := msg.content.get("metrics"), MetricRecord):
        return None
    pid, builds = m.get("worker-pid"), m.get("worker-builds")
    return (int(pid), int(builds)) if isinstance(pid, int) and isinstance(builds, int) else None


def reply_to_device_id(content: RecordDict) -> int:
    return _get(_record(content, "reply", ConfigRecord), DEVICE_ID_KEY, int, "reply")
