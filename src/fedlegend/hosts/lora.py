"""LoRA on chosen layers with a rank per layer, through peft.

One base model stays in memory. Each distinct rank layout becomes one named peft adapter on
it (LEGEND needs at most L of them), so devices never get a model copy of their own. The
canonical adapter state is described in fedlegend.spec.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from ..spec import RESIDUAL, AdapterState, ModelSpec, Ranks, lora_key, residual_key
from .base import AdapterHost


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
    # an encoder's task head trains with the LoRA; a decoder's lm_head stays frozen (no head keys), and
    # task_type makes the export load as a PeftModelForCausalLM (generate)
    return LoraConfig(r=first, lora_alpha=alpha_over_rank * first, target_modules=names,
                      rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, lora_dropout=dropout,
                      modules_to_save=[spec.head_module] if spec.has_head else None, bias="none",
                      task_type="CAUSAL_LM" if spec.vocab else None)   # a classifying decoder: none


def weight_digest(weight: torch.Tensor) -> str:
    raw = weight.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()   # any dtype, bf16 too
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


class LoraHost(AdapterHost):
    """One base model with one peft adapter per rank layout; residuals folded into the frozen weights."""

    def __init__(self, model: torch.nn.Module, spec: ModelSpec, global_ranks: Ranks,
                 alpha_over_rank: float = 2.0, dropout: float = 0.0, max_layouts: int = 64):
        super().__init__(spec, global_ranks, max_layouts)
        self.alpha_over_rank = alpha_over_rank
        self.dropout = dropout
        # the global adapter's initial tensors come from torch's generator, seeded by the experiment
        self.peft: PeftModel = get_peft_model(model, lora_config(spec, global_ranks, alpha_over_rank, dropout))
        self._adopt(global_ranks, self.GLOBAL, self._index(self.GLOBAL))
        self._w0: dict[str, torch.Tensor] = {}  # pretrained weight of each target a residual changed

    @property
    def model(self) -> torch.nn.Module:
        return self.peft

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
            if self.spec.has_head and head_tag in pname:
                out["head." + pname.split(head_tag, 1)[1]] = p
        return out

    def _create(self, name: str, ranks: Ranks) -> dict[str, torch.nn.Parameter]:
        self.peft.add_adapter(name, lora_config(self.spec, ranks, self.alpha_over_rank, self.dropout))
        return self._index(name)

    def _delete(self, name: str) -> None:
        self.peft.delete_adapter(name)

    def _activate(self, name: str) -> None:
        self.peft.set_adapter(name)

    def load(self, name: str, state: AdapterState) -> None:
        super().load(name, state)
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
            weight.copy_(w0 if res is None else w0 + res.to(w0.device, w0.dtype))  # states are CPU tensors

    @torch.no_grad()
    def frozen_version(self, below: int) -> tuple:
        """Digests of the frozen weights of layers < `below` that a residual has changed (FLoRA,
        FedEx-LoRA): a new residual there gives a new version, so the prefix cache recomputes."""
        return tuple((t.full_name, weight_digest(self._base_linear(t.full_name).weight))
                     for t in self.spec.targets if t.layer < below and t.full_name in self._w0)

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
