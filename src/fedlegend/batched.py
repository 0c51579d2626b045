"""Many devices in one pass: the local steps of several devices of a round, trained together.

The devices of a round that train the same layout (same `plan.ranks`, frozen tensor kinds,
number of steps and folded residual) form a group, and each of the group's steps is one forward and one backward over the shared
base model on all their rows at once: every LoRA target and the task head apply each device's own
tensors to that device's rows (a per-row gather of the device's A, B and head from a
[devices, ...] stack, then batched matmuls), the frozen base runs once on the whole batch.

What stays each device's own, so that the results are sequential execution's up to float rounding:
- data order: each device's rng stream is consumed exactly as `client.train_local` does (its first
  draw, torch's seed, then `sample_batches`), and its batches are its own (`task.batch`);
- loss: the mean over the device's own rows (each row's cross-entropy weighted 1 / its batch size),
  and its losses, seen examples and batch shapes (the cost model's input: the device's own widths,
  not the group's padded ones) are recorded per device;
- gradient clipping: each device's gradient norm over its own tensors, its own clip factor;
- optimizer: one AdamW over the stacked tensors; AdamW is elementwise and the group shares lr,
  weight decay and the step count, so each device's slice is updated as its own AdamW would;
- a device whose loss turns non-finite fails alone (LocalTrainingError, as sequentially), the
  others go on; after the round torch's generator is seeded as sequential execution left it.

Rows are sorted by length across the group and cut into chunks of at most `max_tokens` rows x
width, padded within a chunk (the attention mask keeps the padding out of a real token's result up
to float rounding); gradients of a step accumulate over its chunks.
Tolerance (fp32): losses and adapter tensors within about 1e-5 of sequential execution (tests/test_batched.py).

Falls back to sequential execution (`client.train_local`) for FedAdapter's bottleneck host, the LM
tasks, a model without a Linear task head, dropout > 0 (a device's dropout stream cannot be
reproduced in a shared forward) and groups of one device (docs/batched.md). Virtual time never
changes: the cost model reads each device's own batch shapes.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from .client import LocalResult, LocalTrainingError, device_rng, step_shape
from .data import Encoded, sample_batches
from .execution import autocast, model_device, to_device
from .hosts import LoraHost
from .methods.base import LoraPlan, trained_part
from .prefix_cache import PrefixCache, feeding
from .spec import RESIDUAL, AdapterState, layout_signature, lora_key

# rows x padded width of one forward chunk: bounds activation memory (about 0.6 GB for MiniLM-L6 at
# 8192 tokens) and the padding within a chunk; a GPU takes more (BATCH_TOKENS_CUDA)
BATCH_TOKENS_CPU = 8192
BATCH_TOKENS_CUDA = 65536
# what one more forward chunk costs, in tokens' worth of compute (chunks(): padding against chunk count)
CHUNK_OVERHEAD_CPU = 64
CHUNK_OVERHEAD_CUDA = 4096


@dataclass
class Job:
    """One device's local training, as `client.train_local` gets it."""
    device: int
    plan: LoraPlan
    payload: AdapterState
    data: Encoded
    steps: int
    lr: float
    rng: np.random.Generator


# ------------------------------------------------------------------ when it applies
def unsupported(host, task) -> str | None:
    """Why this host / task cannot train devices together (None: it can)."""
    if not isinstance(host, LoraHost):
        return f"the {type(host).__name__} is not the LoRA host"
    if getattr(task, "name", None) != "classification":
        return f"task {getattr(task, 'name', type(task).__name__)!r} is not classification"
    if not host.spec.has_head:
        return "the model has no task head"
    head = host.peft.base_model.model.get_submodule(host.spec.head_module)
    if not isinstance(getattr(head, "original_module", None), torch.nn.Linear):
        return "the task head is not one Linear layer"
    if host.dropout > 0 or any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in host.model.modules()):
        return "dropout > 0 (each device's dropout stream cannot be shared)"
    return None


