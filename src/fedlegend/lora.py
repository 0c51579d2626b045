"""LoRA on chosen layers with a rank per layer (through peft), and the canonical adapter state.

Canonical adapter state (one layout for every method and engine): a flat dict
    "layers.{l}.{module}.lora_A" -> (r_l, d_in)     "layers.{l}.{module}.lora_B" -> (d_out, r_l)
    "head.{param}"               -> the task head's tensors (trained and aggregated too)
with `module` the path inside transformer layer l (e.g. "attention.self.query"). A and B are
oriented as peft stores them for nn.Linear, so the update is B @ A (d_out x d_in).
Methods that fold updates into the frozen weight (FLoRA, FedEx-LoRA) add
    "layers.{l}.{module}.residual" -> (d_out, d_in), the frozen weight becomes W0 + residual
(the LoRA scaling alpha/r already applied); devices never train it (plans freeze it).

One base model stays in memory. Each distinct rank layout becomes one named peft adapter on
it (LEGEND needs at most L of them), so devices never get a model copy of their own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

AdapterState = dict[str, torch.Tensor]
Ranks = dict[int, int]  # transformer layer index -> LoRA rank

_LAYER_RE = re.compile(r"^(?P<prefix>.*\.layers?)\.(?P<idx>\d+)\.(?P<suffix>.+)$")
_HEAD_CANDIDATES = ("classifier", "score")


def lora_key(layer: int, module: str, part: str) -> str:
    return f"layers.{layer}.{module}.{part}"


def key_layer(key: str) -> int | None:
    """Transformer layer of a canonical key; None for head keys."""
    if key.startswith("layers."):
        return int(key.split(".", 2)[1])
    return None


RESIDUAL = "residual"


def residual_key(layer: int, module: str) -> str:
    return lora_key(layer, module, RESIDUAL)


def state_bytes(state: AdapterState) -> int:
    return int(sum(t.numel() * t.element_size() for t in state.values()))


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
    """Find the LoRA targets (per transformer layer) and the task head of a HF classifier."""
    cfg = model.config
    targets = []
    for name, mod in model.named_modules():
        m = _LAYER_RE.match(name)
        if not m or not isinstance(mod, torch.nn.Linear):
            continue
        if name.rsplit(".", 1)[-1] in target_modules:
            targets.append(LoraTarget(int(m["idx"]), m["suffix"], name, mod.in_features, mod.out_features))
    if not targets:
        raise ValueError(f"no Linear module named any of {list(target_modules)} inside numbered transformer "
                         "layers; set model.target_modules to the model's attention projection names")
    head = next((h for h in _HEAD_CANDIDATES if hasattr(model, h)), None)
    if head is None:
        raise ValueError("the model has no 'classifier' or 'score' head; load it as a sequence classifier")
    head_shapes = {n: tuple(p.shape) for n, p in getattr(model, head).named_parameters()}
    L = int(cfg.num_hidden_layers)
    if sorted({t.layer for t in targets}) != list(range(L)):
        raise ValueError(f"LoRA targets found in layers {sorted({t.layer for t in targets})}, expected 0..{L - 1}")
    return ModelSpec(num_layers=L, hidden=int(cfg.hidden_size),
                     intermediate=int(getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)),
                     targets=tuple(sorted(targets, key=lambda t: (t.layer, t.module))),
                     head_module=head, head_shapes=head_shapes,
                     num_labels=int(getattr(model, "num_labels", cfg.num_labels)))


def lora_config(spec: ModelSpec, ranks: Ranks, alpha_over_rank: float, dropout: float) -> LoraConfig:
    """A peft config with LoRA on exactly the layers in `ranks`, one rank per layer.

    peft's rank_pattern takes the FIRST matching key, so each key is a full module name.
    alpha = alpha_over_rank * r keeps the scaling alpha/r the same at every rank.
    """
    if not ranks:
        raise ValueError("a LoRA plan needs at least one layer")
    names, rank_pattern, alpha_pattern = [], {}, {}
    for layer, r in sorted(ranks.items()):
        if not 0 <= layer < spec.num_layers:
            raise ValueError(f"layer {layer} is outside the model's layers 0..{spec.num_layers - 1}")
        if r < 1:
            raise ValueError(f"rank of layer {layer} must be >= 1, got {r}")
        for t in spec.targets_of(layer):
            names.append(t.full_name)
            rank_pattern[t.full_name] = int(r)
            alpha_pattern[t.full_name] = float(alpha_over_rank * r)
    first = next(iter(rank_pattern.values()))
    return LoraConfig(r=first, lora_alpha=alpha_over_rank * first, target_modules=names,
                      rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, lora_dropout=dropout,
                      modules_to_save=[spec.head_module], bias="none")


class LoraHost:
    """One base model with one peft adapter per distinct rank layout.

    `use(ranks)` activates the adapter for a layout (creating it on first use) and returns
    its name; `load`/`read` move canonical state in and out. Only the active adapter's LoRA
    tensors and head require grad; everything else is frozen.
    """

    GLOBAL = "default"  # the global layout; saved at the folder root by save_pretrained

    def __init__(self, model: torch.nn.Module, spec: ModelSpec, global_ranks: Ranks,
                 alpha_over_rank: float = 2.0, dropout: float = 0.0):
        self.spec = spec
        self.alpha_over_rank = alpha_over_rank
        self.dropout = dropout
        self.peft: PeftModel = get_peft_model(model, lora_config(spec, global_ranks, alpha_over_rank, dropout))
        self._layouts: dict[tuple, str] = {self._sig(global_ranks): self.GLOBAL}
        self._params: dict[str, dict[str, torch.nn.Parameter]] = {self.GLOBAL: self._index(self.GLOBAL)}
        self.global_ranks = dict(global_ranks)
        self._w0: dict[str, torch.Tensor] = {}  # pretrained weight of each target a residual changed

    @property
    def model(self) -> torch.nn.Module:
        """The model local training and evaluation run (any host exposes one)."""
        return self.peft

    @staticmethod
    def _sig(ranks: Ranks) -> tuple:
        return tuple(sorted((int(k), int(v)) for k, v in ranks.items()))

    def _index(self, name: str) -> dict[str, torch.nn.Parameter]:
        by_full = {t.full_name: t for t in self.spec.targets}
        out: dict[str, torch.nn.Parameter] = {}
        head_tag = f"{self.spec.head_module}.modules_to_save.{name}."
        for pname, p in self.peft.named_parameters():
            for part in ("lora_A", "lora_B"):
                tag = f".{part}.{name}.weight"
                if pname.endswith(tag):
                    full = pname[: -len(tag)].removeprefix("base_model.model.")
                    t = by_full[full]
                    out[lora_key(t.layer, t.module, part)] = p
            if head_tag in pname:
                out["head." + pname.split(head_tag, 1)[1]] = p
        return out

    def use(self, ranks: Ranks) -> str:
        sig = self._sig(ranks)
        name = self._layouts.get(sig)
        if name is None:
            name = f"layout{len(self._layouts)}"
            self.peft.add_adapter(name, lora_config(self.spec, dict(ranks), self.alpha_over_rank, self.dropout))
            self._layouts[sig] = name
            self._params[name] = self._index(name)
        self.peft.set_adapter(name)
        for pname, p in self.peft.named_parameters():
            p.requires_grad_(False)
        for p in self._params[name].values():
            p.requires_grad_(True)
        return name

    def params(self, name: str) -> dict[str, torch.nn.Parameter]:
        return self._params[name]

    @torch.no_grad()
    def load(self, name: str, state: AdapterState) -> None:
        params = self._params[name]
        missing = set(params) - set(state)
        if missing:
            raise KeyError(f"adapter state lacks {sorted(missing)[:4]}... for layout {name}")
        for k, p in params.items():
            if tuple(state[k].shape) != tuple(p.shape):
                raise ValueError(f"{k}: shape {tuple(state[k].shape)} does not fit {tuple(p.shape)}")
            p.copy_(state[k])
        self._apply_residuals(state)

    def _base_linear(self, full_name: str) -> torch.nn.Linear:
        mod = self.peft.base_model.model.get_submodule(full_name)
        return getattr(mod, "base_layer", mod)

    @torch.no_grad()
    def _apply_residuals(self, state: AdapterState) -> None:
        """Frozen weight = W0 + residual for targets the state holds a residual of, W0 elsewhere
        (one shared base model serves every device, so the previous device's residual must go)."""
        for t in self.spec.targets:
            key = residual_key(t.layer, t.module)
            if key not in state and t.full_name not in self._w0:
                continue
            weight = self._base_linear(t.full_name).weight
            w0 = self._w0.setdefault(t.full_name, weight.detach().clone())
            res = state.get(key)
            if res is not None and tuple(res.shape) != tuple(w0.shape):
                raise ValueError(f"{key}: shape {tuple(res.shape)} does not fit the weight {tuple(w0.shape)}")
            weight.copy_(w0 if res is None else w0 + res.to(w0.dtype))

    @torch.no_grad()
    def read(self, name: str) -> AdapterState:
        return {k: p.detach().clone() for k, p in self._params[name].items()}

    def save_pretrained(self, out_dir: str | Path, state: AdapterState) -> None:
        """Write the global adapter in PEFT format (loadable with PeftModel.from_pretrained)."""
        self.use(self.global_ranks)
        self.load(self.GLOBAL, state)
        self.peft.save_pretrained(str(out_dir), selected_adapters=[self.GLOBAL])
        residuals = {k: v.contiguous() for k, v in state.items() if k.endswith("." + RESIDUAL)}
        if residuals:  # FLoRA / FedEx-LoRA: the part folded into the frozen weights
            from safetensors.torch import save_file
            by_key = {residual_key(t.layer, t.module): t.full_name for t in self.spec.targets}
            save_file({by_key[k] + ".weight": v for k, v in residuals.items()},
                      str(Path(out_dir) / "residual.safetensors"),
                      metadata={"about": "add each tensor to the base model's weight of that name "
                                         "before loading the adapter"})
