"""The canonical adapter state and what the rest of the code needs to know of a model.

Canonical adapter state (one layout for every method, host and engine): a flat dict
    "layers.{l}.{module}.lora_A" -> (r_l, d_in)     "layers.{l}.{module}.lora_B" -> (d_out, r_l)
    "head.{param}"               -> the task head's tensors (trained and aggregated too); a decoder
                                    (causal LM) has none: its output layer (lm_head) stays frozen
                                    (a decoder that classifies has a head, as an encoder)
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
# a module inside a numbered transformer layer: "<prefix>.layer(s).<idx>.<suffix>" (BERT, MPNet, Llama,
# Qwen, GPT-NeoX), "<prefix>.h.<idx>.<suffix>" (Falcon, BLOOM) or "<prefix>.blocks.<idx>.<suffix>"
LAYER_RE = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers?|h|blocks))\.(?P<idx>\d+)\.(?P<suffix>.+)$")
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


def rejected_bytes(state) -> int:
    """Bytes a rejected update took on the wire, whatever it holds (a malformed one may not be a dict of
    tensors: count what has a size, never fail on it)."""
    if not isinstance(state, dict):
        return 0
    total = 0
    for v in state.values():
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
        elif isinstance(getattr(v, "nbytes", None), int):
            total += v.nbytes
    return int(total)


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
    """What the methods, the cost model and the engine need to know of a model.

    Encoders carry a trained task head (`head_module`, `head_shapes`); decoders (kind "decoder",
    causal LMs) carry none: head_module is "" and their output layer over the `vocab` is frozen,
    except a decoder that classifies (models.LastTokenClassifier): a trained head, vocab 0.
    The cost model prices a block by `block_macs` (multiply-accumulates per token of the block's
    Linear layers, read off the model: grouped-query attention and gated MLPs priced as they are)
    and its attention by `attn_width` (heads x head_dim); 0 means the encoder formula (4h^2 + 2hi, h).
    """
    num_layers: int
    hidden: int
    intermediate: int
    targets: tuple[LoraTarget, ...]
    head_module: str
    head_shapes: dict[str, tuple[int, ...]] = field(hash=False)
    num_labels: int = 2
    kind: str = "encoder"
    block_macs: int = 0
    attn_width: int = 0
    vocab: int = 0          # output layer (lm_head) size of a decoder: per token hidden x vocab MACs

    @property
    def has_head(self) -> bool:
        return bool(self.head_module)

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


def _layer_linears(model: torch.nn.Module) -> dict[int, list[tuple[str, str, torch.nn.Linear]]]:
    """Layer -> [(full name, path inside the layer, Linear)] of every Linear in a numbered transformer
    layer (peft's own LoRA Linears left out, so an adapted model prices the same as its base)."""
    out: dict[int, list[tuple[str, str, torch.nn.Linear]]] = {}
    for name, mod in model.named_modules():
        m = LAYER_RE.match(name)
        if m and isinstance(mod, torch.nn.Linear) and ".lora_" not in name:
            out.setdefault(int(m["idx"]), []).append((name, m["suffix"], mod))
    return out


def output_layer(model: torch.nn.Module) -> torch.nn.Module | None:
    """A causal LM's projection onto the vocabulary (transformers' get_output_embeddings), if any."""
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    return out if isinstance(out, torch.nn.Linear) else None


def inspect_model(model: torch.nn.Module, target_modules: tuple[str, ...], source: str = "") -> ModelSpec:
    """Find the LoRA targets (per transformer layer) and the task head (encoders) or the frozen
    output layer (decoders) of a model. `source` (the model folder) goes into error messages."""
    cfg = model.config
    where = f"{source}: " if source else ""
    linears = _layer_linears(model)
    targets = [LoraTarget(l, sub, name, mod.in_features, mod.out_features)
               for l, mods in linears.items() for name, sub, mod in mods if name.rsplit(".", 1)[-1] in target_modules]
    if not targets:
        names = sorted({sub for _, sub, _ in linears.get(0, [])})
        raise ModelError(f"{where}no Linear module named any of {list(target_modules)} inside numbered transformer "
                         f"layers (layer 0 has {names or 'no Linear modules'}); set model.target_modules to the "
                         "model's attention projection names (e.g. model.target_modules = [\"q_proj\", \"v_proj\"])")
    head = next((h for h in HEAD_CANDIDATES if hasattr(model, h)), None)
    lm_head = output_layer(model) if head is None else None
    if head is None and lm_head is None:
        raise ModelError(f"{where}the model has no 'classifier' or 'score' head and no output layer over a "
                         "vocabulary; load it as a sequence classifier or a causal LM")
    head_shapes = {n: tuple(p.shape) for n, p in getattr(model, head).named_parameters()} if head else {}
    L = int(cfg.num_hidden_layers)
    if sorted({t.layer for t in targets}) != list(range(L)):
        raise ModelError(f"{where}LoRA targets found in layers {sorted({t.layer for t in targets})}, "
                         f"expected 0..{L - 1}")
    spec = dict(num_layers=L, hidden=int(cfg.hidden_size),
                intermediate=int(getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size),
                targets=tuple(sorted(targets, key=lambda t: (t.layer, t.module))))
    num_labels = int(getattr(model, "num_labels", cfg.num_labels)) if head else 0
    if lm_head is None and getattr(model, "backbone_kind", "") != "decoder":
        return ModelSpec(**spec, head_module=head, head_shapes=head_shapes, num_labels=num_labels)
    # a decoder: its lm_head (frozen, priced over the vocabulary), or a classifier's trained head
    # (models.LastTokenClassifier: the blocks priced as a decoder's, the head as an encoder's)
    heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    return ModelSpec(**spec, head_module=head or "", head_shapes=head_shapes, num_labels=num_labels, kind="decoder",
                     block_macs=sum(m.in_features * m.out_features for _, _, m in linears[0]),
                     attn_width=heads * head_dim, vocab=int(lm_head.out_features) if lm_head is not None else 0)