# "auto" on a CPU: only groups of at least this many devices train together (on the 2-core CPU 6 devices
# gained nothing, 80 devices of one layout 1.7x: docs/batched.md)
AUTO_MIN_GROUP_CPU = 16


def group_limit(setting, device: torch.device) -> int:
    """Most devices per group from run.batch_devices: 0 = off (sequential); a large number = no limit."""
    if setting is True or setting == "auto":
        return 1 << 30
    if setting is False or setting is None:
        return 0
    n = int(setting)
    return n if n >= 2 else 0


def min_group(setting, device: torch.device) -> int:
    """The fewest devices a group trains together with (smaller groups train one device at a time):
    2, or with "auto" on a CPU AUTO_MIN_GROUP_CPU (on a CUDA GPU 2)."""
    return AUTO_MIN_GROUP_CPU if setting == "auto" and device.type != "cuda" else 2


def residual_digest(payload: AdapterState) -> tuple:
    """What identifies the folded residual a payload carries (devices of a group share the frozen weights)."""
    from .hosts.lora import weight_digest
    return tuple((k, weight_digest(v)) for k, v in sorted(payload.items()) if k.endswith("." + RESIDUAL))


def group_key(job: Job) -> tuple:
    return (layout_signature(job.plan.ranks), tuple(job.plan.frozen), job.steps, job.lr,
            residual_digest(job.payload))


def make_groups(jobs: list[Job], limit: int) -> list[list[Job]]:
    """Jobs of the same layout, frozen kinds, steps, lr and residual, in dispatch order, at most `limit` each."""
    by_key: dict[tuple, list[Job]] = {}
    for j in jobs:
        by_key.setdefault(group_key(j), []).append(j)
    out = []
    for members in by_key.values():
        out.extend(members[s : s + limit] for s in range(0, len(members), limit))
    return out


# ------------------------------------------------------------------ the per-row adapters
class _Rows:
    """Which group member each row of the current chunk belongs to (set per chunk)."""
    dev: torch.Tensor | None = None


