"""Config -> everything a round loop needs, in two sides that a deployment keeps apart.

Server side (`build_server`): fleet, base model, spec, host, task, method, the test set and the
method's context, which it builds from the facts each device reports about its partition
(`PartitionFacts`: sample count and label histogram, nothing else). Device side
(`build_device`): the same base model and host, the fleet's cost model, and the device's own
training data, however it got it (its own file in deployment, `device_data.py`).

In-process engines (local loop, Flower simulation) use `build_experiment`: the registered
dataset's split and seeded partitions give every device's data (`load_split`,
`device_partitions`) and their facts; the same `build_server` then builds the server side.
Each piece comes from its registry (models.MODELS, hosts.HOSTS, tasks.TASKS, methods.METHODS),
so a new model family, adapter kind, task or method is added there, not here. Nothing here
runs a round.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from .assets import ModelAsset, resolve_model
from .client import local_steps_for
from .config import Config
from .data import Encoded, label_histogram, partition, train_test_sources
from .datasets import TextDataset
from .device_cache import DeviceCaches
from .devices import Fleet
from .execution import check_precision, resolve_device
from .hosts import AdapterHost, build_host
from .methods import Method, MethodContext, make_method
from .methods.aggregation import with_zero_residuals
from .models import build_model, model_kind
from .prefix_cache import PrefixCache, cache_for
from .spec import AdapterState, ModelSpec, inspect_model
from .lmdata import load_dataset, task_kind
from .tasks import Task, build_task, check_fits


@dataclass(frozen=True)
class PartitionFacts:
    """What a device reports about its data, and all the server learns of it: the sample count
    (its local steps per epoch) and the label histogram (what HierFedLoRA groups on)."""
    samples: int
    label_counts: tuple[int, ...]


def facts_of(data: Encoded, num_labels: int) -> PartitionFacts:
    return PartitionFacts(len(data), tuple(label_histogram(data.labels, num_labels)))


@dataclass
class Experiment:
    """The server side of a run; in-process engines also hold every device's data (`train`, `parts`)."""
    cfg: Config
    spec: ModelSpec
    host: AdapterHost
    task: Task
    method: Method
    fleet: Fleet
    test: Encoded
    label_names: list[str]
    pad_id: int
    initial_state: AdapterState
    steps: list[int]   # each device's optimizer steps per round
    facts: list[PartitionFacts]
    train: Encoded | None = None            # in-process only: every device's training examples
    parts: list[np.ndarray] | None = None   # in-process only: each device's indices into `train`
    prefix_cache: PrefixCache | None = None  # frozen-prefix activations (prefix_cache.py; host wall clock only)

    def device_data(self, device: int) -> Encoded:
        if self.train is None or self.parts is None:
            raise RuntimeError("this experiment holds no device's data (a deployed server); devices train on their own")
        return self.train.subset(self.parts[device])

    def label_histograms(self) -> list[list[int]]:
        return [list(f.label_counts) for f in self.facts]


@dataclass
class DeviceExperiment:
    """One device's side: the base model with the method's host, the task, the fleet's cost model
    and its own training data. Duck-types Experiment where engine.local.run_device reads it."""
    cfg: Config
    device: int
    spec: ModelSpec
    host: AdapterHost
    task: Task
    fleet: Fleet
    data: Encoded
    label_names: list[str]
    pad_id: int
    prefix_cache: PrefixCache | None = None

    def device_data(self, device: int) -> Encoded:
        if device != self.device:
            raise ValueError(f"this is device {self.device}; it holds no data of device {device}")
        return self.data


@dataclass(frozen=True)
class ModelSource:
    """Where both sides load the base model and tokenizer from."""
    asset: ModelAsset
    tokenizer: Any
    pad_id: int


@dataclass
class SplitData:
    """The registered dataset (or data.name = 'file') of the config: fixed split, tokenized."""
    label_names: list[str]
    train: Encoded
    test: Encoded


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def quiet_libraries(cfg: Config) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "classifier newly initialised" notice is expected
    hf_logging.disable_progress_bar()
    # peft 0.21 calls a transformers helper that transformers 5.23 marks deprecated: not ours to act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)


