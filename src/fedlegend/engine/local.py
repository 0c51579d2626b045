"""The in-process round loop on the virtual clock (the default engine).

Round h: plan -> assign -> local training -> status reports -> aggregate; the round lasts
as long as its slowest device (virtual seconds from the fleet's cost model), and every
other device waits for it.

Faults (`finish_round`): a device may drop out (the fleet's draw, `fleet.dropout_rate`), its
update may be rejected, or it may be cut off (`fleet.cutoff_s`: the server closes the round
then). Each counts in the round's time as the server's clock sees it: a rejected reply when it
arrived, a drop-out when the device failed, a cut-off device at the cutoff. Waiting is over the
devices whose update was accepted; no status report (so no estimate update) comes from the others.

The round is split into a server side (`plan_round`, `finish_round`) and a device side
(`run_device`) so that the Flower engine runs exactly the same code across messages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..client import (LocalResult, LocalTrainingError, device_rng, evaluate, planned_batches, planned_shapes,  # noqa: F401
                      planned_work, train_local)
from ..device_cache import CachedRound, frozen_version, record_fields
from ..devices import RoundTime, Work, round_work
from .. import privacy
from ..experiment import Experiment
from ..methods.aggregation import DeviceUpdate
from ..methods.base import (Aggregated, Assignment, Estimate, Estimator, LoraPlan, RoundView, Skip, StatusReport, UpdateRejected,
                            check_update, trained_part)
from ..spec import AdapterState, rejected_bytes, state_bytes


def lr_at(round_: int, rounds: int, lr: float, schedule: str) -> float:
    """Cosine decay over rounds (the paper's schedule) or constant."""
    if schedule == "constant":
        return lr
    return lr * 0.5 * (1.0 + math.cos(math.pi * (round_ - 1) / rounds))


def status_report(device: int, rt: RoundTime, plan: LoraPlan, samples: int, top_forward_s: float = 0.0) -> StatusReport:
    """What a device reports (section 4.3): mu-hat per trained layer, beta-hat per unit rank.

    `top_forward_s`: the part of the forward that grows with the depth (with the device activation
    cache on: the trained span's forward, device_cache.py); it counts with mu, not with t-hat."""
    return StatusReport(device=device, fixed_s=rt.download_s + rt.forward_s - top_forward_s,
                        backward_per_layer_s=(rt.backward_s + top_forward_s) / max(plan.depth, 1),
                        upload_per_rank_s=rt.upload_s / max(sum(plan.ranks.values()), 1), samples=samples)


@dataclass(frozen=True)
class Dispatch:
    """What the server sends one device in one round: the method's assignment, plus the round,
    the device's local steps and the learning rate (the engine's part)."""
    round: int
    assignment: Assignment
    steps: int
    lr: float

    @property
    def device(self) -> int:
        return self.assignment.device

    @property
    def plan(self) -> LoraPlan:
        return self.assignment.plan

    @property
    def payload(self) -> AdapterState:
        return self.assignment.payload

    @property
    def download_bytes(self) -> int:
        return self.assignment.download_bytes


@dataclass
class RoundPlan:
    """The server's side of a round before any device runs: who trains what."""
    round: int
    lr: float
    devices: list[int]
    assignments: dict[int, Dispatch]
    skipped: dict[int, str]  # device -> why it got no plan


@dataclass(frozen=True)
class DeviceResult:
    """What a device returns: its trained tensors and its virtual time and status report."""
    device: int
    local: LocalResult
    time: RoundTime
    report: StatusReport
    cache: dict | None = None   # the device activation cache's row fields (CachedRound.row), when the fleet keeps one


@dataclass(frozen=True)
class DeviceFailure:
    """A device that returned no usable update; `kind` goes into the round's events ("rejected",
    "dropped", ...), `time_s` is the virtual time at which the server learns of it (None: unknown),
    `bytes_up` what its reply put on the wire anyway (an update refused before decoding)."""
    device: int
    kind: str
    detail: str
    time_s: float | None = None
    bytes_up: int = 0


@dataclass
class RoundOutcome:
    state: AdapterState
    record: dict
    reports: list[StatusReport] = field(default_factory=list)


# ------------------------------------------------------------------ server side
def plan_round(exp: Experiment, round_: int, global_state: AdapterState, estimator: Estimator) -> RoundPlan:
    """Ask the method what every device gets this round (no training here)."""
    cfg, fleet = exp.cfg, exp.fleet
    devices = list(range(len(fleet)))
    budgets = {i: fleet.budgets(i, round_, cfg.fleet.round_deadline_s) for i in devices}
    view = RoundView(round_, devices, dict(estimator.estimates), budgets)
    configured = exp.method.configure(view, global_state)
    lr = lr_at(round_, cfg.run.rounds, cfg.train.lr, cfg.train.schedule)
    assignments, skipped = {}, {}
    for dev in devices:
        a = configured.get(dev, Skip("the method gave it no assignment"))
        if isinstance(a, Skip):
            skipped[dev] = a.reason
        else:
            assignments[dev] = Dispatch(round_, a, exp.steps[dev], lr)
    return RoundPlan(round_, lr, devices, assignments, skipped)


def device_row(plan: LoraPlan, res: DeviceResult) -> dict:
    rt = res.time
    return {"id": plan.device, "depth": plan.depth, "layers": plan.layers,
            "ranks": [plan.ranks[l] for l in plan.layers], "time_s": rt.total_s,
            "compute_s": rt.forward_s + rt.backward_s, "comm_s": rt.download_s + rt.upload_s,
            "samples": res.local.samples, "loss": res.local.loss, **(res.cache or {})}


def finish_round(exp: Experiment, rp: RoundPlan, global_state: AdapterState, estimator: Estimator,
                 replies: dict[int, DeviceResult | DeviceFailure], extra_events: list[dict] | None = None,
                 aggregate: Callable[[list[DeviceUpdate]], Aggregated] | None = None) -> RoundOutcome:
    """Validate each device's reply against what it was sent, aggregate, update the estimates.

    A device with an assignment but no reply is recorded as dropped; the round completes
    with what arrived, and with no accepted update the method keeps the global adapter.

    The server's clock: with `fleet.cutoff_s` set, a device whose reply (or failure) comes later
    is cut off (event "cut-off", its work lost) and counts at the cutoff; every other device
    counts at the time its reply or failure reached the server, accepted or not. The round lasts
    until the last of these (the method's own clock instead, if it keeps one: it sees only the
    accepted updates). Fault events carry that virtual time as `time_s`.

    `aggregate` replaces the method's own aggregate over the accepted updates (secure aggregation: the
    server holds only the sum of the devices' contributions, engine/flower/secagg.py).
    """
    updates, reports, rows, events, losses = [], [], [], [], []
    seen_at = []  # the virtual time at which the server heard from (or gave up on) each dispatched device
    cutoff = exp.cfg.fleet.cutoff_s
    bytes_down = bytes_up = 0
    for dev in rp.devices:
        if dev in rp.skipped:
            events.append({"device": dev, "kind": "skipped", "detail": rp.skipped[dev]})
            continue
        a = rp.assignments[dev]
        bytes_down += a.download_bytes  # the payload was sent whatever came back
        reply = replies.get(dev)
        if reply is None:  # the server waits until the cutoff, if there is one
            events.append({"device": dev, "kind": "dropped", "detail": "no reply this round", "time_s": cutoff})
            seen_at.extend([cutoff] if cutoff is not None else [])
            continue
        t = reply.time_s if isinstance(reply, DeviceFailure) else reply.time.total_s
        if cutoff is not None and t is not None and t > cutoff:
            what = (f"it would have failed ({reply.kind}) at {t:.2f} s" if isinstance(reply, DeviceFailure)
                    else f"its round would have taken {t:.2f} s")
            events.append({"device": dev, "kind": "cut-off", "detail": f"not done by the cutoff ({cutoff:g} s): {what}",
                           "time_s": cutoff})
            seen_at.append(cutoff)
            continue
        seen_at.extend([t] if t is not None else [])
        if isinstance(reply, DeviceFailure):
            bytes_up += reply.bytes_up  # a refused upload still went on the wire
            events.append({"device": dev, "kind": reply.kind, "detail": reply.detail, "time_s": t})
            continue
        try:
            check_update(reply.local.state, trained_part(a.payload, a.plan), a.plan)
        except UpdateRejected as err:
            bytes_up += rejected_bytes(reply.local.state)  # uploaded, then rejected: the traffic is spent
            events.append({"device": dev, "kind": "rejected", "detail": str(err), "time_s": t})
            continue
        reports.append(reply.report)
        updates.append(DeviceUpdate(dev, reply.local.state, reply.local.samples, reply.local.loss,
                                    reply.time.total_s))
        losses.append(reply.local.loss)
        bytes_up += state_bytes(reply.local.state)
        rows.append(device_row(a.plan, reply))
    events.extend(extra_events or [])
    agg = aggregate(updates) if aggregate is not None else exp.method.aggregate(rp.round, global_state, updates)
    agg = privacy.server_side(exp, rp, global_state, updates, agg)  # central DP: noise on what is released
    # a synchronous round lasts until the server has heard from (or cut off) every device; the
    # devices that delivered wait for it
    round_time = agg.round_time_s if agg.round_time_s is not None else max(seen_at, default=0.0)
    waits = agg.waiting_s if agg.waiting_s is not None else {r["id"]: round_time - r["time_s"] for r in rows}
    for r in rows:
        r["waiting_s"] = waits[r["id"]]
    for r in reports:
        estimator.observe(r)
    record = {"round": rp.round, "round_time_s": round_time,
              "mean_waiting_s": float(np.mean([r["waiting_s"] for r in rows])) if rows else 0.0,
              "bytes_down": bytes_down, "bytes_up": bytes_up, "lr": rp.lr,
              "train_loss": float(np.mean(losses)) if losses else None,
              "devices": rows, "events": events, **privacy.record_fields(exp.cfg, rp.round),
              **record_fields(exp.fleet.cache, rows)}
    return RoundOutcome(agg.state, record, reports)


# ------------------------------------------------------------------ device side
def device_time(exp: Experiment, a: Dispatch, work: Work, shapes: list[tuple[int, int, int]] | None = None,
                keep: bool = True) -> tuple[RoundTime, CachedRound | None]:
    """The fleet's virtual time of `work` (round_work of `shapes`; None: the planned ones), less the prefix
    forward the device's activation cache serves when the fleet keeps one (device_cache.py; keep=False:
    priced, the cache left as it was, for a device that fails)."""
    caches = exp.fleet.cache
    if caches is None:
        return exp.fleet.time(a.device, a.round, work), None
    data = exp.device_data(a.device)
    priced = caches.price(a.device, exp.spec, a.plan.ranks, planned_batches(exp, a),
                          planned_shapes(exp, a) if shapes is None else shapes, [len(x) for x in data.ids],
                          frozen_version(exp.method.info.residual, a.round), work, keep)
    return exp.fleet.time(a.device, a.round, priced.work), priced


def run_device(exp: Experiment, a: Dispatch,
               local: LocalResult | LocalTrainingError | None = None) -> DeviceResult | DeviceFailure:
    """Local training of one assignment plus the fleet's cost model: virtual time and status report.

    A device the fleet drops out this round does not train: it fails after downloading and a drawn
    share of its compute (DeviceFailure "dropped" with that time). A device whose training fails
    reports it when its planned compute would have ended. `local`: its training already done (batched.py)."""
    cfg, dev = exp.cfg, a.device
    share = exp.fleet.dropout(dev, a.round)
    if share is not None:
        rt, _ = device_time(exp, a, planned_work(exp, a), keep=False)
        return DeviceFailure(dev, "dropped", f"dropped out after {share:.0%} of its local compute, before upload",
                             rt.download_s + share * (rt.forward_s + rt.backward_s))
    try:
        res = local if local is not None else train_local(
                          exp.host, exp.task, a.plan, a.payload, exp.device_data(dev), steps=a.steps,
                          batch_size=cfg.train.batch_size, lr=a.lr, rng=device_rng(exp, a), pad_id=exp.pad_id,
                          weight_decay=cfg.train.weight_decay, max_grad_norm=cfg.train.max_grad_norm,
                          precision=cfg.run.precision, prefix_cache=exp.prefix_cache)
        if isinstance(res, LocalTrainingError):
            raise res
    except LocalTrainingError as err:
        rt, _ = device_time(exp, a, planned_work(exp, a), keep=False)
        return DeviceFailure(dev, "rejected", str(err), rt.download_s + rt.forward_s + rt.backward_s)
    res = privacy.device_side(exp, a, res)  # DP: the update clipped (local DP: noised) before it leaves
    return device_result(exp, a, res)


def device_result(exp: Experiment, a: Dispatch, res: LocalResult) -> DeviceResult:
    """A device's finished local training priced by the fleet's cost model: virtual time and status report."""
    # the server decided the wire size (a device's own method object holds no server state)
    rt, cached = device_time(exp, a, round_work(exp.spec, a.plan.ranks, res.batch_shapes, a.download_bytes,
                                                state_bytes(res.state)), res.batch_shapes)
    if cached is None:
        return DeviceResult(a.device, res, rt, status_report(a.device, rt, a.plan, res.samples))
    top_s = rt.forward_s * cached.top_forward_flops / cached.work.forward_flops   # same device speed
    return DeviceResult(a.device, res, rt, status_report(a.device, rt, a.plan, res.samples, top_s), cached.row())


def run_devices(exp: Experiment, assignments: dict[int, Dispatch], pool=None) -> dict[int, DeviceResult | DeviceFailure]:
    """Every assignment of a round: one device at a time, devices of one layout trained together where
    run.batch_devices asks for it (batched.py), the rest spread over the worker processes of `pool`
    (workers.py; run.workers). The same results within float rounding, the same virtual time."""
    from .. import batched
    # a device the fleet drops out does not train (run_device prices its share); each worker batches its own
    trained = batched.train_round(exp, assignments) if pool is None else pool.train(
        {d: a for d, a in assignments.items() if exp.fleet.dropout(d, a.round) is None})
    replies = {dev: run_device(exp, a, trained.get(dev)) for dev, a in assignments.items()}
    batched.reseed_as_sequential(exp, assignments, trained)
    return replies


# ------------------------------------------------------------------ the local loop
def record_round(exp: Experiment, round_: int, clock: float, state: AdapterState, out: RoundOutcome) -> dict:
    """The round's record on the virtual clock; evaluates every `eval_every` rounds and at the last."""
    cfg = exp.cfg
    rec = {"round": round_, "virtual_time_s": clock, "accuracy": None, "loss": None, **out.record}
    if round_ % cfg.run.eval_every == 0 or round_ == privacy.last_round(cfg):
        score = evaluate(exp.host, exp.task, state, exp.test, cfg.train.eval_batch_size, exp.pad_id,
                         precision=cfg.run.eval_precision or cfg.run.precision)
        rec["accuracy"], rec["loss"] = score.accuracy, score.loss
    return rec


@dataclass
class Snapshot:
    """Everything the local loop carries from one round to the next, after round `round`: with it
    the remaining rounds run exactly as they would have without a stop (every random draw of a
    round is keyed by (seed, device, round), so nothing else needs saving)."""
    round: int
    clock: float
    state: AdapterState
    estimates: dict[int, Estimate]
    method: dict
    records: list[dict]
    devices: dict = field(default_factory=dict)   # the fleet's device activation caches (device_cache.py), if kept


class Server:
    """The server's side of the round loop, shared by every engine: the global adapter, the
    capacity estimates, the virtual clock and the records. An engine asks it for a round's plan,
    delivers the replies however it gets them (in process, Flower messages), and closes the round."""

    def __init__(self, exp: Experiment, resume: Snapshot | None = None):
        self.exp = exp
        self.estimator = Estimator(exp.method.info.rho)
        self.state: AdapterState = exp.initial_state
        self.clock, self.round, self.records = 0.0, 0, []
        if resume is not None:
            rounds = exp.cfg.run.rounds
            if not 1 <= resume.round <= rounds:
                raise ValueError(f"snapshot after round {resume.round} does not fit a run of {rounds} rounds; "
                                 "start the run afresh (without resume)")
            self.state, self.clock, self.round = dict(resume.state), resume.clock, resume.round
            self.records = [dict(r) for r in resume.records]
            self.estimator.estimates = dict(resume.estimates)
            exp.method.load_state_dict(resume.method)
        if exp.fleet.cache is not None:   # the devices' caches: empty at the start, as saved on resume
            exp.fleet.cache.load_state_dict(resume.devices if resume is not None else {})

    def plan(self, round_: int) -> RoundPlan:
        return plan_round(self.exp, round_, self.state, self.estimator)

    def finish(self, rp: RoundPlan, replies: dict[int, DeviceResult | DeviceFailure],
               events: list[dict] | None = None, aggregate=None) -> RoundOutcome:
        """Aggregate the round's replies; the clock advances by the round's virtual time."""
        out = finish_round(self.exp, rp, self.state, self.estimator, replies, events, aggregate)
        self.state = out.state
        self.clock += out.record["round_time_s"]
        return out

    def close(self, round_: int, out: RoundOutcome) -> dict:
        """The round's record (evaluated on evaluation rounds), kept in `records`."""
        rec = record_round(self.exp, round_, self.clock, self.state, out)
        self.records.append(rec)
        self.round = round_
        return rec

    def snapshot(self) -> Snapshot:
        caches = self.exp.fleet.cache
        return Snapshot(self.round, self.clock, self.state, dict(self.estimator.estimates),
                        self.exp.method.state_dict(), list(self.records),
                        caches.state_dict() if caches is not None else {})


def run_local(exp: Experiment, on_record: Callable[[dict], None] | None = None,
              progress: bool = True, resume: Snapshot | None = None,
              on_snapshot: Callable[[Snapshot], None] | None = None) -> tuple[AdapterState, list[dict]]:
    """All rounds, every device trained in this process; evaluates every `eval_every` rounds and at
    the last. Returns the final global adapter and the records.

    `on_snapshot` gets the loop's state after every round (the run folder saves it as a checkpoint);
    `resume` starts after the snapshot's round, replaying its records through `on_record` first."""
    from tqdm.auto import tqdm

    from ..workers import open_pool

    rounds = privacy.last_round(exp.cfg)  # earlier than run.rounds when a fixed noise spends the target epsilon
    server = Server(exp, resume)
    for rec in server.records:
        if on_record:
            on_record(rec)
    bar = tqdm(range(server.round + 1, rounds + 1), desc=exp.method.info.name, unit="round", disable=not progress,
               initial=server.round, total=rounds)
    pool = open_pool(exp) if server.round < rounds else None
    try:
        for h in bar:
            rp = server.plan(h)
            replies = run_devices(exp, rp.assignments, pool)
            rec = server.close(h, server.finish(rp, replies))
            if rec["accuracy"] is not None:
                bar.set_postfix(acc=f"{rec['accuracy']:.3f}", vtime=f"{server.clock:.0f}s")
            if on_record:
                on_record(rec)
            if on_snapshot:
                on_snapshot(server.snapshot())
    finally:
        if pool is not None:
            pool.close()
    return server.state, server.records
