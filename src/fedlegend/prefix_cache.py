"""The frozen-prefix activation cache: below a device's lowest adapted layer nothing trains.

A layout (layer -> rank, or layer -> adapter width) puts adapters on some layers; every layer
below the lowest of them (the boundary b) is frozen and carries no adapter, and so is the
embedding. What layer b receives for an example is then a function of the example, b and the
frozen weights only, the same in every round. LEGEND's devices train their top layers (depth
< L), so most of their forward pass is such a prefix.

`PrefixCache.feeding(host, ranks, batch)` is a context for one training forward: it skips the
prefix layers (the model's layer list is cut to layers b.. for the call) and feeds layer b the
cached states through a forward pre-hook; the embedding still runs (it is cheap, and models
derive masks, rotary and relative position terms from its output's shape).

Exactness (what makes a cached run the same computation as an uncached one):
- States are stored per example, unpadded, and computed for each example alone (batch 1, no
  padding). With an attention mask a real token's state is the same whatever the batch's width
  and neighbours (pads are masked keys, positions are 0..n-1), so the re-padded
  batch is the uncached one up to float rounding (different matmul shapes; about 1e-7
  relative). Computing each example alone makes a stored state a pure function of its key,
  so a run gives the same bits whatever the cache held before: after eviction, a --resume,
  or in another Flower process.
- The key is (boundary, the host's `frozen_version(b)`, a digest of the example's inputs):
  a change of frozen weights below b (FLoRA's / FedEx-LoRA's residual folded into them) makes
  new keys, and the stale entries age out of the LRU.
- The prefix runs in eval mode: with dropout on (`model.dropout` > 0) it runs WITHOUT dropout,
  and fewer dropout masks are drawn above it, so cached and uncached runs then differ.
- `fp16 = true` stores states in half precision: half the memory, no longer exact (about 1e-3
  relative in the states).
Batches are split by their attention mask: right padding, or left padding with explicit
position_ids (the LM tasks' batches: positions then count real tokens, whatever the width).
Batches it cannot split per example (no attention mask, left padding without position_ids, 3-d
inputs) and layouts with an adapter on layer 0 run uncached. Only host wall clock changes: the cost model
prices the full forward from the batch shapes either way.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

MB = 2**20
_LAYERS_NAME = re.compile(r"(^|\.)layers?$")


class _PrefixDone(Exception):
    """Raised by the capture hook: layer b's input is known, the rest of the forward is not needed."""


@dataclass
class CacheStats:
    hits: int = 0           # examples whose states came from the cache
    misses: int = 0         # examples whose states were computed (and stored, if they fit)
    evictions: int = 0      # entries dropped to stay under max_bytes
    bypassed: int = 0       # batches run without the cache (boundary 0, inputs it cannot split)

    def as_dict(self) -> dict:
        return dict(vars(self))


def layer_list(model: nn.Module, num_layers: int) -> tuple[nn.Module, str, nn.ModuleList]:
    """The model's transformer layers as (owner, attribute, ModuleList): the one ModuleList named
    `layer` or `layers` with `num_layers` entries (BERT/MPNet `encoder.layer`, Llama `model.layers`)."""
    found = [(name, mod) for name, mod in model.named_modules()
             if isinstance(mod, nn.ModuleList) and len(mod) == num_layers and _LAYERS_NAME.search(name)]
    if len(found) != 1:
        raise ValueError(f"prefix cache: expected one ModuleList of {num_layers} transformer layers named "
                         f"'layer' or 'layers', found {[n for n, _ in found] or 'none'}; run with --no-prefix-cache")
    name = found[0][0]
    owner_name, _, attr = name.rpartition(".")
    return model.get_submodule(owner_name) if owner_name else model, attr, found[0][1]


