"""Bottleneck adapters (Houlsby / Pfeiffer style) on chosen layers, one width per layer: FedAdapter's module.

Why a module of ours: the maintained adapter library (`adapters`, AdapterHub) pins
transformers~=4.57 while fedlegend runs transformers 5.x, and peft (0.21) has no
bottleneck adapters. The module is small: per transformer layer l, on the output of the
FFN's output projection (`...layer.{l}.output.dense` in BERT / MPNet / MiniLM, i.e. the
Linear intermediate -> hidden, before dropout, the residual add and LayerNorm, where
Houlsby et al. 2019 and Pfeiffer et al. 2021 put the FFN adapter):

    h  <-  h + up(relu(down(h)))        down: hidden -> w,  up: w -> hidden

Initialisation: down ~ N(0, 0.01^2) truncated at 2 std, as Houlsby et al. (sec. 2.1, the
near-identity init); up and both biases zero, so every adapter is exactly the identity until
trained (FedAdapter's code base inherits AdapterHub, where adapters also start near identity).

Canonical adapter state (same flat layout idea as fedlegend.spec):
    "layers.{l}.adapter.down.weight" -> (w_l, hidden)    "layers.{l}.adapter.down.bias" -> (w_l,)
    "layers.{l}.adapter.up.weight"   -> (hidden, w_l)    "layers.{l}.adapter.up.bias"   -> (hidden,)
    "head.{param}"                   -> the task head's tensors (same keys as LoraHost's)

Like LoraHost, one base model stays in memory and each distinct (layer -> width) layout gets
its own adapter modules; only the active layout's adapters run (through forward hooks on
the FFN output projections, so the base model's modules and names are untouched) and
require grad, and the base model stays frozen. The task head is one module shared by all
layouts (load() writes it every time a layout is used).

Export (`save_pretrained`): an open format, no library needed to read it:
    adapter_model.safetensors   the canonical state above (float tensors)
    bottleneck_config.json      {"format": "fedlegend-bottleneck/1", "widths": {layer: w},
                                 "placement": {layer: module name in the base model},
                                 "position": "output of the FFN output projection, before dropout,
                                 residual and LayerNorm", "activation": "relu", "hidden": d,
                                 "head_module": "classifier", "residual": true}
`BottleneckHost.from_pretrained(base_model, folder)` loads it back onto a base model from
fedlegend.models.encoder.load_base_model; `host.model` is then the adapted classifier.

Decoders (causal LMs, fedlegend.models.decoder): the adapter sits after each decoder block's MLP,
on the output of its down projection (`model.layers.{l}.mlp.down_proj` in Llama), before the
residual add; there is no head (no "head.*" keys: the lm_head stays frozen) and "head_module" is "".
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ..spec import LAYER_RE, AdapterState, LoraTarget, ModelSpec, Ranks, inspect_model
from .base import AdapterHost

FORMAT = "fedlegend-bottleneck/1"
CONFIG_NAME = "bottleneck_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
POSITION = "output of the FFN output projection, before dropout, residual and LayerNorm"
DECODER_POSITION = "output of the MLP's down projection, before the residual add"
# where several Linear intermediate -> hidden share a layer, the FFN's output projection is named so
FFN_OUTPUT_NAMES = (".output.dense", ".mlp.down_proj")


def adapter_key(layer: int, part: str) -> str:
    """part: 'down.weight', 'down.bias', 'up.weight' or 'up.bias'."""
    return f"layers.{layer}.adapter.{part}"


class Bottleneck(nn.Module):
    """x -> up(relu(down(x))): the residual branch (the hook adds it to x)."""

    def __init__(self, hidden: int, width: int, init: bool = True):
        super().__init__()
        self.down = nn.Linear(hidden, width)
        self.up = nn.Linear(width, hidden)
        with torch.no_grad():
            if init:
                nn.init.trunc_normal_(self.down.weight, std=1e-2, a=-2e-2, b=2e-2)
            else:
                self.down.weight.zero_()
            self.down.bias.zero_()
            self.up.weight.zero_()
            self.up.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(torch.relu(self.down(x)))


def find_ffn_outputs(model: nn.Module, num_layers: int, hidden: int, intermediate: int) -> dict[int, str]:
    """Layer -> name of its FFN output projection (a Linear intermediate -> hidden inside layer l).

    Where several Linear layers of a layer have that shape (intermediate == hidden), the one
    named `output.dense` (BERT, MPNet) or `mlp.down_proj` (Llama, Qwen) wins."""
    found: dict[int, list[str]] = {}
    for name, mod in model.named_modules():
        m = LAYER_RE.match(name)
        if m and isinstance(mod, nn.Linear) and mod.in_features == intermediate and mod.out_features == hidden:
            found.setdefault(int(m["idx"]), []).append(name)
    sites = {}
    for layer in range(num_layers):
        names = found.get(layer, [])
        if len(names) > 1:
            names = [n for n in names if n.endswith(FFN_OUTPUT_NAMES) and ".attention." not in n] or names
        if len(names) != 1:
            raise ValueError(
                f"bottleneck adapters: cannot place an adapter in transformer layer {layer}: expected one FFN output "
                f"projection (a Linear {intermediate} -> {hidden}, e.g. '...layer.{layer}.output.dense'), found "
                f"{names or 'none'}; this model's layout is not supported by fedlegend.hosts.bottleneck")
        sites[layer] = names[0]
    return sites


def adapter_spec(spec: ModelSpec, sites: dict[int, str]) -> ModelSpec:
    """The model's spec with one 'adapter' target per layer (d_in = d_out = hidden).

    The cost model counts a layer's extra parameters per unit rank as sum(d_in + d_out) over its
    targets: for a bottleneck of width w that is w * 2 * hidden (down + up), exactly the
    adapter's parameters (biases aside), so devices.round_work prices adapters correctly
    when given this spec and the layer -> width map."""
    targets = tuple(LoraTarget(l, "adapter", sites[l], spec.hidden, spec.hidden) for l in sorted(sites))
    return replace(spec, targets=targets, head_shapes=dict(spec.head_shapes))


class BottleneckHost(AdapterHost):
    """One base model with bottleneck adapters, one set per distinct (layer -> width) layout.

    Same interface as LoraHost (fedlegend.hosts.base.AdapterHost): `use(widths)` activates
    (creating on first use) the layout and returns its name; `params`, `load`, `read` move
    canonical state in and out.
    """

    def __init__(self, model: nn.Module, spec: ModelSpec, global_ranks: Ranks, max_layouts: int = 64):
        sites = find_ffn_outputs(model, spec.num_layers, spec.hidden, spec.intermediate)
        super().__init__(adapter_spec(spec, sites), global_ranks, max_layouts)
        self.base = model
        self.sites = sites
        for p in model.parameters():
            p.requires_grad_(False)
        self.head = getattr(model, spec.head_module) if spec.has_head else None   # decoders: none
        self._modules: dict[str, nn.ModuleDict] = {}
        self._active: nn.ModuleDict | None = None
        modules = dict(model.named_modules())
        self._hooks = [modules[name].register_forward_hook(self._hook(layer)) for layer, name in sites.items()]
        # the global adapters' initial tensors come from torch's generator, seeded by the experiment
        self._adopt(self.global_ranks, self.GLOBAL, self._build(self.GLOBAL, self.global_ranks, init=True))
        self.use(self.global_ranks)

    @property
    def model(self) -> nn.Module:
        return self.base

    def _hook(self, layer: int):
        key = str(layer)

        def hook(module, inputs, output):
            active = self._active
            if active is None or key not in active:
                return output
            return output + active[key](output)
        return hook

    def _build(self, name: str, ranks: Ranks, init: bool) -> dict[str, nn.Parameter]:
        if not ranks:
            raise ValueError("an adapter layout needs at least one layer")
        site_param = next(iter((self.head if self.head is not None else self.base).parameters()))
        mods = nn.ModuleDict()
        for layer, w in sorted(ranks.items()):
            if not 0 <= layer < self.spec.num_layers:
                raise ValueError(f"layer {layer} is outside the model's layers 0..{self.spec.num_layers - 1}")
            if w < 1:
                raise ValueError(f"adapter width of layer {layer} must be >= 1, got {w}")
            mods[str(layer)] = Bottleneck(self.spec.hidden, int(w), init)
        mods.to(device=site_param.device, dtype=site_param.dtype)
        params: dict[str, nn.Parameter] = {}
        for layer, mod in mods.items():
            for part, p in mod.named_parameters():
                params[adapter_key(int(layer), part)] = p
        for pname, p in (self.head.named_parameters() if self.head is not None else ()):
            params["head." + pname] = p
        self._modules[name] = mods
        return params

    def _create(self, name: str, ranks: Ranks) -> dict[str, nn.Parameter]:
        return self._build(name, ranks, init=False)   # load() fills it before any use

    def _delete(self, name: str) -> None:
        if self._active is self._modules[name]:
            self._active = None
        del self._modules[name]

    def _activate(self, name: str) -> None:
        self._active = self._modules[name]

    def config(self) -> dict:
        return {"format": FORMAT, "widths": {str(l): int(w) for l, w in sorted(self.global_ranks.items())},
                "placement": {str(l): self.sites[l] for l in sorted(self.global_ranks)},
                "position": DECODER_POSITION if self.spec.kind == "decoder" else POSITION,
                "activation": "relu", "residual": True, "hidden": self.spec.hidden,
                "head_module": self.spec.head_module}

    def save_pretrained(self, out_dir: str | Path, state: AdapterState) -> None:
        """Write the global adapter: safetensors of the canonical state plus bottleneck_config.json."""
        from safetensors.torch import save_file

        self.load(self.GLOBAL, state)          # checks keys and shapes
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.read(self.GLOBAL).items()}, str(out / WEIGHTS_NAME))
        (out / CONFIG_NAME).write_text(json.dumps(self.config(), indent=1))

    @classmethod
    def from_pretrained(cls, model: nn.Module, folder: str | Path, spec: ModelSpec | None = None) -> "BottleneckHost":
        """The host of a saved adapter on `model` (a fedlegend.models.encoder.load_base_model classifier,
        or a decoder from fedlegend.models.decoder.load_causal_lm)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        cfg = json.loads((folder / CONFIG_NAME).read_text())
        if cfg.get("format") != FORMAT:
            raise ValueError(f"{folder / CONFIG_NAME}: format {cfg.get('format')!r}, expected {FORMAT!r}")
        if spec is None:
            # the adapter sites' names are in every layer: only sizes and the head are used here
            sites = tuple({name.rsplit(".", 1)[-1] for name in cfg.get("placement", {}).values()} | {"dense"})
            spec = inspect_model(model, sites)
        host = cls(model, spec, {int(l): int(w) for l, w in cfg["widths"].items()})
        host.load(cls.GLOBAL, load_file(str(folder / WEIGHTS_NAME)))
        host.use(host.global_ranks)
        return host
