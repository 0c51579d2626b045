"""Secure aggregation on the Flower engine: a round's updates summed under Flower's SecAgg+.

`privacy.secure_aggregation = true` (`--secagg`). The arithmetic is privacy/secagg.py's: every device
sends its weighted update on the GLOBAL shape plus its per-tensor weights; the server divides the
sums. Here is how the sum travels:

- Server (`SecureRound`): each round runs Flower's own `SecAggPlusWorkflow` (four stages: setup,
  share keys, collect masked vectors, unmask) over the nodes of the round's plans. The workflow is
  written for Flower's legacy strategies; a small collector stands in for one (it names the nodes
  and receives the unmasked sum), and the Grid it is given (`_ProtocolGrid`) adds each device's own
  TRAIN records (payload, plan with the secure-aggregation fields) to the stage that carries the
  fit instructions, keeps that stage's replies and counts every message's bytes. The server never
  sees a device's update: its reply carries the update masked, and only the sum is unmasked.
  Only the global tensors that some plan of the round trains are summed (the plans are public).
- Device (`secagg_mod` around the ClientApp's train function): Flower's `secaggplus_mod` for the
  protocol's messages (others pass through); `device_content` turns the trained update into the
  contribution that the mod quantises and masks. A device that fails its round sends zeros (its
  reply says why, in the clear as always); a device the fleet drops out raises, so SecAgg+ treats
  it as a drop-out (its masks are removed with the other devices' key shares).

Quantisation (Flower's): each value is clipped to [-R, R] (R = privacy.secagg_range; a device whose
contribution exceeds it fails the round instead of being clipped silently) and stochastically rounded
onto 2^q levels, with 2^q the largest power of two such that (devices + 1) * 2^q <= 2^32 (the
modulus): the sum of n devices' values is off by less than n * 2R / 2^q per element, and an average
S / W by about that over W (docs/privacy.md, "Secure aggregation").
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from ...methods.base import Aggregated, UpdateRejected, check_update, trained_part
from ...privacy.secagg import aggregate_sums, contribution, device_weights, largest_value, zero_contribution
from ...spec import AdapterState
from ..local import DeviceFailure, DeviceResult, Dispatch, RoundPlan
from .flwr_compat import (MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, SECAGG_CONFIGS, Code, FitIns, FitRes,
                          LegacyContext, Parameters, SecAggKey, SecAggPlusWorkflow, SecAggStage, Status, WorkflowKey,
                          fitres_to_recorddict, ndarrays_to_parameters, parameters_to_ndarrays, recorddict_to_proto,
                          secaggplus_mod)
from .wire import result_to_content

MODULUS = 2**32            # SecAgg+'s mask modulus (Flower's largest documented value)
THRESHOLD = 0.5            # shares needed to rebuild a secret: half of each node's neighbours (all nodes)
PLAN_KEYS = ("secagg-weight", "secagg-head-weight", "secagg-range", "secagg-keys", "secagg-shapes")


def quantization_range(devices: int) -> int:
    """2^q levels per value: the largest power of two with (devices + 1) * 2^q <= MODULUS, so the sum of
    every device's levels (and of their weight factors, 2^q each) never wraps; at most 2^30 (Flower casts
    levels to int32)."""
    bits = int(np.ceil(np.log2(devices + 1)))
    return 2 ** min(32 - bits, 30)


def error_bound(devices: int, value_range: float) -> float:
    """Largest reconstruction error of one summed element: each device's value is stochastically rounded
    to a grid of step 2R / 2^q, so off by less than one step."""
    return devices * 2.0 * value_range / quantization_range(devices)


def proto_bytes(content: RecordDict) -> int:
    """Bytes of a message's content on the wire (its protobuf serialisation)."""
    return int(recorddict_to_proto(content).ByteSize())


# ------------------------------------------------------------------ device side
def secagg_mod(msg: Message, ctxt: Context, call_next):
    """Flower's secaggplus_mod for the SecAgg+ protocol's TRAIN messages; any other message passes through."""
    if msg.metadata.message_type == MessageType.TRAIN and SECAGG_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


@dataclass(frozen=True)
class DevicePlan:
    """What the plan tells a device about its contribution: its weights, the quantisation range and the
    global adapter's keys and shapes (it holds only its own slice)."""
    weight: float
    head_weight: float
    value_range: float
    shapes: dict[str, tuple[int, ...]]


def plan_fields(weight: float, head_weight: float, value_range: float, global_state: AdapterState) -> dict:
    keys = sorted(global_state)
    return {"secagg-weight": float(weight), "secagg-head-weight": float(head_weight),
            "secagg-range": float(value_range), "secagg-keys": keys,
            "secagg-shapes": [",".join(str(n) for n in global_state[k].shape) for k in keys]}


