"""An adapter host: one frozen base model carrying adapters of several layouts.

A layout is a map layer -> rank (LoRA) or layer -> width (bottleneck). Devices of a round
train different layouts on the same base model, so a host keeps one set of adapter modules
per layout it has seen (never a model copy per device), `use(ranks)` activates one, and
`load` / `read` move canonical adapter state (fedlegend.spec) in and out of it.

The layout cache is bounded: a method that draws layouts at random (FedRA can create up to
2^L - 1) would otherwise grow the model without end. The least recently used layout is
evicted (the global one never is). A layout's tensors carry no state between rounds (every
use starts with `load`), so evicting one changes no number; creating one must not draw from
torch's global generator either (a device's dropout stream would then depend on the cache),
so subclasses create layouts under `torch.random.fork_rng`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from pathlib import Path

import torch

from ..execution import to_cpu
from ..spec import AdapterState, ModelSpec, Ranks, layout_signature


class AdapterHost(ABC):
    """The shared part of every host: the bounded layout cache and state in / out."""

    GLOBAL = "default"  # the global layout's name; saved at the folder root by save_pretrained

    def __init__(self, spec: ModelSpec, global_ranks: Ranks, max_layouts: int = 64):
        if max_layouts < 2:
            raise ValueError(f"max_layouts must be >= 2 (the global layout and one more), got {max_layouts}")
        self.spec = spec
        self.global_ranks = dict(global_ranks)
        self.max_layouts = max_layouts
        self._layouts: OrderedDict[tuple, str] = OrderedDict()  # signature -> name, least recently used first
        self._params: dict[str, dict[str, torch.nn.Parameter]] = {}
        self._created = 0

    # ---------------------------------------------------------------- what a host implements
    @property
    @abstractmethod
    def model(self) -> torch.nn.Module:
        """The model local training and evaluation run."""

    @abstractmethod
    def _create(self, name: str, ranks: Ranks) -> dict[str, torch.nn.Parameter]:
        """Build the adapter modules of a layout; return its canonical key -> parameter."""

    @abstractmethod
    def _delete(self, name: str) -> None:
        """Remove a layout's adapter modules from the model."""

    @abstractmethod
    def _activate(self, name: str) -> None:
        """Make this layout the one the model runs."""

    @abstractmethod
    def save_pretrained(self, out_dir: str | Path, state: AdapterState) -> None:
        """Write the global adapter `state` in the host's export format."""

    # ---------------------------------------------------------------- the layout cache
    def _adopt(self, ranks: Ranks, name: str, params: dict[str, torch.nn.Parameter]) -> None:
        """Enter a built layout into the cache (the global one is built, seeded, by the subclass)."""
        self._params[name] = params
        self._layouts[layout_signature(ranks)] = name

    def use(self, ranks: Ranks) -> str:
        """Activate the layout `ranks` (creating it on first use) and return its name; only its
        tensors require grad."""
        sig = layout_signature(ranks)
        name = self._layouts.get(sig)
        if name is None:
            self._evict_for_one()
            self._created += 1
            name = f"layout{self._created}"
            with torch.random.fork_rng(devices=[]):
                self._adopt(ranks, name, self._create(name, dict(ranks)))
        self._layouts.move_to_end(sig)
        self._activate(name)
        for p in self.model.parameters():
            p.requires_grad_(False)
        for layout in self._params.values():
            for p in layout.values():
                p.requires_grad_(False)
        for p in self._params[name].values():
            p.requires_grad_(True)
        return name

    def _evict_for_one(self) -> None:
        while len(self._layouts) >= self.max_layouts:
            sig, name = next((s, n) for s, n in self._layouts.items() if n != self.GLOBAL)
            del self._layouts[sig]
            del self._params[name]
            self._delete(name)

    def layouts(self) -> list[str]:
        """Names of the layouts held now, least recently used first."""
        return list(self._layouts.values())

    def frozen_version(self, below: int) -> tuple:
        """What identifies the frozen weights of layers < `below` (part of the prefix cache's key,
        fedlegend.prefix_cache): here they never change, so nothing. A host that changes them
        (LoraHost's folded residuals) names the change."""
        return ()

    # ---------------------------------------------------------------- state in and out
    def params(self, name: str) -> dict[str, torch.nn.Parameter]:
        return self._params[name]

    @torch.no_grad()
    def load(self, name: str, state: AdapterState) -> None:
        """Copy `state` into the layout's tensors; every tensor of the layout must be there."""
        params = self._params[name]
        missing = set(params) - set(state)
        if missing:
            raise KeyError(f"adapter state lacks {sorted(missing)[:4]}... for layout {name}")
        for k, p in params.items():
            if tuple(state[k].shape) != tuple(p.shape):
                raise ValueError(f"{k}: shape {tuple(state[k].shape)} does not fit {tuple(p.shape)}")
            p.copy_(state[k])

    @torch.no_grad()
    def read(self, name: str) -> AdapterState:
        """The layout's tensors as a canonical state: CPU copies wherever the model runs (execution.py)."""
        return to_cpu(self._params[name])