def real_spans(batch: dict) -> list[tuple[int, int]] | None:
    """(start, length) of each row's real tokens, or None when the batch cannot be split per example:
    no 2-d input_ids / attention_mask, a row whose tokens are not one block, an empty row, or left
    padding without explicit position_ids (the model would then count positions from the pads)."""
    ids, mask = batch.get("input_ids"), batch.get("attention_mask")
    if not (isinstance(ids, torch.Tensor) and isinstance(mask, torch.Tensor)) or ids.dim() != 2 \
            or mask.shape != ids.shape:
        return None
    lengths = mask.sum(1)
    starts = mask.ne(0).int().argmax(1)          # the first real token
    cols = torch.arange(ids.shape[1], device=mask.device)[None, :]
    block = (cols >= starts[:, None]) & (cols < (starts + lengths)[:, None])
    if int(lengths.min()) == 0 or not torch.equal(mask.bool(), block):
        return None
    if int(starts.max()) > 0 and "position_ids" not in batch:
        return None
    return list(zip(starts.tolist(), lengths.tolist()))


def split_examples(batch: dict, spans: list[tuple[int, int]] | None = None) -> list[dict[str, torch.Tensor]] | None:
    """Each example's model inputs without its padding (labels left out: they never change a hidden
    state), or None when the batch cannot be split so (real_spans) or holds a non-tensor input.
    Right padding, or left padding with position_ids (the LM tasks' batches), both split."""
    spans = real_spans(batch) if spans is None else spans
    if spans is None:
        return None
    n_rows, width = batch["input_ids"].shape
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(n_rows)]
    for k, v in batch.items():
        if k == "labels":
            continue
        if not isinstance(v, torch.Tensor) or v.dim() == 0 or v.shape[0] != n_rows:
            return None
        per_token = v.dim() >= 2 and v.shape[1] == width
        for i, (start, n) in enumerate(spans):
            out[i][k] = v[i : i + 1, start : start + n] if per_token else v[i : i + 1]
    return out


def example_digest(example: dict[str, torch.Tensor]) -> bytes:
    """A digest of one example's inputs (names, dtypes, shapes and values)."""
    h = hashlib.blake2b(digest_size=16)
    for k in sorted(example):
        v = example[k].detach().cpu().contiguous()
        h.update(f"{k}:{v.dtype}:{tuple(v.shape)};".encode())
        h.update(v.view(torch.uint8).numpy().tobytes())
    return h.digest()


def pays(visits_per_example: float, working_set_bytes: float, max_bytes: float) -> bool:
    """`prefix_cache = "auto"`: on when an example is drawn about twice or more over the run (the
    first draw computes it alone, about 1.8x the cost of its share of a batched prefix on a CPU,
    so fewer repeats do not pay it back) and the states of the whole training set fit (a cache
    smaller than the set cycled through each round would evict before reuse)."""
    return visits_per_example >= 2.0 and working_set_bytes <= max_bytes


def cache_for(settings, hidden: int, lengths: list[int], draws: float, dropout: float = 0.0) -> "PrefixCache | None":
    """The cache of a run (config section [cache]: prefix_cache, max_mb, fp16), or None when it is off.
    `lengths`: token counts of the examples this process trains on; `draws`: how many examples the
    run draws from them (rounds x steps x batch size), for "auto". "auto" never turns it on with
    dropout (model.dropout > 0): the prefix would then train without dropout; `true` opts in."""
    if settings.prefix_cache == "auto":
        working_set = sum(lengths) * hidden * (2 if settings.fp16 else 4)
        if dropout > 0 or not pays(draws / max(len(lengths), 1), working_set, settings.max_mb * MB):
            return None
    elif not settings.prefix_cache:
        return None
    return PrefixCache(settings.max_mb, settings.fp16)


