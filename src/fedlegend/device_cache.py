"""The device activation cache: a simulated device keeps its frozen prefix's outputs across rounds.

A plan trains adapters on some layers; every layer below the lowest of them (the boundary b) is
frozen and carries no adapter, so the hidden states an example reaches layer b with are a
function of the example, b and the frozen weights only. With `fleet.device_activation_cache` on,
each simulated device keeps those states for its own examples (fp16, unpadded) and, in a later
round, does not run layers 0..b-1 again for an example it already holds. FedAdapter's paper
does this for its adapters; here it is a fleet-model option for every method.

This is the cost model only (virtual seconds): training computes the same tensors either way
(the host-side prefix cache, prefix_cache.py, is a different thing: it saves host wall clock
and never changes virtual time).

The rule, per example of a training step at boundary b (docs/device_cache.md):
- an entry at the same boundary b (and the same frozen weights): a hit, no layer below b runs;
- an entry at a boundary c < b: layers c..b-1 run (a partial hit; the entry then moves to b);
- no entry, an entry above b, or stale frozen weights: a miss, layers 0..b-1 run;
after the step the device holds the example's states at b (one entry per example: the boundary
it last used). A plan with b = 0 (every layer adapted) neither reads nor writes the cache.
Frozen weights: a method whose global adapter folds residuals into them (FLoRA, FedEx-LoRA,
MethodInfo.residual) changes them every round, so its device's cache is emptied every round.

Storage: an entry holds tokens x hidden values of BYTES_PER_VALUE bytes (fp16) and counts
against the device's budget (`fleet.device_cache_mb`); beyond it the least recently used
entries are evicted, and an example larger than the whole budget is not kept. Reading an entry
costs nothing (the states sit in device memory).

Estimates: with the cache on, a device's forward above the boundary grows with its depth while
the part below shrinks to its misses, so its status report counts the forward of the trained
span with the per-layer time (mu) and only the download, output layer and missed prefix as the
fixed time (`CachedRound.top_forward_flops`, engine/local.status_report). LEGEND's planner is
unchanged: it sees the cache through its moving-average estimates.

Every decision is a pure function of the device's earlier rounds, so the state is deterministic;
it is saved with the round loop's snapshot and restored by --resume (`state_dict`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from .devices import Work, layer_forward_flops, lora_forward_flops
from .spec import ModelSpec, Ranks

MB = 2**20
BYTES_PER_VALUE = 2   # fp16: how a device would keep activations; fp32 doubles every storage figure


def boundary_of(ranks: Ranks, num_layers: int) -> int:
    """The lowest adapted layer: layers below it are frozen and adapter-free (L when none is adapted)."""
    return min(ranks) if ranks else num_layers


class DeviceCache:
    """One device's cache: example -> (boundary, bytes), least recently used first."""

    def __init__(self, budget_bytes: int):
        self.budget = int(budget_bytes)
        self.entries: OrderedDict[int, tuple[int, int]] = OrderedDict()
        self.version: int | None = None
        self.used = 0

    def copy(self) -> "DeviceCache":
        c = DeviceCache(self.budget)
        c.entries, c.version, c.used = OrderedDict(self.entries), self.version, self.used
        return c

    def clear(self) -> int:
        n = len(self.entries)
        self.entries.clear()
        self.used = 0
        return n

    def prefix_layers(self, example: int, boundary: int) -> int:
        """Layers below `boundary` the device must still run for `example` (0: a full hit)."""
        entry = self.entries.get(example)
        if entry is None or entry[0] > boundary:
            return boundary
        self.entries.move_to_end(example)
        return boundary - entry[0]

    def store(self, example: int, boundary: int, nbytes: int) -> int:
        """Keep the example's states at `boundary`; returns how many entries were evicted for it."""
        old = self.entries.pop(example, None)
        if old is not None:
            self.used -= old[1]
        if nbytes > self.budget:
            return 0
        evicted = 0
        while self.used + nbytes > self.budget:
            _, (_, n) = self.entries.popitem(last=False)
            self.used -= n
            evicted += 1
        self.entries[example] = (boundary, nbytes)
        self.used += nbytes
        return evicted

    def state_dict(self) -> dict:
        return {"version": self.version, "entries": [[e, b, n] for e, (b, n) in self.entries.items()]}

    def load_state_dict(self, state: dict) -> None:
        self.version = state["version"]
        self.entries = OrderedDict((int(e), (int(b), int(n))) for e, b, n in state["entries"])
        self.used = sum(n for _, n in self.entries.values())


