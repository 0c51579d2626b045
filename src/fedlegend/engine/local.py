"""The in-process round loop on the virtual clock (the default engine).

Round h: plan -> assign -> local training -> status reports -> aggregate; the round lasts
as long as its slowest device (virtual seconds from the fleet's cost model), and every
other device waits for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..client import LocalTrainingError, evaluate, local_steps_for, train_local
from ..devices import RoundTime, round_work
from ..experiment import Experiment
from ..lora import AdapterState, state_bytes
from ..methods.base import DeviceUpdate, Estimator, StatusReport, UpdateRejected, check_update


def lr_at(round_: int, rounds: int, lr: float, schedule: str) -> float:
    """Cosine decay over rounds (the paper's schedule) or constant."""
    if schedule == "constant":
        return lr
    return lr * 0.5 * (1.0 + math.cos(math.pi * (round_ - 1) / rounds))


def status_report(device: int, rt: RoundTime, depth: int, rank_sum: int, samples: int) -> StatusReport:
    """What a device reports (section 4.3): mu-hat per trained layer, beta-hat per unit rank."""
    return StatusReport(device=device, fixed_s=rt.download_s + rt.forward_s,
                        backward_per_layer_s=rt.backward_s / max(depth, 1),
                        upload_per_rank_s=rt.upload_s / max(rank_sum, 1), samples=samples)


@dataclass
class RoundOutcome:
    state: AdapterState
    record: dict
    reports: list[StatusReport] = field(default_factory=list)


def run_round(exp: Experiment, round_: int, global_state: AdapterState, estimator: Estimator) -> RoundOutcome:
    cfg, method, fleet = exp.cfg, exp.method, exp.fleet
    devices = list(range(len(fleet)))
    budgets = {i: fleet.budgets(i, round_, cfg.fleet.round_deadline_s) for i in devices}
    plans = method.plan(round_, devices, dict(estimator.estimates), budgets)
    lr = lr_at(round_, cfg.run.rounds, cfg.train.lr, cfg.train.schedule)
    updates, reports, rows, events, losses = [], [], [], [], []
    bytes_down = bytes_up = 0
    for dev in devices:
        plan = plans.get(dev)
        if plan is None:
            events.append({"device": dev, "kind": "skipped", "detail": "no feasible plan this round"})
            continue
        payload = method.assign(global_state, plan)
        data = exp.device_data(dev)
        steps = local_steps_for(len(data), cfg.train.batch_size, cfg.train.local_steps, cfg.train.local_epochs)
        rng = np.random.default_rng([cfg.run.seed, 3, dev, round_])
        down = state_bytes(payload)
        try:
            res = train_local(exp.host, plan, payload, data, steps=steps, batch_size=cfg.train.batch_size, lr=lr,
                              rng=rng, pad_id=exp.pad_id, weight_decay=cfg.train.weight_decay,
                              max_grad_norm=cfg.train.max_grad_norm)
            check_update(res.state, payload)
        except (LocalTrainingError, UpdateRejected) as err:
            events.append({"device": dev, "kind": "rejected", "detail": str(err)})
            bytes_down += down
            continue
        up = state_bytes(res.state)
        rt = fleet.time(dev, round_, round_work(exp.spec, plan.ranks, res.batch_shapes, down, up))
        rank_sum = sum(plan.ranks.values())
        reports.append(status_report(dev, rt, plan.depth, rank_sum, res.samples))
        updates.append(DeviceUpdate(dev, res.state, res.samples))
        losses.append(res.loss)
        bytes_down += down
        bytes_up += up
        rows.append({"id": dev, "depth": plan.depth, "layers": plan.layers,
                     "ranks": [plan.ranks[l] for l in plan.layers], "time_s": rt.total_s,
                     "compute_s": rt.forward_s + rt.backward_s, "comm_s": rt.download_s + rt.upload_s,
                     "samples": res.samples, "loss": res.loss})
    new_state = method.aggregate(global_state, updates) if updates else global_state
    for r in reports:
        estimator.observe(r)
    round_time = max((r["time_s"] for r in rows), default=0.0)
    for r in rows:
        r["waiting_s"] = round_time - r["time_s"]
    record = {"round": round_, "round_time_s": round_time,
              "mean_waiting_s": float(np.mean([r["waiting_s"] for r in rows])) if rows else 0.0,
              "bytes_down": bytes_down, "bytes_up": bytes_up, "lr": lr,
              "train_loss": float(np.mean(losses)) if losses else None,
              "devices": rows, "events": events}
    return RoundOutcome(new_state, record, reports)


def run_local(exp: Experiment, on_record: Callable[[dict], None] | None = None,
              progress: bool = True) -> tuple[AdapterState, list[dict]]:
    """All rounds; evaluates every `eval_every` rounds and at the last. Returns the final state."""
    from tqdm.auto import tqdm

    cfg = exp.cfg
    estimator = Estimator(exp.method.rho)
    state = exp.initial_state
    records: list[dict] = []
    clock = 0.0
    bar = tqdm(range(1, cfg.run.rounds + 1), desc=exp.method.name, unit="round", disable=not progress)
    for h in bar:
        out = run_round(exp, h, state, estimator)
        state = out.state
        clock += out.record["round_time_s"]
        rec = {"round": h, "virtual_time_s": clock, "accuracy": None, "loss": None, **out.record}
        if h % cfg.run.eval_every == 0 or h == cfg.run.rounds:
            rec["accuracy"], rec["loss"] = evaluate(exp.host, state, exp.test, cfg.train.eval_batch_size, exp.pad_id)
            bar.set_postfix(acc=f"{rec['accuracy']:.3f}", vtime=f"{clock:.0f}s")
        records.append(rec)
        if on_record:
            on_record(rec)
    return state, records
