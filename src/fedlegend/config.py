"""Typed experiment configuration: one TOML file holds every knob.

Every section forbids unknown keys and every number carries its allowed range, so a
typo or an out-of-range value fails with a message naming the field and the fix.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from .errors import UserError
from .execution import DEVICE_PATTERN


class ConfigError(UserError, ValueError):
    """A config file or override that cannot be used; the message names the field."""


from .method_config import MethodConfig
from .method_config import Section as _Section


class ModelConfig(_Section):
    name: str = Field("minilm-l6", description="registered model (minilm-l6, mpnet-base: encoders; smollm2-135m: "
                      "a decoder) or 'local'")
    path: str | None = Field(None, description="a local Hugging Face model folder when name = 'local'")
    kind: Literal["auto", "encoder", "decoder"] = Field(
        "auto", description="auto: a registered model's own kind; a local folder's from its config.json "
                            "architectures (*ForCausalLM: decoder)")
    target_modules: list[str] | None = Field(
        None, description="LoRA target module names inside a layer; default: the model's own (decoders: "
                          "q_proj, v_proj or the model's fused attention projection)"
    )
    lora_alpha_over_rank: float = Field(2.0, gt=0, description="LoRA alpha = this * rank (same scaling at every rank)")
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    dropout: float = Field(0.0, ge=0, lt=1, description="encoder and head dropout during local training "
                           "(0: short federated runs learn faster without it, and steps are ~10 % cheaper)")


class DataConfig(_Section):
    name: str = Field("rotten-tomatoes", description="registered dataset (rotten-tomatoes, trec, vitaminc, mmlu, math) or 'file'")
    path: str | None = Field(None, description="a CSV or JSONL file when name = 'file' (vitaminc: optional, "
                             "BIG-bench's bigbench-1.0.0.tar.gz or its vitaminc task.json)")
    text_column: str = "text"
    text_pair_column: str | None = Field(None, description="a file's second text column: classify text pairs "
                                         "(e.g. premise/hypothesis); unset: single texts")
    label_column: str = "label"
    test_size: int = Field(1500, ge=10, description="held-out test examples (fixed seeded split)")
    max_length: int = Field(64, ge=8, le=512)
    eval_subset: int | None = Field(None, ge=10, description="evaluate on the first N test examples only")
    task: Literal["auto", "classification", "multiple-choice", "generation"] = Field(
        "auto", description="the task kind; auto: the data's own (mmlu: multiple-choice, math: generation, a file "
                            "with prompt/answer columns: generation, else classification)")
    prompt_column: str = Field("prompt", description="a file's prompt column (generation; multiple-choice: the "
                               "question, with options in answer_a..answer_d or A..D)")
    answer_column: str = Field("answer", description="a file's answer column (generation: a worked answer whose "
                               "last number is scored; multiple-choice: the correct letter A-D)")
    math_generator: Literal["chain_sum", "leg_counting", "basic_arithmetic", "gsm_symbolic"] = Field(
        "chain_sum", description="data.name = 'math': the reasoning-gym generator "
                                "(chain_sum, leg_counting, basic_arithmetic, gsm_symbolic)")
    math_size: int = Field(4000, ge=20, description="data.name = 'math': problems generated (fixed seed)")
    math_eval: Literal["split", "gsm8k"] = Field(
        "split", description="data.name = 'math': score on held-out generated problems (split), or on GSM8K's "
                             "test file (not with gsm_symbolic, whose templates come from it)")
    max_new_tokens: int = Field(64, ge=1, le=1024, description="generation: greedy tokens at most per answer")

    @model_validator(mode="after")
    def _gsm8k_uncontaminated(self) -> "DataConfig":
        if self.math_eval == "gsm8k" and self.math_generator == "gsm_symbolic":
            raise ValueError("math_eval = 'gsm8k' needs a math_generator other than gsm_symbolic (its templates "
                             "come from GSM8K's test problems: the score would be contaminated)")
        return self


class PartitionConfig(_Section):
    kind: Literal["dirichlet", "iid"] = "dirichlet"
    alpha: float = Field(10.0, gt=0, description="Dirichlet concentration over labels (paper: 10)")


class FleetConfig(_Section):
    devices: int = Field(6, ge=1, le=10000, description="fleet size (the paper: 80)")
    mode_change_every: int = Field(20, ge=1, description="rounds between random power-mode changes (paper: 20)")
    bandwidth_min_mbps: float = Field(1.0, gt=0)
    bandwidth_max_mbps: float = Field(30.0, gt=0)
    downlink_factor: float = Field(4.0, gt=0, description="download bandwidth = upload bandwidth * this")
    round_deadline_s: float | None = Field(
        None, gt=0, description="per-round budget; sets C_i = speed*deadline and B_i = bandwidth*deadline (eq. 14-15)"
    )
    dropout_rate: float = Field(
        0.0, ge=0, lt=1, description="chance a device drops out of a round (before upload, after a drawn share "
                                     "of its compute; its update is lost); 0 disables"
    )
    cutoff_s: float | None = Field(
        None, gt=0, description="straggler cutoff (virtual s): the server closes each round at this time, devices "
                                "not done by then are cut off (work lost); null waits for every device"
    )
    device_activation_cache: bool = Field(
        False, description="each device keeps its frozen layers' outputs for its own examples across rounds: no "
                           "forward below its lowest trained layer for an example it holds at that boundary (cost "
                           "model only, local engine; docs/device_cache.md)"
    )
    device_cache_mb: float = Field(
        1024.0, gt=0, description="per-device storage for the activation cache (fp16 states, least recently used "
                                  "evicted beyond it); 1 GiB = 1/8 of a Jetson TX2's or Xavier NX's 8 GB"
    )
    backward_cost: float = Field(
        1.0, ge=0.5, le=10.0, description="a device's backward runs this many times slower per FLOP than its forward: "
                                          "1 = the FLOP count alone (a frozen layer's backward ~ one forward; a CPU "
                                          "measures that: docs/pretest.md); about 3.6 gives the paper's devices' "
                                          "+252 % latency from LoRA depth 1 to 12"
    )

    @model_validator(mode="after")
    def _bandwidth_order(self) -> "FleetConfig":
        if self.bandwidth_min_mbps > self.bandwidth_max_mbps:
            raise ValueError("bandwidth_min_mbps must not exceed bandwidth_max_mbps")
        return self


class TrainConfig(_Section):
    local_steps: int = Field(5, ge=0, description="optimizer steps per device per round (0: use local_epochs)")
    local_epochs: float = Field(1.0, gt=0, description="passes over the device's data per round when local_steps = 0")
    batch_size: int = Field(8, ge=1, le=1024)
    lr: float = Field(2e-3, gt=0, le=1.0, description="AdamW learning rate (paper: 0.002)")
    schedule: Literal["cosine", "constant"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    eval_batch_size: int = Field(128, ge=1)
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping norm (0 disables)")


class RunConfig(_Section):
    seed: int = Field(0, ge=0)
    rounds: int = Field(36, ge=1, le=100000)
    eval_every: int = Field(5, ge=1)
    target_accuracy: float = Field(0.75, gt=0, le=1)
    threads: int | None = Field(None, ge=1, description="torch threads; default: all cores")
    eval_precision: Literal["fp32", "bf16"] | None = Field(
        None, description="precision of evaluation only (training keeps run.precision); default: run.precision. "
        "bf16 halves evaluation on a CPU with AVX512-BF16 and moves scores slightly (docs/benchmarks.md)")
    engine: Literal["local", "flower"] = Field("local", description="local: in-process loop; flower: Flower's "
                                               "simulation engine, one SuperNode per device (same records)")
    device: str = Field("auto",
                        description="where the model trains and evaluates: auto (the first CUDA GPU when one is "
                                    "visible, else the CPU), cpu, cuda or cuda:N")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="fp32, or bf16 autocast (weights and optimizer "
                                               "stay fp32; changes the numbers; pays on GPUs)")
    batch_devices: bool | int | Literal["auto"] = Field(
        False, description="train the devices of a round that share a layout together, one forward and backward "
        "over the shared base model (LoRA host, classification, no dropout; same results within float rounding; "
        "docs/batched.md); an integer: at most that many devices a group; auto: on a CUDA GPU, on a CPU for groups "
        "of 16 devices or more")

    workers: int | Literal["auto"] = Field(
        1, description="processes that train a round's devices in parallel (local engine; each runs torch with one "
        "thread; the same results within float rounding; docs/benchmarks.md); auto: one per core")

    @field_validator("workers")
    @classmethod
    def _workers(cls, n: int | str) -> int | str:
        if n != "auto" and n < 1:
            raise ValueError("use a number of processes >= 1, or 'auto' (one per core)")
        return n

    @field_validator("device")
    @classmethod
    def _device_name(cls, name: str) -> str:
        if not re.match(DEVICE_PATTERN, name):
            raise ValueError("use 'auto', 'cpu', 'cuda' or 'cuda:N' (N = a GPU index)")
        return name


class PrivacyConfig(_Section):
    epsilon: float | None = Field(None, gt=0, description="differential privacy: the target epsilon over the run "
                                  "(user-level, every round counted); sets the noise multiplier, or with "
                                  "noise_multiplier set stops the run when spent; null with no noise_multiplier: no DP")
    delta: float = Field(1e-5, gt=0, lt=1, description="the delta of (epsilon, delta); keep it well below 1 / devices")
    clip: float = Field(1.0, gt=0, description="C: each device's whole update (trained minus received, every "
                        "tensor as one vector) is clipped to this L2 norm; the noise is calibrated to it")
    noise_multiplier: float | None = Field(None, gt=0, description="sigma: noise std = sigma * sensitivity; null: "
                                           "calibrated from epsilon over run.rounds")
    mode: Literal["central", "local"] = Field("central", description="central: the server adds noise to each "
                                              "aggregate; local: each device noises its own clipped update")
    seeded_noise: bool = Field(True, description="draw the noise from run.seed (reproducible experiments); "
                               "false: from the OS's secret source (a deployment: seeded noise protects nothing)")
    secure_aggregation: bool = Field(False, description="Flower engine only: the devices' updates are summed under "
                                     "Flower's SecAgg+, so the server learns only sums (methods whose rule is a "
                                     "weighted sum; docs/privacy.md, 'Secure aggregation')")
    secagg_range: float = Field(8.0, gt=0, description="SecAgg+ quantisation range: every value a device "
                                "contributes (its weight times its update, on the global shape) must lie in "
                                "[-range, range], or the device fails the round; a wider range, a coarser grid")



class CacheConfig(_Section):
    prefix_cache: bool | Literal["auto"] = Field(
        "auto", description="frozen-prefix cache: reuse each example's hidden states below a device's lowest trained "
        "layer across rounds (host wall clock only, never virtual time; docs/cache.md); auto: on when examples "
        "repeat (>= 2 draws each over the run), their states fit max_mb and model.dropout = 0 (true: also with "
        "dropout, then the frozen layers run without it)")
    max_mb: float = Field(1024.0, gt=0, description="the cache's memory bound (MiB of stored states; least "
                          "recently used evicted beyond it)")
    fp16: bool = Field(False, description="store the states in fp16: half the memory, no longer exact "
                       "(about 1e-3 relative in the states)")


class Config(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    partition: PartitionConfig = Field(default_factory=PartitionConfig)
    fleet: FleetConfig = Field(default_factory=FleetConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)

    @model_validator(mode="after")
    def _device_cache_engine(self) -> "Config":
        """The device activation cache is state of the simulated devices, which only the local engine keeps
        (and checkpoints) in one place."""
        if self.fleet.device_activation_cache and self.run.engine != "local":
            raise ValueError("fleet.device_activation_cache is simulated by the local engine only; use "
                             "run.engine = \"local\" or turn the cache off")
        if self.run.workers not in (1, "auto") and self.run.engine != "local":
            raise ValueError("run.workers is the local engine's; the Flower engine already runs every device in a "
                             "process of its own: drop run.workers (or --workers)")
        return self

    @model_validator(mode="after")
    def _privacy_fits_method(self) -> "Config":
        """DP only where the method's aggregation is a sum (privacy/support.py says why not)."""
        p = self.privacy
        if p.secure_aggregation:
            from .privacy.secagg import refusal as secagg_refusal
            why = secagg_refusal(self)
            if why:
                raise ValueError(f"privacy.secure_aggregation: {why}")
        if p.epsilon is None and p.noise_multiplier is None:
            return self
        from .methods import METHODS
        from .privacy.support import refusal
        params = getattr(self.method, METHODS[self.method.name].section, None)
        why = refusal(self.method.name, params.model_dump() if isinstance(params, BaseModel) else {})
        if why:
            raise ValueError(f"privacy: {why}")
        if p.epsilon is not None and p.noise_multiplier is not None and self.run.engine != "local":
            raise ValueError("privacy: a fixed noise_multiplier with a target epsilon stops the run early, which "
                             "only the local engine does; drop privacy.noise_multiplier (calibrated from epsilon)")
        return self


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        if not e["loc"]:   # a check across sections ([privacy] vs the method): its message names the fields
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
        elif e["type"] == "extra_forbidden":
            lines.append(f"  {field}: unknown key; check the spelling (see configs/default.toml for every key)")
        else:
            lines.append(f"  {field}: {e['msg'].removeprefix('Value error, ')} (got {e.get('input')!r})")
    return "\n".join(lines)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {p} is not a section")
    node[parts[-1]] = value