def load_model_source(cfg: Config) -> ModelSource:
    from transformers import AutoTokenizer

    from .models import load_tokenizer

    quiet_libraries(cfg)
    asset = resolve_model(cfg.model.name, cfg.model.path, cfg.model.target_modules, cfg.model.kind)
    # a decoder's tokenizer pads with eos when it has no pad token (Llama's)
    tokenizer = load_tokenizer(asset.path) if asset.kind == "decoder" else AutoTokenizer.from_pretrained(asset.path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return ModelSource(asset, tokenizer, pad_id)


def encode_examples(cfg: Config, source: ModelSource, ds: TextDataset, idx) -> Encoded:
    """Examples `idx` of `ds`, tokenized: the one place where server (test set) and devices (their own
    files, device_data.py) encode, so both sides agree on the encoding."""
    # the task encodes: classification (text pairs: the tokenizer's pair encoding), or a prompt and its answer
    kind = task_kind(cfg.data)
    check_fits(kind, source.asset.kind, cfg.model.name)
    return build_task(kind, cfg.data).encode(source.tokenizer, ds, list(idx), cfg.data.max_length)


def load_split(cfg: Config, source: ModelSource) -> SplitData:
    """cfg.data's examples, split (fixed seed) and tokenized; the test part cut to data.eval_subset."""
    ds = load_dataset(cfg.data)   # a TextDataset, or an LMDataset (mmlu, math, prompt/answer files)
    (train_ds, train_idx), (test_ds, test_idx) = train_test_sources(ds, cfg.data.test_size)
    train, test = encode_examples(cfg, source, train_ds, train_idx), encode_examples(cfg, source, test_ds, test_idx)
    if cfg.data.eval_subset:
        test = test.subset(range(min(cfg.data.eval_subset, len(test))))
    return SplitData(ds.label_names, train, test)


def device_partitions(cfg: Config, train: Encoded, num_devices: int | None = None,
                      seed: int | None = None) -> list[np.ndarray]:
    """The seeded partitions of `train` (partition.kind / alpha), one per device."""
    return partition(train.labels, num_devices or cfg.fleet.devices, cfg.partition.kind, cfg.partition.alpha,
                     cfg.run.seed if seed is None else seed, min_size=cfg.train.batch_size)


def make_fleet(cfg: Config) -> Fleet:
    f = cfg.fleet
    fleet = Fleet(f.devices, cfg.run.seed, f.mode_change_every, f.bandwidth_min_mbps, f.bandwidth_max_mbps,
                  f.downlink_factor, f.dropout_rate, f.backward_cost)
    if f.device_activation_cache:
        fleet.cache = DeviceCaches(f.device_cache_mb)
    return fleet


def load_base_model(cfg: Config, source: ModelSource, num_labels: int) -> tuple[torch.nn.Module, ModelSpec]:
    device = resolve_device(cfg.run.device)   # run.device / run.precision: a clear error before the model loads
    check_precision(cfg.run.precision, device)
    check_precision(cfg.run.eval_precision or cfg.run.precision, device)
    seed_everything(cfg.run.seed)  # fixes the head's and the LoRA tensors' initialisation
    kind = model_kind(source.asset.kind, task_kind(cfg.data))   # a decoder that classifies gets a head
    model = build_model(kind, source.asset.path, num_labels=num_labels, dropout=cfg.model.dropout)
    return model.to(device), inspect_model(model, source.asset.target_modules, str(source.asset.path))


def steps_per_device(cfg: Config, facts: list[PartitionFacts]) -> list[int]:
    return [local_steps_for(f.samples, cfg.train.batch_size, cfg.train.local_steps, cfg.train.local_epochs)
            for f in facts]


def method_context(cfg: Config, spec: ModelSpec, facts: list[PartitionFacts], nominal_width: int,
                   nominal_outputs: int | None = None) -> MethodContext:
    """The facts a method plans with: each device's steps and label counts, from its reported partition."""
    return MethodContext(spec=spec, num_devices=cfg.fleet.devices, local_steps=tuple(steps_per_device(cfg, facts)),
                         batch_size=cfg.train.batch_size, nominal_width=nominal_width,
                         nominal_outputs=nominal_outputs, seed=cfg.run.seed,
                         alpha_over_rank=cfg.model.lora_alpha_over_rank,
                         label_counts=tuple(f.label_counts for f in facts))


def attach_host(cfg: Config, method: Method, model: torch.nn.Module, spec: ModelSpec) -> AdapterHost:
    return build_host(method.info.host, model, spec, method.global_ranks(), cfg.model.lora_alpha_over_rank,
                      cfg.model.lora_dropout)


def nominal_width_of(data: Encoded) -> int:
    """Typical padded sequence length for FLOP budgets: the 90th percentile of token counts."""
    return int(np.percentile([len(x) for x in data.ids], 90))


def nominal_outputs_of(data: Encoded) -> int | None:
    """Typical output-layer positions per sequence for FLOP budgets: an LM task's answer tokens + 1
    (tasks.lm.answer_keep; 90th percentile, as the width); None (one pooled position) otherwise."""
    if data.answer_start is None:
        return None
    return int(np.percentile([len(x) - int(a) for x, a in zip(data.ids, data.answer_start)], 90)) + 1


def build_server(cfg: Config, source: ModelSource, facts: list[PartitionFacts], test: Encoded,
                 label_names: list[str], nominal: Encoded,
                 make: Callable[[MethodContext], Method] | None = None) -> Experiment:
    """The server side from what it holds (model, test set) and what devices reported (`facts`);
    `nominal`: the examples whose typical sizes price a method's FLOP budgets.
    `make` builds the method from its context instead of the registry (cfg.method.name): a fixed
    layout of the pre-tests (pretest.py); the host's global layout is then that method's."""
    if len(facts) != cfg.fleet.devices:
        raise ValueError(f"{len(facts)} partition reports for a fleet of {cfg.fleet.devices} devices")
    fleet = make_fleet(cfg)
    model, spec = load_base_model(cfg, source, len(label_names))
    ctx = method_context(cfg, spec, facts, nominal_width_of(nominal), nominal_outputs_of(nominal))
    method = make(ctx) if make is not None else make_method(cfg.method.name, ctx, cfg.method.model_dump())
    host = attach_host(cfg, method, model, spec)
    initial = host.read(host.GLOBAL)
    if method.info.residual:   # FLoRA, FedEx-LoRA: the frozen weights' residuals start at zero
        initial = with_zero_residuals(initial)
    # host.spec: the bottleneck host's spec describes its adapter sites, so the cost model prices adapters
    return Experiment(cfg, host.spec, host, build_task(task_kind(cfg.data), cfg.data), method, fleet, test, label_names,
                      source.pad_id, initial, steps_per_device(cfg, facts), list(facts))


def build_experiment(cfg: Config, make: Callable[[MethodContext], Method] | None = None) -> Experiment:
    """In-process (local loop, Flower simulation): the server side plus every device's data
    (`make`: see build_server)."""
    source = load_model_source(cfg)
    split = load_split(cfg, source)
    parts = device_partitions(cfg, split.train)
    facts = [facts_of(split.train.subset(p), len(split.label_names)) for p in parts]
    exp = build_server(cfg, source, facts, split.test, split.label_names, split.train, make)
    exp.train, exp.parts = split.train, parts
    exp.prefix_cache = cache_for(cfg.cache, exp.spec.hidden, [len(x) for x in split.train.ids],
                                 cfg.run.rounds * cfg.train.batch_size * sum(exp.steps), cfg.model.dropout)
    return exp


def build_device(cfg: Config, device: int, source: ModelSource, data: Encoded, label_names: list[str]) -> DeviceExperiment:
    """One device's side: the base model and host as the server builds them, and its own `data`.

    The host needs the method's kind and global layout only, which depend on the config, not on
    the other devices' facts: the method here is built with placeholder facts and then dropped."""
    if not 0 <= device < cfg.fleet.devices:
        raise ValueError(f"device {device} is not in the fleet of {cfg.fleet.devices} devices (0..{cfg.fleet.devices - 1})")
    fleet = make_fleet(cfg)
    model, spec = load_base_model(cfg, source, len(label_names))
    placeholder = [PartitionFacts(len(data), (0,) * len(label_names))] * cfg.fleet.devices
    method = make_method(cfg.method.name, method_context(cfg, spec, placeholder, cfg.data.max_length),
                         cfg.method.model_dump())
    host = attach_host(cfg, method, model, spec)
    steps = local_steps_for(len(data), cfg.train.batch_size, cfg.train.local_steps, cfg.train.local_epochs)
    cache = cache_for(cfg.cache, host.spec.hidden, [len(x) for x in data.ids], cfg.run.rounds * cfg.train.batch_size * steps,
                      cfg.model.dropout)
    return DeviceExperiment(cfg, device, host.spec, host, build_task(task_kind(cfg.data), cfg.data), fleet, data, label_names,
                            source.pad_id, prefix_cache=cache)