def device_plan(content: RecordDict) -> DevicePlan | None:
    """The plan's secure-aggregation fields (None: a plain round)."""
    plan = content.get("plan") if isinstance(content, RecordDict) else None
    if not isinstance(plan, ConfigRecord) or "secagg-keys" not in plan:
        return None
    keys, shapes = list(plan["secagg-keys"]), list(plan["secagg-shapes"])
    if len(keys) != len(shapes):
        raise ValueError(f"plan names {len(keys)} secagg keys but {len(shapes)} shapes")
    return DevicePlan(float(plan["secagg-weight"]), float(plan["secagg-head-weight"]), float(plan["secagg-range"]),
                      {k: tuple(int(n) for n in s.split(",") if n) for k, s in zip(keys, shapes)})


def device_content(sp: DevicePlan, cutoff_s: float | None, a: Dispatch, res: DeviceResult | DeviceFailure,
                   extra: dict | None = None) -> RecordDict:
    """A device's reply in a secure round: its numbers in the clear (as in a plain round, without the update)
    and, as the FitRes that secaggplus_mod masks, its contribution on the global shape. A device with nothing
    to give (failed, update that fails its own check, past the cutoff, a value beyond the range) sends zeros
    and says why."""
    shapes = {k: torch.empty(s) for k, s in sp.shapes.items()}
    vector = None
    if isinstance(res, DeviceResult):
        why = None
        try:
            check_update(res.local.state, trained_part(a.payload, a.plan), a.plan)
        except UpdateRejected as err:
            why = str(err)
        if why is None and cutoff_s is not None and res.time.total_s > cutoff_s:
            vector = zero_contribution(shapes)   # the server cuts it off by its reported time: not in the sum
        if why is None and vector is None:
            vector = contribution(shapes, res.local.state, sp.weight, sp.head_weight)
            top = largest_value(vector)
            if top > sp.value_range:
                why = (f"a value of its weighted update ({top:.3g}) is beyond the secure-aggregation range "
                       f"+-{sp.value_range:g} (privacy.secagg_range)")
        if why is not None:
            res, vector = DeviceFailure(a.device, "rejected", why), None
    if vector is None:
        vector = zero_contribution(shapes)
    if isinstance(res, DeviceResult):   # the update itself never leaves the device in the clear
        res = replace(res, local=replace(res.local, state={}))
    content = result_to_content(res, a.round, extra)
    fit = fitres_to_recorddict(FitRes(Status(Code.OK, ""), ndarrays_to_parameters(vector), 1, {}), False)
    for name, rec in fit.items():
        content[name] = rec
    return content


# ------------------------------------------------------------------ server side
class _Proxy:
    """All the workflow asks of a legacy ClientProxy: its node id."""

    def __init__(self, node_id: int) -> None:
        self.node_id = node_id