def _per_row(x: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x (n, ..., in) times each row's own weight^T: weight is a (members, out, in) stack."""
    n, d_in = x.shape[0], x.shape[-1]
    w = weight.index_select(0, rows)                                     # (n, out, in)
    y = torch.bmm(x.reshape(n, -1, d_in), w.transpose(1, 2))             # (n, tokens, out)
    return y.reshape(*x.shape[:-1], w.shape[1])


@contextmanager
def per_device_adapters(host: LoraHost, name: str, ranks: dict[int, int], stacks: dict[str, torch.Tensor],
                        rows: _Rows) -> Iterator[None]:
    """Within this context the layout's LoRA targets add each row's own device's LoRA (from `stacks`,
    canonical key -> (members, ...) tensor) and the head computes each row's own device's head; peft's
    own adapter of the layout is switched off on those modules meanwhile."""
    root = host.peft.base_model.model
    handles, disabled = [], []

    def lora_hook(a_key, b_key, scaling):
        def hook(module, args, output):
            x = args[0].to(stacks[a_key].dtype)
            return output + _per_row(_per_row(x, stacks[a_key], rows.dev), stacks[b_key], rows.dev) * scaling
        return hook

    def head_hook(module, args, output):
        x = args[0]
        out = _per_row(x.to(stacks["head.weight"].dtype), stacks["head.weight"], rows.dev)
        if "head.bias" in stacks:
            b = stacks["head.bias"].index_select(0, rows.dev)
            out = out + b.reshape(b.shape[0], *([1] * (out.dim() - 2)), b.shape[-1])
        return out.to(output.dtype)

    try:
        for layer in sorted(ranks):
            for t in host.spec.targets_of(layer):
                mod = root.get_submodule(t.full_name)
                disabled.append((mod, mod._disable_adapters))
                mod._disable_adapters = True
                handles.append(mod.register_forward_hook(
                    lora_hook(lora_key(t.layer, t.module, "lora_A"), lora_key(t.layer, t.module, "lora_B"),
                              mod.scaling[name])))
        head = root.get_submodule(host.spec.head_module)
        disabled.append((head, head._disable_adapters))
        head._disable_adapters = True
        handles.append(head.register_forward_hook(head_hook))
        yield
    finally:
        for h in handles:
            h.remove()
        for mod, was in disabled:
            mod._disable_adapters = was


# ------------------------------------------------------------------ batches
def _pad_to(v: torch.Tensor, width: int, value: int) -> torch.Tensor:
    if v.shape[1] == width:
        return v
    pad = v.new_full((v.shape[0], width - v.shape[1], *v.shape[2:]), value)
    return torch.cat([v, pad], 1)


def merge_batches(batches: list[dict[str, torch.Tensor]], pad_id: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One right-padded batch of all rows (in order) and each row's real length."""
    keys = list(batches[0])
    if any(list(b) != keys for b in batches) or "attention_mask" not in keys:
        raise ValueError("batched training: the devices' batches differ in their inputs or have no attention mask")
    width = max(b["input_ids"].shape[1] for b in batches)
    merged = {}
    for k in keys:
        parts = [b[k] for b in batches]
        if all(p.dim() >= 2 and p.shape[1] == b["input_ids"].shape[1] for p, b in zip(parts, batches)):
            parts = [_pad_to(p, width, pad_id if k == "input_ids" else 0) for p in parts]
        merged[k] = torch.cat(parts, 0)
    mask = merged["attention_mask"]
    lengths = mask.sum(1)
    cols = torch.arange(mask.shape[1], device=mask.device)[None, :]
    if not torch.equal(mask.bool(), cols < lengths[:, None]):
        raise ValueError("batched training needs right-padded batches")
    return merged, lengths


def chunks(lengths: torch.Tensor, max_tokens: int, overhead_tokens: int = 0) -> list[torch.Tensor]:
    """Row indices sorted by length, cut into forward chunks of at most `max_tokens` rows x the chunk's
    longest row (at least one row a chunk), choosing the cuts that minimise padded tokens plus
    `overhead_tokens` per chunk (what one more forward and backward costs, in tokens' worth of compute):
    0 gives the least padding, a large value few big chunks. Exact dynamic programming over the
    distinct lengths (a chunk never splits rows of one length unless max_tokens forces it)."""
    order = torch.argsort(lengths.cpu(), stable=True)
    ls = lengths.cpu()[order].tolist()
    # runs of equal length: (length, count)
    runs: list[list[int]] = []
    for x in ls:
        if runs and runs[-1][0] == x:
            runs[-1][1] += 1
        else:
            runs.append([x, 1])

    def cost(rows: int, width: int) -> tuple[float, int]:
        per = max(1, max_tokens // width)               # rows a chunk of this width may hold
        pieces = -(-rows // per)
        return rows * width + overhead_tokens * pieces, pieces

    best = [0.0] + [float("inf")] * len(runs)
    cut = [0] * (len(runs) + 1)
    for j in range(1, len(runs) + 1):
        rows = 0
        for i in range(j, 0, -1):                       # chunk = runs i-1 .. j-1, width = runs[j-1]'s length
            rows += runs[i - 1][1]
            c = best[i - 1] + cost(rows, runs[j - 1][0])[0]
            if c < best[j]:
                best[j], cut[j] = c, i - 1
    bounds = []
    j = len(runs)
    while j > 0:
        bounds.append((cut[j], j))
        j = cut[j]
    out, start = [], 0
    starts = [0]
    for _, n in runs:
        starts.append(starts[-1] + n)
    for i, j in reversed(bounds):
        lo, hi, width = starts[i], starts[j], runs[j - 1][0]
        rows = hi - lo
        _, pieces = cost(rows, width)
        size = -(-rows // pieces)
        out.extend(order[k : min(k + size, hi)] for k in range(lo, hi, size))
    return out


# ------------------------------------------------------------------ one group
def train_group(host: LoraHost, task, jobs: list[Job], *, batch_size: int, pad_id: int, weight_decay: float = 0.0,
                max_grad_norm: float = 1.0, precision: str = "fp32", prefix_cache: PrefixCache | None = None,
                max_tokens: int | None = None, overhead_tokens: int | None = None
                ) -> dict[int, LocalResult | LocalTrainingError]:
    """`client.train_local` of every job at once (same layout, frozen kinds, steps, lr and residual)."""
    plan0 = jobs[0].plan
    steps, lr = jobs[0].steps, jobs[0].lr
    if any(group_key(j)[:4] != group_key(jobs[0])[:4] for j in jobs):
        raise ValueError("batched training: a group's devices must share layout, frozen kinds, steps and lr")
    n = len(jobs)
    name = host.use(plan0.ranks)
    host.load(name, jobs[0].payload)            # checks the payload and folds the group's residual in
    layout = host.params(name)
    for p in layout.values():
        p.requires_grad_(False)                 # peft's tensors of the layout are not used below
    device = model_device(host.model)
    if max_tokens is None:
        max_tokens = BATCH_TOKENS_CUDA if device.type == "cuda" else BATCH_TOKENS_CPU
    if overhead_tokens is None:
        overhead_tokens = CHUNK_OVERHEAD_CUDA if device.type == "cuda" else CHUNK_OVERHEAD_CPU
    trained = set(trained_part(layout, plan0))
    stacks: dict[str, torch.Tensor] = {}
    for k, p in layout.items():
        for j in jobs:
            if k not in j.payload:
                raise KeyError(f"adapter state lacks {k} for layout {name} (device {j.device})")
            if tuple(j.payload[k].shape) != tuple(p.shape):
                raise ValueError(f"{k}: shape {tuple(j.payload[k].shape)} does not fit {tuple(p.shape)}")
        stacks[k] = torch.stack([j.payload[k] for j in jobs]).to(device=device, dtype=p.dtype) \
            .requires_grad_(k in trained)
    params = [stacks[k] for k in layout if k in trained]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    # each device's stream as train_local draws it: torch's seed, then its batches
    plans = []
    for j in jobs:
        j.rng.integers(2**62)
        lengths = [len(x) for x in j.data.ids]
        plans.append(sample_batches(len(j.data), steps, min(batch_size, len(j.data)), j.rng, lengths))

    model = host.model
    model.train()
    rows = _Rows()
    failed: dict[int, LocalTrainingError] = {}
    losses: list[list[float]] = [[] for _ in jobs]
    shapes: list[list[tuple[int, int]]] = [[] for _ in jobs]
    seen = [0] * n
    with per_device_adapters(host, name, plan0.ranks, stacks, rows):
        for s in range(steps):
            live = [i for i in range(n) if i not in failed]
            batches = [to_device(task.batch(jobs[i].data, plans[i][s], pad_id), device) for i in live]
            merged, lengths = merge_batches(batches, pad_id)
            sizes = [b["input_ids"].shape[0] for b in batches]
            row_dev = torch.repeat_interleave(torch.tensor(live, device=device), torch.tensor(sizes, device=device))
            row_w = torch.repeat_interleave(torch.tensor([1.0 / b for b in sizes], device=device),
                                            torch.tensor(sizes, device=device))
            dev_loss = torch.zeros(n, device=device)
            for idx in chunks(lengths, max_tokens, overhead_tokens):
                idx = idx.to(device)
                width = int(lengths[idx].max())
                chunk = {k: (v.index_select(0, idx)[:, :width] if v.dim() >= 2 and v.shape[1] == merged[
                    "input_ids"].shape[1] else v.index_select(0, idx)) for k, v in merged.items()}
                labels = chunk.pop("labels")
                rows.dev = row_dev.index_select(0, idx)
                with autocast(device, precision), feeding(prefix_cache, host, plan0.ranks, chunk):
                    logits = model(**chunk).logits
                    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
                weighted = ce.float() * row_w.index_select(0, idx)
                weighted.sum().backward()
                dev_loss.index_add_(0, rows.dev, weighted.detach())
            values = dev_loss.tolist()
            for pos, i in enumerate(live):
                if not np.isfinite(values[i]):
                    failed[i] = LocalTrainingError(f"device {jobs[i].device}: loss became {values[i]} "
                                                   f"at step {len(losses[i]) + 1}")
                    continue
                losses[i].append(values[i])
                shapes[i].append(step_shape(task, batches[pos]))
                seen[i] += sizes[pos]
            ok = torch.tensor([i not in failed for i in range(n)], device=device)
            with torch.no_grad():
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    elif failed:   # a failed device's slice to 0 (it may hold nan; the others keep theirs)
                        p.grad.copy_(torch.where(ok.view(-1, *([1] * (p.dim() - 1))), p.grad, 0.0))
                if max_grad_norm > 0:
                    norms = torch.stack([torch.linalg.vector_norm(p.grad.reshape(n, -1), dim=1) for p in params], 1)
                    total = torch.linalg.vector_norm(norms, dim=1)
                    coef = torch.clamp(max_grad_norm / (total + 1e-6), max=1.0)   # clip_grad_norm_'s rule
                    for p in params:
                        p.grad.mul_(coef.view(-1, *([1] * (p.dim() - 1))).to(p.grad.dtype))
            opt.step()
            opt.zero_grad(set_to_none=True)
    rows.dev = None
    out: dict[int, LocalResult | LocalTrainingError] = {}
    for i, j in enumerate(jobs):
        if i in failed:
            out[j.device] = failed[i]
            continue
        state = {k: stacks[k][i].detach().to("cpu", copy=True) for k in layout}
        out[j.device] = LocalResult(trained_part(state, j.plan), seen[i], float(np.mean(losses[i])), shapes[i])
    return out


# ------------------------------------------------------------------ a round (the engine's hook)
def train_round(exp, assignments: dict) -> dict[int, LocalResult | LocalTrainingError]:
    """Train the round's assignments (engine.local.Dispatch) in groups where run.batch_devices asks for it
    and it applies; returns each trained device's result or error. Devices not in it (option off,
    fallback, a group of one, a drop-out) are left to `run_device`'s sequential path."""

    cfg = exp.cfg
    setting, device = getattr(cfg.run, "batch_devices", False), model_device(exp.host.model)
    limit, fewest = group_limit(setting, device), min_group(setting, device)
    if limit < 2 or unsupported(exp.host, exp.task) is not None:
        return {}
    jobs = [Job(dev, a.plan, a.payload, exp.device_data(dev), a.steps, a.lr, device_rng(exp, a))
            for dev, a in assignments.items() if exp.fleet.dropout(dev, a.round) is None]
    out: dict[int, LocalResult | LocalTrainingError] = {}
    for group in make_groups(jobs, limit):
        if len(group) < fewest:
            continue
        out.update(train_group(exp.host, exp.task, group, batch_size=cfg.train.batch_size, pad_id=exp.pad_id,
                               weight_decay=cfg.train.weight_decay, max_grad_norm=cfg.train.max_grad_norm,
                               precision=cfg.run.precision, prefix_cache=exp.prefix_cache))
    return out


def reseed_as_sequential(exp, assignments: dict, trained: dict) -> None:
    """Leave torch's generator as sequential execution does: seeded by the last device (in dispatch order)
    that trained, when that one trained in a group (sequentially trained devices seed it themselves)."""

    last = [(dev, a) for dev, a in assignments.items() if exp.fleet.dropout(dev, a.round) is None]
    if last and last[-1][0] in trained:
        torch.manual_seed(int(device_rng(exp, last[-1][1]).integers(2**62)))
