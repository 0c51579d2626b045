"""Local fine-tuning of one device for one plan, and scoring of the global adapter: the same
code under every engine. The host says which tensors train; the task says what the loss is."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .data import Encoded, sample_batches
from .devices import Work, round_work
from .execution import autocast, model_device, to_device
from .hosts import AdapterHost
from .methods.base import LoraPlan, trained_part
from .prefix_cache import PrefixCache, feeding
from .spec import AdapterState
from .tasks import Score, Task


class LocalTrainingError(RuntimeError):
    """Local training that produced no usable update (e.g. the loss turned NaN)."""


@dataclass(frozen=True)
class LocalResult:
    state: AdapterState
    samples: int
    loss: float
    batch_shapes: list[tuple[int, int, int]]  # step_shape of each step, for the cost model


def step_shape(task: Task, batch: dict[str, torch.Tensor]) -> tuple[int, int, int]:
    """What the cost model needs of a training step: (batch size, padded width, positions per sequence
    at which the task's loss runs the output layer: 1 for a pooled head, k+1 for an LM's answer)."""
    b, w = batch["input_ids"].shape
    return int(b), int(w), int(task.output_positions(batch))


def local_steps_for(n_examples: int, batch_size: int, local_steps: int, local_epochs: float) -> int:
    """Steps of a round: a fixed count, or (local_steps = 0) epochs over the device's data."""
    if local_steps > 0:
        return local_steps
    return max(1, math.ceil(local_epochs * n_examples / batch_size))


def train_local(host: AdapterHost, task: Task, plan: LoraPlan, payload: AdapterState, data: Encoded, *,
                steps: int, batch_size: int, lr: float, rng: np.random.Generator, pad_id: int,
                weight_decay: float = 0.0, max_grad_norm: float = 1.0, precision: str = "fp32",
                prefix_cache: PrefixCache | None = None) -> LocalResult:
    """AdamW on the plan's adapter tensors and the head (eq. 7), starting from the payload.

    Runs where the host's model lives; `precision` "bf16" autocasts forward and loss (execution.py).
    With a `prefix_cache`, the frozen layers below the plan's lowest layer are not rerun (prefix_cache.py)."""
    # Dropout draws from torch's generator: seed it from the device's own stream, so a device's
    # round is a pure function of its inputs whatever ran before it (or in which process).
    torch.manual_seed(int(rng.integers(2**62)))
    name = host.use(plan.ranks)
    host.load(name, payload)
    trained = set(trained_part(host.params(name), plan))   # a plan may freeze some tensors (FFA-LoRA: A)
    for k, p in host.params(name).items():
        p.requires_grad_(k in trained)
    params = [p for k, p in host.params(name).items() if k in trained]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model = host.model
    model.train()
    device = model_device(model)
    losses, shapes, seen = [], [], 0
    lengths = [len(x) for x in data.ids]
    for idx in sample_batches(len(data), steps, min(batch_size, len(data)), rng, lengths):
        batch = to_device(task.batch(data, idx, pad_id), device)
        with autocast(device, precision), feeding(prefix_cache, host, plan.ranks, batch):
            loss = task.loss(model, batch)
        if not torch.isfinite(loss):
            raise LocalTrainingError(f"device {plan.device}: loss became {loss.item()} at step {len(losses) + 1}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        losses.append(loss.item())
        shapes.append(step_shape(task, batch))
        seen += len(idx)
    return LocalResult(trained_part(host.read(name), plan), seen, float(np.mean(losses)), shapes)


@torch.no_grad()
def evaluate(host: AdapterHost, task: Task, state: AdapterState, data: Encoded, batch_size: int,
             pad_id: int, precision: str = "fp32") -> Score:
    """The task's score of the global adapter on `data` (the task moves its batches to the model's device)."""
    name = host.use(host.global_ranks)
    host.load(name, state)
    model = host.model
    model.eval()
    with autocast(model_device(model), precision):
        return task.score(model, data, batch_size, pad_id)


# ------------------------------------------------------------------ a device's planned batches
def device_rng(exp, a) -> np.random.Generator:
    """The device's own stream for a round (batches, torch's seed): engine-independent. `exp`: an
    Experiment or DeviceExperiment; `a`: the round's Dispatch (engine/local.py)."""
    return np.random.default_rng([exp.cfg.run.seed, 3, a.device, a.round])


def planned_batches(exp, a) -> list[np.ndarray]:
    """The batches (the device's example indices) `train_local` draws for the assignment from the
    device's stream: its first draw seeds torch, then `sample_batches`."""
    data, rng = exp.device_data(a.device), device_rng(exp, a)
    rng.integers(2**62)
    lengths = [len(x) for x in data.ids]
    return sample_batches(len(data), a.steps, min(exp.cfg.train.batch_size, len(data)), rng, lengths)


def planned_shapes(exp, a) -> list[tuple[int, int, int]]:
    data = exp.device_data(a.device)
    return [step_shape(exp.task, exp.task.batch(data, idx, exp.pad_id)) for idx in planned_batches(exp, a)]


def planned_work(exp, a) -> Work:
    """The compute of the assignment's local training, without training (planned_batches), no upload."""
    return round_work(exp.spec, a.plan.ranks, planned_shapes(exp, a), a.download_bytes, 0)
