"""A device's own training data in deployment: named by its node's config, read and checked on the device.

A SuperNode's node config (`flower-supernode --node-config '...'`) names the device it plays and
its data, one of:

    device-id=N data-file="/data/mine.jsonl"             its own CSV / TSV / JSONL file (the column
        [text-column="text" label-column="label"]        rules of data.name = 'file'; the columns default
                                                          to the server config's data.text_column / label_column)
    device-id=N dataset="rotten-tomatoes" partition=I num-partitions=M [partition-seed=S]
                                                          a registered dataset's training split, seeded
                                                          partition I of M (localhost demos)

The server never names a path: it sends each device its plan and adapter, and with them the
label names of its test set, onto which the device maps its labels (a label the server does not
know stops with the file, line and field). What a device tells the server about its data is its
PartitionFacts (sample count, label histogram), nothing else.

Under Flower's simulation a node has only `partition-id`: it plays the config's own dataset,
partitioned as in-process engines do, so simulated records equal the local loop's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import pandas as pd

from .config import Config
from .data import Encoded
from .datasets import TextDataset, _check_filled, _line_numbers, _read_table
from .errors import UserError
from .experiment import ModelSource, SplitData, device_partitions, encode_examples, load_split
from .lmdata import LM_TASKS, load_dataset, task_kind

FILE_KEY, DATASET_KEY = "data-file", "dataset"
PARTITION_KEY, PARTITIONS_KEY, SEED_KEY = "partition", "num-partitions", "partition-seed"
TEXT_KEY, LABEL_KEY = "text-column", "label-column"
NODE_KEYS = (FILE_KEY, TEXT_KEY, LABEL_KEY, DATASET_KEY, PARTITION_KEY, PARTITIONS_KEY, SEED_KEY)
EXAMPLE = "--node-config 'device-id=0 data-file=\"/data/mine.jsonl\"'"


class DeviceDataError(UserError, ValueError):
    """A device's node config or data file that cannot be used; the message names the key, file, line or field."""


@dataclass(frozen=True)
class DataSource:
    """Where a device's training examples come from: a file, or a registered dataset's partition
    (`dataset` None: the run config's own dataset, as in simulation)."""
    path: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    dataset: str | None = None
    partition: int = 0
    num_partitions: int = 0
    seed: int | None = None

    def describe(self) -> str:
        if self.path is not None:
            return f"file {self.path}"
        return f"{self.dataset or 'the run dataset'} partition {self.partition} of {self.num_partitions}"


def _int(node_config: Mapping, key: str, low: int) -> int:
    value = node_config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise DeviceDataError(f"node config {key}={value!r}: expected an integer >= {low}")
    return value


def _str(node_config: Mapping, key: str) -> str | None:
    value = node_config.get(key)
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise DeviceDataError(f"node config {key}={value!r}: expected a quoted string, e.g. {key}=\"...\"")
    return value


def source_from_node_config(node_config: Mapping, simulated: tuple[int, int] | None = None) -> DataSource:
    """The data source a node's config names; `simulated` (partition, devices) for a simulation node
    that names none. A node config naming no data (or both kinds) raises DeviceDataError."""
    path, dataset = _str(node_config, FILE_KEY), _str(node_config, DATASET_KEY)
    if path and dataset:
        raise DeviceDataError(f"node config names both {FILE_KEY} and {DATASET_KEY}; give one")
    if path:
        return DataSource(path=str(Path(path).expanduser()), text_column=_str(node_config, TEXT_KEY),
                          label_column=_str(node_config, LABEL_KEY))
    if dataset:
        n = _int(node_config, PARTITIONS_KEY, 1)
        i = _int(node_config, PARTITION_KEY, 0)
        if i >= n:
            raise DeviceDataError(f"node config {PARTITION_KEY}={i} is not below {PARTITIONS_KEY}={n}")
        seed = _int(node_config, SEED_KEY, 0) if SEED_KEY in node_config else None
        return DataSource(dataset=dataset, partition=i, num_partitions=n, seed=seed)
    if simulated is not None:
        return DataSource(partition=simulated[0], num_partitions=simulated[1])
    raise DeviceDataError(f"this SuperNode names no training data: start it with {EXAMPLE} (its own file) or "
                          f"dataset=\"rotten-tomatoes\" {PARTITION_KEY}=I {PARTITIONS_KEY}=M (a demo partition)")


