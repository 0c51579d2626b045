"""Where the host's tensors run: the torch device (`run.device`) and the precision (`run.precision`).

Only the host's model and the batches it runs on live on the execution device. Canonical adapter
states (what methods aggregate, checkpoints and exports store, the Flower wire carries) stay CPU
tensors: aggregation is a few small tensors per round, so moving it to a GPU would buy nothing, and
a checkpoint written on a GPU machine loads on a CPU one. On a CPU run every number is what it was
before this module existed (no copy changes a value).

bf16 autocast runs on a CUDA GPU that supports it and on the CPU (torch's CPU autocast). On a CPU it
is allowed, not refused: it is the same code path as on a GPU, so CI (no GPU) tests it; on the 2-core
development machine (AVX512-BF16, no AMX) it halved evaluation time but did not speed up local
training, and like any bf16 run it changes the numbers (docs/benchmarks.md). fp32 is the default.
"""

from __future__ import annotations

import contextlib
import re

import torch

from .errors import UserError

DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"
PRECISIONS = ("fp32", "bf16")


class ExecutionError(UserError, ValueError):
    """A run.device / run.precision this machine cannot honour; the message names the fix."""


def resolve_device(name: str, cuda_available: bool | None = None, cuda_count: int | None = None) -> torch.device:
    """`auto` -> the first CUDA device when one is visible, else the CPU; `cpu`; `cuda` / `cuda:N`
    (checked against the visible GPUs). The two optional arguments stand in for torch.cuda's
    answers (tests on machines without a GPU)."""
    if not re.match(DEVICE_PATTERN, name):
        raise ExecutionError(f"run.device = {name!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N' (N = a GPU index)")
    available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if name == "auto":
        return torch.device("cuda:0" if available else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    index = int(name.split(":")[1]) if ":" in name else 0
    if not available:
        raise ExecutionError(f"run.device = {name!r}, but this machine has no usable CUDA GPU (torch "
                             f"{torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); "
                             "use --device cpu or --device auto")
    count = torch.cuda.device_count() if cuda_count is None else cuda_count
    if index >= count:
        raise ExecutionError(f"run.device = {name!r}, but only {count} CUDA GPU(s) are visible "
                             f"(cuda:0..cuda:{count - 1}); pick one of them or use --device auto")
    return torch.device("cuda", index)


def check_precision(precision: str, device: torch.device) -> str:
    """The precision if this device runs it: bf16 on a CUDA GPU that supports it, or on the CPU."""
    if precision not in PRECISIONS:
        raise ExecutionError(f"run.precision = {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ExecutionError(f"run.precision = 'bf16': {torch.cuda.get_device_name(device)} does not support "
                                 "bf16; use --precision fp32")
    return precision


def autocast(device: torch.device, precision: str):
    """The context local training and evaluation run in: bf16 autocast (weights and the optimizer stay
    fp32, bf16 keeps fp32's exponent range, so no loss scaling is needed), nothing at fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a model's parameters live on (a task moves its batches there)."""
    return next(model.parameters()).device


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch on `device` (no copy when it is there already: a CPU run is unchanged)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def to_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A canonical state as CPU tensors (copies, detached)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