class _Collector:
    """Stands in for the legacy Strategy and ClientManager the workflow calls: it names the round's nodes
    (empty fit instructions: the Grid adds each device's own records) and receives the unmasked result."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes
        self.mean: list[np.ndarray] | None = None
        self.count = 0

    def num_available(self) -> int:
        return len(self.nodes)

    def configure_fit(self, server_round, parameters, client_manager):
        return [(_Proxy(n), FitIns(Parameters([], "numpy.ndarray"), {})) for n in self.nodes]

    def aggregate_fit(self, server_round, results, failures):
        # every device gave weight 1 (FitRes.num_examples = max_weight = 1): the workflow's weighted mean is
        # the sum over the len(results) vectors it unmasked, divided by their count
        self.count = len(results)
        if results:
            self.mean = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}


class _ProtocolGrid:
    """The Grid the workflow talks through: adds each device's TRAIN records to the stage that trains,
    keeps that stage's replies, and counts bytes per node (protobuf size of each message's content)."""

    def __init__(self, grid, contents: dict[int, RecordDict]) -> None:
        self.grid, self.contents = grid, contents
        self.down: dict[int, int] = defaultdict(int)     # protocol bytes to each node (not the payload)
        self.up: dict[int, int] = defaultdict(int)       # protocol bytes from each node (not the masked vector)
        self.masked: dict[int, int] = defaultdict(int)   # bytes of each node's masked vector
        self.train_messages: dict[int, Message] = {}
        self.train_replies: list[Message] = []
        self.stages: list[str] = []

    def __getattr__(self, name: str):
        return getattr(self.grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        stage = str(messages[0].content.config_records[SECAGG_CONFIGS][SecAggKey.STAGE]) if messages else ""
        self.stages.append(stage)
        training = stage == SecAggStage.COLLECT_MASKED_VECTORS
        for m in messages:
            node = m.metadata.dst_node_id
            self.down[node] += proto_bytes(RecordDict({SECAGG_CONFIGS: m.content.config_records[SECAGG_CONFIGS]}))
            if training:
                for name in ("payload", "plan"):
                    m.content[name] = self.contents[node][name]
                self.train_messages[node] = m
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for r in replies:
            if r.has_error():
                continue
            node = r.metadata.src_node_id
            cfg = r.content.config_records.get(SECAGG_CONFIGS)
            if cfg is None:
                continue
            if training:
                self.masked[node] += sum(len(b) for b in cfg.get(SecAggKey.MASKED_PARAMETERS, []))
            else:
                self.up[node] += proto_bytes(RecordDict({SECAGG_CONFIGS: cfg}))
        if training:
            self.train_replies = replies
        return replies


@dataclass
class SecureRound:
    """One round under SecAgg+: run it (`run`), then the strategy maps `replies` to devices as in a plain
    round, `accepted` gives the accepted devices a stand-in update (the plan's shapes, zeros: the server
    never sees the real one), `aggregate` divides the sums, `account` writes the round's traffic."""
    rp: RoundPlan
    global_state: AdapterState
    weights: dict[int, tuple[float, float]]
    value_range: float
    replies: list[Message] = field(default_factory=list)
    sums: list[np.ndarray] | None = None
    halted: str | None = None
    grid: _ProtocolGrid | None = None

    @classmethod
    def plan(cls, exp, rp: RoundPlan, global_state: AdapterState) -> "SecureRound":
        samples = {dev: exp.facts[dev].samples for dev in rp.assignments}
        return cls(rp, global_state, device_weights(exp.method, samples), exp.cfg.privacy.secagg_range)

    @property
    def summed(self) -> AdapterState:
        """The global tensors the round's contributions cover: those some plan trains (public). A tensor no
        device trains this round (FFA-LoRA's frozen A, LEGEND's layers below every plan) is not sent."""
        keys = set()
        for a in self.rp.assignments.values():
            keys.update(trained_part(a.payload, a.plan))
        return {k: self.global_state[k] for k in sorted(keys)}

    def add_fields(self, dev: int, content: RecordDict) -> None:
        w, h = self.weights[dev]
        for k, v in plan_fields(w, h, self.value_range, self.summed).items():
            content["plan"][k] = v

    def run(self, grid, contents: dict[int, RecordDict], round_: int, timeout: float | None) -> None:
        """The four SecAgg+ stages over `contents`' nodes (node -> that device's TRAIN records)."""
        nodes = sorted(contents)
        self.grid = _ProtocolGrid(grid, contents)
        if len(nodes) < 2:
            self.halted = f"{len(nodes)} device(s) to aggregate; SecAgg+ needs at least 2"
            return
        workflow = SecAggPlusWorkflow(num_shares=1.0, reconstruction_threshold=THRESHOLD, max_weight=1.0,
                                      clipping_range=float(self.value_range),
                                      quantization_range=quantization_range(len(nodes)), modulus_range=MODULUS,
                                      timeout=timeout)
        ctx = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
        ctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: int(round_)})
        ctx.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
        collector = _Collector(nodes)
        workflow(self.grid, LegacyContext(ctx, strategy=collector, client_manager=collector))
        self.replies = self.grid.train_replies
        if collector.mean is None:
            self.halted = (f"SecAgg+ halted after stage {self.grid.stages[-1] if self.grid.stages else 'none'} "
                           "(too few devices answered to rebuild the masks); no update this round")
            return
        self.sums = [np.asarray(m, dtype=np.float64) * collector.count for m in collector.mean]

    def accepted(self, by_device: dict) -> dict:
        """The devices' results with a stand-in state of their plan's shapes (zeros) for the server's checks
        and DP's bookkeeping (which tensors each device trained); nobody is accepted if the protocol halted."""
        out = {}
        for dev, res in by_device.items():
            if isinstance(res, DeviceResult):
                if self.halted:
                    res = DeviceFailure(dev, "failed", self.halted)
                else:
                    a = self.rp.assignments[dev]
                    stand_in = {k: torch.zeros_like(v) for k, v in trained_part(a.payload, a.plan).items()}
                    res = replace(res, local=replace(res.local, state=stand_in))
            out[dev] = res
        return out

    def aggregate(self, updates) -> Aggregated:
        if self.sums is None or not updates:
            return Aggregated(dict(self.global_state))
        held = 0.5 * min(min(w) for w in self.weights.values())
        return Aggregated({**self.global_state, **aggregate_sums(self.summed, self.sums, held)})

    def account(self, record: dict, node_of: dict[int, int]) -> None:
        """The round's traffic as it went on the wire: bytes_up = the masked vectors plus the protocol's
        replies, bytes_down += the protocol's messages; `secagg` itemises it, with what the accepted devices'
        plain updates would have been."""
        g = self.grid
        nodes = set(node_of.values())
        masked = sum(g.masked.get(n, 0) for n in nodes) if g else 0
        up = sum(g.up.get(n, 0) for n in nodes) if g else 0
        down = sum(g.down.get(n, 0) for n in nodes) if g else 0
        plain = sum(int(sum(t.numel() * t.element_size()
                            for t in trained_part(self.rp.assignments[d["id"]].payload,
                                                  self.rp.assignments[d["id"]].plan).values()))
                    for d in record["devices"])
        record["bytes_up"] = masked + up
        record["bytes_down"] += down
        record["secagg"] = {"masked_bytes_up": masked, "protocol_bytes_up": up, "protocol_bytes_down": down,
                            "plain_bytes_up": plain, "devices": len(node_of),
                            "max_error": error_bound(len(node_of), self.value_range)}