def read_file(source: DataSource, text_column: str, label_column: str) -> tuple[pd.DataFrame, str, str]:
    """The device's file as a table whose every row has its text and label (file, line and field otherwise)."""
    p = Path(source.path)
    text_column, label_column = source.text_column or text_column, source.label_column or label_column
    if not p.is_file():
        raise DeviceDataError(f"{FILE_KEY} {p} not found on this device; give a CSV or JSONL file with "
                              f"{text_column!r} and {label_column!r} columns")
    if p.suffix.lower() not in (".jsonl", ".json", ".csv", ".tsv"):
        raise DeviceDataError(f"{FILE_KEY} {p}: unsupported extension {p.suffix!r}; use .csv, .tsv or .jsonl")
    df = _read_table(p).reset_index(drop=True)
    missing = [c for c in (text_column, label_column) if c not in df.columns]
    if missing:
        raise DeviceDataError(f"{p} lacks column(s) {missing}; it has {list(df.columns)} (name them in the node "
                              f"config: {TEXT_KEY}=\"...\" {LABEL_KEY}=\"...\")")
    if df.empty:
        raise DeviceDataError(f"{p} holds no examples; give the device at least one")
    for col in (text_column, label_column):
        _check_filled(p, df, col, is_label=col == label_column)
    return df, text_column, label_column


def check_source(source: DataSource, text_column: str = "text", label_column: str = "label") -> None:
    """A device's check at start: its file exists, parses, has its columns and a text and label on every row."""
    if source.path is not None:
        read_file(source, text_column, label_column)


def _label_key(value) -> str:
    """A label as the server's label names spell it (numbers: '0', '1', ...; data.name = 'file' does the same)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def file_examples(source: DataSource, cfg: Config, label_names: list[str]) -> TextDataset:
    """The device's file with its labels mapped onto the server's `label_names`; duplicate texts kept once."""
    df, text_col, label_col = read_file(source, cfg.data.text_column, cfg.data.label_column)
    index = {name: i for i, name in enumerate(label_names)}
    keys = [_label_key(v) for v in df[label_col]]
    unknown = [row for row, k in enumerate(keys) if k not in index]
    if unknown:
        row = unknown[0]
        raise DeviceDataError(f"{source.path}, line {_line_numbers(Path(source.path))[row]}: field {label_col!r} = "
                              f"{keys[row]!r} is not one of the server's labels {label_names}"
                              + (f" (and {len(unknown) - 1} more rows)" if len(unknown) > 1 else ""))
    pair_col = cfg.data.text_pair_column
    if pair_col is not None:   # sentence pairs: the second text of every row, as data.name = 'file' reads it
        if pair_col not in df.columns:
            raise DeviceDataError(f"{source.path} lacks the second text column {pair_col!r} (data.text_pair_column); "
                                  f"it has {list(df.columns)}")
        _check_filled(Path(source.path), df, pair_col, is_label=False)
    subset = [text_col] if pair_col is None else [text_col, pair_col]
    keep = ~df.duplicated(subset=subset).to_numpy()
    texts = df[text_col].astype(str).str.strip()
    pairs = None if pair_col is None else [t for t, k in zip(df[pair_col].astype(str).str.strip(), keep) if k]
    return TextDataset([t for t, k in zip(texts, keep) if k], [index[key] for key, k in zip(keys, keep) if k],
                       list(label_names), pairs=pairs)


def load_device_data(source: DataSource, cfg: Config, model: ModelSource, label_names: list[str] | None,
                     split_of: Callable[[Config, ModelSource], SplitData] = load_split) -> tuple[Encoded, list[str]]:
    """The device's training examples, tokenized as the server tokenizes its test set, and the label names
    they are counted in (the server's; for a registered dataset without them, the dataset's own)."""
    if source.path is not None and task_kind(cfg.data) in LM_TASKS:   # a prompt/answer file of the device's own
        data_cfg = cfg.data.model_copy(update={"name": "file", "path": str(source.path)})
        ds = load_dataset(data_cfg)
        return encode_examples(cfg.model_copy(update={"data": data_cfg}), model, ds, range(len(ds.labels))), \
            list(ds.label_names)
    if source.path is not None:
        if not label_names:
            raise DeviceDataError(f"the server sent no label names to map {source.path}'s labels onto")
        ds = file_examples(source, cfg, label_names)
        return encode_examples(cfg, model, ds, range(len(ds.labels))), list(label_names)
    run_cfg = cfg
    if source.dataset is not None:
        run_cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"name": source.dataset, "path": None})})
    split = split_of(run_cfg, model)
    if label_names and split.label_names != list(label_names):
        raise DeviceDataError(f"dataset {run_cfg.data.name!r} has labels {split.label_names}, the server's test set "
                              f"{list(label_names)}; give the device data of the server's task")
    parts = device_partitions(run_cfg, split.train, source.num_partitions, source.seed)
    return split.train.subset(parts[source.partition]), list(split.label_names)