def build_config(data: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None,
                 source: str = "config") -> Config:
    """Validate a config tree plus dotted overrides (e.g. {"run.rounds": 5})."""
    tree: dict[str, Any] = {k: dict(v) if isinstance(v, dict) else v for k, v in (data or {}).items()}
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


# Presets are the TOML files of the source checkout's configs/ folder: `--preset trec` is configs/trec.toml.
PRESETS_DIR = Path(__file__).resolve().parents[2] / "configs"


def preset_names(folder: Path | None = None) -> list[str]:
    return sorted(p.stem for p in (folder or PRESETS_DIR).glob("*.toml"))


def preset_path(name: str, folder: Path | None = None) -> Path:
    """configs/NAME.toml; an unknown name lists the presets there are."""
    folder = folder or PRESETS_DIR
    names = preset_names(folder)
    if not names:
        raise ConfigError(f"no presets: {folder} holds no .toml files (presets ship with the source checkout); "
                          "pass a config file with --config instead")
    if name not in names:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(names)} (files in {folder})")
    return folder / f"{name}.toml"


def _read_toml(p: Path) -> dict[str, Any]:
    if not p.is_file():
        raise ConfigError(f"config file not found: {p} (pass an existing TOML file to --config)")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{p}: not valid TOML: {err}") from None


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`, section by section (a key in `over` wins; sections merge)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                preset: str | None = None) -> Config:
    """The config of a preset (configs/NAME.toml), then a config file on top, then the overrides (flags)."""
    data: dict[str, Any] = {}
    sources = []
    if preset is not None:
        pp = preset_path(preset)
        data = _read_toml(pp)
        sources.append(f"preset {preset}: {pp}")
    if path is not None:
        data = _merged(data, _read_toml(Path(path)))
        sources.append(str(path))
    return build_config(data, overrides, source=" + ".join(sources) or "defaults")


def dump_config(cfg: Config) -> str:
    """The full resolved config as TOML (None values are omitted: TOML has no null)."""
    return tomli_w.dumps(cfg.model_dump(exclude_none=True))


def annotated_defaults() -> str:
    """Every knob with its default and description: the text of configs/default.toml."""
    out = ["# fedlegend: every knob with its default. Flags of `fedlegend run` override these.",
           "# Generated by fedlegend.config.annotated_defaults(); a test keeps it in sync.", ""]

    def section(model: BaseModel, path: str) -> None:
        subs = []
        out.append(f"[{path}]")
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                subs.append((value, f"{path}.{name}"))
                continue
            if field.description:
                out.append(f"# {field.description}")
            if value is None:
                out.append(f"# {name} = (unset)")
            else:
                out.append(tomli_w.dumps({name: value}).strip())
        out.append("")
        for sub, sub_path in subs:
            section(sub, sub_path)

    cfg = Config()
    for name in type(cfg).model_fields:
        section(getattr(cfg, name), name)
    return "\n".join(out)