@dataclass(frozen=True)
class CachedRound:
    """A device's round priced with its cache."""
    work: Work                 # the round's work, less the prefix forward the cache served
    top_forward_flops: float   # forward of the trained span (layers >= boundary and their adapters)
    hits: int                  # example-steps whose whole prefix came from the cache
    partial: int               # ... that ran only the layers between a lower cached boundary and this one
    misses: int                # ... that ran the whole prefix
    evicted: int
    stored_bytes: int          # the device's storage in use after the round

    def row(self) -> dict:
        """The fields of the round's device row."""
        return {"cache_hits": self.hits, "cache_partial": self.partial, "cache_misses": self.misses,
                "cache_mb": self.stored_bytes / MB}


class DeviceCaches:
    """The fleet's device caches (created on first use), each with the same budget."""

    def __init__(self, budget_mb: float, bytes_per_value: int = BYTES_PER_VALUE):
        self.budget_bytes = int(budget_mb * MB)
        self.bytes_per_value = bytes_per_value
        self.devices: dict[int, DeviceCache] = {}

    def device(self, i: int) -> DeviceCache:
        if i not in self.devices:
            self.devices[i] = DeviceCache(self.budget_bytes)
        return self.devices[i]

    def reset(self) -> None:
        self.devices = {}

    def max_mb(self) -> float:
        return max((c.used for c in self.devices.values()), default=0) / MB

    def state_dict(self) -> dict:
        return {i: c.state_dict() for i, c in sorted(self.devices.items())}

    def load_state_dict(self, state: dict) -> None:
        self.reset()
        for i, s in state.items():
            self.device(int(i)).load_state_dict(s)

    def price(self, device: int, spec: ModelSpec, ranks: Ranks, batches: list[np.ndarray],
              shapes: list[tuple], lengths: list[int], version: int, work: Work, keep: bool = True) -> CachedRound:
        """The round's `work` (round_work of `shapes`) with the prefix forward this device's cache
        serves taken off. `batches` are the steps' example indices (aligned with `shapes`: batch
        size and padded width first), `lengths` every example's token count (its storage),
        `version` names the frozen weights (a change empties the cache). With keep=False (a device
        that drops out or fails) the cache is priced but left as it was."""
        cache = self.device(device) if keep else self.device(device).copy()
        if cache.version != version:
            cache.clear()
            cache.version = version
        L = spec.num_layers
        b0 = boundary_of(ranks, L)
        saved = top = 0.0
        hits = partial = misses = evicted = 0
        for idx, shape in zip(batches, shapes):
            n, w = int(shape[0]), int(shape[1])
            top += (L - b0) * layer_forward_flops(spec, n, w)
            top += sum(lora_forward_flops(spec, l, r, n, w) for l, r in ranks.items())
            if b0 == 0:
                continue
            skipped = 0
            for ex in idx:
                run = cache.prefix_layers(int(ex), b0)
                skipped += b0 - run
                hits += run == 0
                partial += 0 < run < b0
                misses += run == b0
            saved += skipped * layer_forward_flops(spec, 1, w)   # the layer's forward is linear in the batch
            for ex in idx:
                evicted += cache.store(int(ex), b0, lengths[int(ex)] * spec.hidden * self.bytes_per_value)
        out = Work(work.forward_flops - saved, work.backward_flops, work.bytes_down, work.bytes_up)
        return CachedRound(out, top, hits, partial, misses, evicted, cache.used)


def record_fields(caches: DeviceCaches | None, rows: list[dict]) -> dict:
    """The round record's cache fields (none without a cache): the largest storage any device holds
    after the round (MB) and the accepted devices' example-steps served whole / in part / missed."""
    if caches is None:
        return {}
    return {"device_cache_mb": caches.max_mb(),
            "device_cache_hits": sum(r.get("cache_hits", 0) for r in rows),
            "device_cache_partial": sum(r.get("cache_partial", 0) for r in rows),
            "device_cache_misses": sum(r.get("cache_misses", 0) for r in rows)}


def frozen_version(residual: bool, round_: int) -> int:
    """What names a device's frozen weights in a round: fixed, unless the method folds a residual into
    them (FLoRA, FedEx-LoRA), which the global adapter changes every round."""
    return round_ if residual else 0
