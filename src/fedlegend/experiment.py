"""Config -> everything a round loop needs: data, partitions, fleet, model, host, task, method.

Each piece comes from its registry (models.MODELS, hosts.HOSTS, tasks.TASKS, methods.METHODS),
so a new model family, adapter kind, task or method is added there, not here. Engines (local
loop, Flower) take an Experiment; nothing here runs a round.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .assets import resolve_dataset, resolve_model
from .client import local_steps_for
from .config import Config
from .data import Encoded, encode, label_histogram, partition, split_train_test
from .devices import Fleet
from .hosts import AdapterHost, build_host
from .methods import Method, MethodContext, make_method
from .methods.aggregation import with_zero_residuals
from .models import build_model
from .spec import AdapterState, ModelSpec, inspect_model
from .tasks import Task, build_task


@dataclass
class Experiment:
    cfg: Config
    spec: ModelSpec
    host: AdapterHost
    task: Task
    method: Method
    fleet: Fleet
    train: Encoded
    test: Encoded
    parts: list[np.ndarray]
    label_names: list[str]
    pad_id: int
    initial_state: AdapterState
    steps: list[int]   # each device's optimizer steps per round

    def device_data(self, device: int) -> Encoded:
        return self.train.subset(self.parts[device])

    def label_histograms(self) -> list[list[int]]:
        return [label_histogram(self.train.labels[p], len(self.label_names)) for p in self.parts]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_experiment(cfg: Config) -> Experiment:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "classifier newly initialised" notice is expected
    hf_logging.disable_progress_bar()
    # peft 0.21 calls a transformers helper that transformers 5.23 marks deprecated: not ours to act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    seed = cfg.run.seed
    asset = resolve_model(cfg.model.name, cfg.model.path, cfg.model.target_modules)
    ds = resolve_dataset(cfg.data.name, cfg.data.path, cfg.data.text_column, cfg.data.label_column)
    tokenizer = AutoTokenizer.from_pretrained(asset.path)
    train_idx, test_idx = split_train_test(ds, cfg.data.test_size)
    train = encode(tokenizer, [ds.texts[i] for i in train_idx], [ds.labels[i] for i in train_idx], cfg.data.max_length)
    test = encode(tokenizer, [ds.texts[i] for i in test_idx], [ds.labels[i] for i in test_idx], cfg.data.max_length)
    if cfg.data.eval_subset:
        test = test.subset(range(min(cfg.data.eval_subset, len(test))))
    parts = partition(train.labels, cfg.fleet.devices, cfg.partition.kind, cfg.partition.alpha, seed,
                      min_size=cfg.train.batch_size)
    fleet = Fleet(cfg.fleet.devices, seed, cfg.fleet.mode_change_every, cfg.fleet.bandwidth_min_mbps,
                  cfg.fleet.bandwidth_max_mbps, cfg.fleet.downlink_factor, cfg.fleet.dropout_rate)

    seed_everything(seed)  # fixes the head's and the LoRA tensors' initialisation
    model = build_model(asset.kind, asset.path, num_labels=len(ds.label_names), dropout=cfg.model.dropout)
    spec = inspect_model(model, asset.target_modules)
    lengths = np.array([len(x) for x in train.ids])
    steps = [local_steps_for(len(p), cfg.train.batch_size, cfg.train.local_steps, cfg.train.local_epochs)
             for p in parts]
    ctx = MethodContext(spec=spec, num_devices=cfg.fleet.devices, local_steps=tuple(steps),
                        batch_size=cfg.train.batch_size, nominal_width=int(np.percentile(lengths, 90)), seed=seed,
                        alpha_over_rank=cfg.model.lora_alpha_over_rank,
                        label_counts=tuple(tuple(h) for h in
                                           (label_histogram(train.labels[p], len(ds.label_names)) for p in parts)))
    method = make_method(cfg.method.name, ctx, cfg.method.model_dump())
    host = build_host(method.info.host, model, spec, method.global_ranks(), cfg.model.lora_alpha_over_rank,
                      cfg.model.lora_dropout)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    initial = host.read(host.GLOBAL)
    if method.info.residual:   # FLoRA, FedEx-LoRA: the frozen weights' residuals start at zero
        initial = with_zero_residuals(initial)
    # host.spec: the bottleneck host's spec describes its adapter sites, so the cost model prices adapters
    return Experiment(cfg, host.spec, host, build_task("classification"), method, fleet, train, test, parts,
                      ds.label_names, pad_id, initial, steps)