class PrefixCache:
    """Per-example hidden states at a layout's boundary, least recently used evicted beyond max_mb."""

    def __init__(self, max_mb: float = 1024.0, fp16: bool = False):
        if max_mb <= 0:
            raise ValueError(f"max_mb must be > 0, got {max_mb}")
        self.max_bytes = int(max_mb * MB)
        self.fp16 = fp16
        self.stats = CacheStats()
        self.bytes = 0
        # (boundary, frozen version, example digest) -> (states (n, hidden), the dtype layer b received)
        self._store: OrderedDict[tuple, tuple[torch.Tensor, torch.dtype]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        self._store.clear()
        self.bytes = 0

    # ------------------------------------------------------------------ the store
    def _get(self, key: tuple) -> torch.Tensor | None:
        entry = self._store.get(key)
        if entry is None:
            return None
        self._store.move_to_end(key)
        states, dtype = entry
        return states.to(dtype)

    def _put(self, key: tuple, states: torch.Tensor) -> None:
        kept = states.half() if self.fp16 else states
        size = kept.numel() * kept.element_size()
        if size > self.max_bytes:
            return
        while self._store and self.bytes + size > self.max_bytes:
            _, (old, _) = self._store.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
            self.stats.evictions += 1
        self._store[key] = (kept, states.dtype)
        self.bytes += size

    # ------------------------------------------------------------------ computing the prefix
    @staticmethod
    @torch.no_grad()
    def _compute(model: nn.Module, first: nn.Module, example: dict[str, torch.Tensor]) -> torch.Tensor:
        """What layer `first` receives for one example alone: the model's forward, stopped there."""
        captured: list[torch.Tensor] = []

        def capture(module, args, kwargs):
            captured.append(args[0] if args else kwargs["hidden_states"])
            raise _PrefixDone

        handle = first.register_forward_pre_hook(capture, with_kwargs=True)
        was_training = model.training
        model.eval()                      # the prefix runs without dropout (see the module doc)
        try:
            model(**example)
        except _PrefixDone:
            pass
        finally:
            handle.remove()
            model.train(was_training)
        if not captured:
            raise RuntimeError("prefix cache: the model's forward never reached its layer list")
        return captured[0][0].detach()

    def states_for(self, host, boundary: int, examples: list[dict[str, torch.Tensor]],
                   layers: nn.ModuleList) -> list[torch.Tensor]:
        """Each example's states at layer `boundary` (n_i, hidden): from the cache, else computed."""
        version = host.frozen_version(boundary)
        out = []
        for ex in examples:
            key = (boundary, version, example_digest(ex))
            states = self._get(key)
            if states is None:
                self.stats.misses += 1
                states = self._compute(host.model, layers[boundary], ex)
                self._put(key, states)
                if self.fp16:       # used as stored, so a first use equals every later one
                    states = states.half().to(states.dtype)
            else:
                self.stats.hits += 1
            out.append(states)
        return out

    # ------------------------------------------------------------------ one cached forward
    @contextmanager
    def feeding(self, host, ranks: dict[int, int], batch: dict) -> Iterator[None]:
        """Within this context the host's model runs `batch` from the cached states at the layout's
        lowest layer; outside it (or where the cache cannot apply) the model is untouched."""
        boundary = min(ranks) if ranks else 0
        spans = real_spans(batch) if boundary > 0 else None
        examples = split_examples(batch, spans) if spans is not None else None
        if examples is None:
            self.stats.bypassed += 1
            yield
            return
        owner, attr, layers = layer_list(host.model, host.spec.num_layers)
        states = self.states_for(host, boundary, examples, layers)
        width = batch["input_ids"].shape[1]
        padded = states[0].new_zeros((len(states), width, states[0].shape[-1]))
        for i, ((start, n), s) in enumerate(zip(spans, states)):
            padded[i, start : start + n] = s

        def feed(module, args, kwargs):
            given = args[0] if args else kwargs["hidden_states"]
            if tuple(given.shape) != tuple(padded.shape):
                raise RuntimeError(f"prefix cache: layer {boundary} got hidden states {tuple(given.shape)}, "
                                   f"the cache built {tuple(padded.shape)}")
            if args:
                return (padded,) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": padded}

        handle = layers[boundary].register_forward_pre_hook(feed, with_kwargs=True)
        setattr(owner, attr, nn.ModuleList(list(layers)[boundary:]))
        try:
            yield
        finally:
            setattr(owner, attr, layers)
            handle.remove()


def feeding(cache: PrefixCache | None, host, ranks: dict[int, int], batch: dict):
    """`cache.feeding(...)`, or nothing to do without a cache (train_local's one line)."""
    return nullcontext() if cache is None else cache.feeding(host, ranks, batch)
