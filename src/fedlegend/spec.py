"""The canonical adapter state and what the rest of the code needs to know of a model.

Canonical adapter state (one layout for every method, host and engine): a flat dict
    "layers.{l}.{module}.lora_A" -> (r_l, d_in)     "layers.{l}.{module}.lora_B" -> (d_out, r_l)
    "head.{param}"               -> the task head's tensors (trained and aggregated too)
with `module` the path inside transformer layer l (e.g. "attention.self.query"). A and B are
oriented as peft stores them for nn.Linear, so the update is B @ A (d_out x d_in).
Methods that fold updates into the frozen weight (FLoRA, FedEx-LoRA) add
    "layers.{l}.{module}.residual" -> (d_out, d_in), the frozen weight becomes W0 + residual
(the LoRA scaling alpha/r already applied); devices never train it (plans freeze it).
Bottleneck adapters (hosts/bottleneck.py) use "layers.{l}.adapter.{down,up}.{weight,bias}".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from .errors import ModelError

AdapterState = dict[str, torch.Tensor]
Ranks = dict[int, int]  # transformer layer index -> LoRA rank (or adapter width)

RESIDUAL = "residual"
# a module inside a numbered transformer layer: "<prefix>.layer(s).<idx>.<suffix>"
LAYER_RE = re.compile(r"^(?P<prefix>.*\.layers?)\.(?P<idx>\d+)\.(?P<suffix>.+)$")
HEAD_CANDIDATES = ("classifier", "score")


def lora_key(layer: int, module: str, part: str) -> str:
    return f"layers.{layer}.{module}.{part}"


def residual_key(layer: int, module: str) -> str:
    return lora_key(layer, module, RESIDUAL)


def key_layer(key: str) -> int | None:
    """Transformer layer of a canonical key; None for head keys."""
    if key.startswith("layers."):
        return int(key.split(".", 2)[1])
    return None


def state_bytes(state: AdapterState) -> int:
    return int(sum(t.numel() * t.element_size() for t in state.values()))


def layout_signature(ranks: Ranks) -> tuple:
    """A hashable name of a rank layout (layer -> rank), the key of a host's layout cache."""
    return tuple(sorted((int(k), int(v)) for k, v in ranks.items()))


@dataclass(frozen=True)
class LoraTarget:
    layer: int
    module: str      # path inside the layer, e.g. "attention.self.query"
    full_name: str   # path in the base model, e.g. "bert.encoder.layer.3.attention.self.query"
    d_in: int
    d_out: int


@dataclass(frozen=True)
class ModelSpec:
    """What the methods, the cost model and the engine need to know of a model."""
    num_layers: int
    hidden: int
    intermediate: int
    targets: tuple[LoraTarget, ...]
    head_module: str
    head_shapes: dict[str, tuple[int, ...]] = field(hash=False)
    num_labels: int = 2

    def targets_of(self, layer: int) -> list[LoraTarget]:
        return [t for t in self.targets if t.layer == layer]

    def lora_params_per_rank(self, layer: int) -> int:
        """Parameters of layer l's LoRA per unit rank: sum over modules of d_in + d_out."""
        return sum(t.d_in + t.d_out for t in self.targets_of(layer))

    def head_params(self) -> int:
        n = 0
        for s in self.head_shapes.values():
            k = 1
            for d in s:
                k *= d
            n += k
        return n


def inspect_model(model: torch.nn.Module, target_modules: tuple[str, ...]) -> ModelSpec:
    """Find the LoRA targets (per transformer layer) and the task head of a model."""
    cfg = model.config
    targets = []
    for name, mod in model.named_modules():
        m = LAYER_RE.match(name)
        if not m or not isinstance(mod, torch.nn.Linear):
            continue
        if name.rsplit(".", 1)[-1] in target_modules:
            targets.append(LoraTarget(int(m["idx"]), m["suffix"], name, mod.in_features, mod.out_features))
    if not targets:
        raise ModelError(f"no Linear module named any of {list(target_modules)} inside numbered transformer "
                         "layers; set model.target_modules to the model's attention projection names")
    head = next((h for h in HEAD_CANDIDATES if hasattr(model, h)), None)
    if head is None:
        raise ModelError("the model has no 'classifier' or 'score' head; load it as a sequence classifier")
    head_shapes = {n: tuple(p.shape) for n, p in getattr(model, head).named_parameters()}
    L = int(cfg.num_hidden_layers)
    if sorted({t.layer for t in targets}) != list(range(L)):
        raise ModelError(f"LoRA targets found in layers {sorted({t.layer for t in targets})}, expected 0..{L - 1}")
    return ModelSpec(num_layers=L, hidden=int(cfg.hidden_size),
                     intermediate=int(getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)),
                     targets=tuple(sorted(targets, key=lambda t: (t.layer, t.module))),
                     head_module=head, head_shapes=head_shapes,
                     num_labels=int(getattr(model, "num_labels", cfg.num_labels)))
