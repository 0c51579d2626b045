"""Tokenization, the fixed train/test split, and seeded Dirichlet / IID partitions."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .datasets import TextDataset
from .errors import UserError

SPLIT_SEED = 20240601  # the test split is the same for every run seed, so runs compare on one test set


class DataError(UserError, ValueError):
    """Data that cannot be partitioned or used; the message names the fix."""


@dataclass(frozen=True)
class LMInfo:
    """What a language-model task needs beyond the ids: the tokens it scores and how to read a generation."""
    choice_ids: tuple[int, ...] = ()              # multiple choice: the option letters' tokens (A, B, C, D)
    stop_ids: tuple[int, ...] = ()                # generation: tokens that end the answer (end of turn / eos)
    decode: Callable[[list[int]], str] | None = None   # token ids -> text (the tokenizer's, special tokens dropped)


@dataclass
class Encoded:
    """Token ids (unpadded) and labels of one split.

    `labels` are what partitions split by (classification: the class). Language-model tasks add
    `answer_start` (ids[i][:answer_start[i]] is the prompt, the rest the trained answer), `golds`
    (the scored answer: an option letter, a final number) and `lm`."""
    ids: list[list[int]]
    labels: np.ndarray
    answer_start: np.ndarray | None = None
    golds: list[str] | None = None
    lm: LMInfo | None = None
    type_ids: list[list[int]] | None = None   # token type ids of text pairs (BERT's segments); None: single texts

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx) -> "Encoded":
        idx = np.asarray(idx, dtype=int)
        return Encoded([self.ids[i] for i in idx], self.labels[idx],
                       None if self.answer_start is None else self.answer_start[idx],
                       None if self.golds is None else [self.golds[i] for i in idx], self.lm,
                       type_ids=None if self.type_ids is None else [self.type_ids[i] for i in idx])


def split_train_test(ds: TextDataset, test_size: int) -> tuple[list[int], list[int]]:
    """Fixed seeded split of example indices (train, test)."""
    n = len(ds.labels)
    if test_size >= n:
        raise DataError(f"data.test_size={test_size} leaves no training data ({n} examples); lower it")
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    return sorted(perm[test_size:].tolist()), sorted(perm[:test_size].tolist())


def train_test_sources(ds, test_size: int) -> tuple[tuple[object, list[int]], tuple[object, list[int]]]:
    """(dataset, indices) of the train and of the test examples: the fixed seeded split, or, for a
    dataset with its own test set (ds.test: math problems scored on GSM8K's test file), all of ds
    and all of ds.test."""
    own = getattr(ds, "test", None)
    if own is not None:
        return (ds, list(range(len(ds.labels)))), (own, list(range(len(own.labels))))
    train_idx, test_idx = split_train_test(ds, test_size)
    return (ds, train_idx), (ds, test_idx)


def encode(tokenizer, texts: list[str], labels: list[int], max_length: int,
           pairs: list[str] | None = None) -> Encoded:
    """Token ids of single texts, or of text pairs (the tokenizer's pair encoding: [CLS] a [SEP] b [SEP]
    for BERT, <s> a </s></s> b </s> for MPNet); a pair over max_length loses tokens from its longer side.
    A tokenizer without a separator token (a decoder's: it would glue b onto a) gets one text, the pair's
    second text on a line of its own; over max_length it loses the second text's end."""
    if pairs is not None and getattr(tokenizer, "sep_token", None) is None:
        texts, pairs = [f"{a}\n{b}" for a, b in zip(texts, pairs)], None
    out = tokenizer(texts, pairs, truncation="longest_first" if pairs is not None else True,
                    max_length=max_length, add_special_tokens=True)
    type_ids = list(out["token_type_ids"]) if pairs is not None and "token_type_ids" in out else None
    return Encoded(list(out["input_ids"]), np.asarray(labels, dtype=np.int64), type_ids=type_ids)


def collate(ids: list[list[int]], labels: np.ndarray, pad_id: int,
            type_ids: list[list[int]] | None = None) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence of this batch (dynamic padding keeps short snippets cheap)."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": torch.as_tensor(labels, dtype=torch.long)}
    if type_ids is not None:   # text pairs: padding is segment 0, as the tokenizer pads
        batch["token_type_ids"] = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(type_ids):
            batch["token_type_ids"][i, : len(x)] = torch.tensor(x, dtype=torch.long)
    return batch


def eval_batches(data: Encoded, batch_size: int, pad_id: int):
    """Test batches sorted by length: same result, far less padding."""
    order = sorted(range(len(data)), key=lambda i: len(data.ids[i]))
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        yield collate([data.ids[i] for i in idx], data.labels[idx], pad_id,
                      None if data.type_ids is None else [data.type_ids[i] for i in idx])


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt in the model's instruction format: its chat template with the assistant's turn
    opened, when it has one; else the plain text (with the tokenizer's special tokens)."""
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def fit_prompt_answer(prompt: list[int], answer: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Cut a pair to max_length tokens: the prompt loses its start first (its end holds the options and
    the assistant's turn), down to half the budget; then the answer loses its end."""
    over = len(prompt) + len(answer) - max_length
    if over > 0:
        cut = min(over, max(0, len(prompt) - max_length // 2))
        prompt = prompt[cut:]
        answer = answer[: max_length - len(prompt)]
    return prompt, answer


def encode_prompt_answer(tokenizer, prompts: list[str], answers: list[str], labels: list[int], golds: list[str],
                         max_length: int, info: LMInfo, end_id: int | None = None) -> Encoded:
    """Prompt + answer ids (the answer tokenized on its own, then `end_id`, e.g. the end of turn),
    and where each answer starts: the loss covers exactly the answer tokens."""
    ids, starts = [], []
    for prompt, answer in zip(prompts, answers):
        a = list(tokenizer(answer, add_special_tokens=False)["input_ids"]) + ([end_id] if end_id is not None else [])
        p, a = fit_prompt_answer(prompt_ids(tokenizer, prompt), a, max_length)
        ids.append(p + a)
        starts.append(len(p))
    return Encoded(ids, np.asarray(labels, dtype=np.int64), np.asarray(starts, dtype=np.int64), list(golds), info)


def collate_lm(ids: list[list[int]], starts: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """LEFT-padded batch: every sequence ends in the last column, so the answers line up at the end
    and a causal LM's logits are needed for the last columns only. `labels` is -100 outside the answer
    spans (never derived from pad_id: a decoder's pad token is often its eos)."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    labels = torch.full((len(ids), width), -100, dtype=torch.long)
    for i, (x, s) in enumerate(zip(ids, starts)):
        off = width - len(x)
        row = torch.tensor(x, dtype=torch.long)
        input_ids[i, off:] = row
        mask[i, off:] = 1
        labels[i, off + s:] = row[s:]
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)   # positions count real tokens only
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids, "labels": labels}


def lm_eval_batches(data: Encoded, batch_size: int, pad_id: int, prompts_only: bool = False):
    """(example indices, left-padded batch) sorted by length; prompts_only: the ids before each answer."""
    assert data.answer_start is not None
    order = sorted(range(len(data)), key=lambda i: int(data.answer_start[i]) if prompts_only else len(data.ids[i]))
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        if prompts_only:
            ids = [data.ids[i][: int(data.answer_start[i])] for i in idx]
            yield idx, collate_lm(ids, [len(x) for x in ids], pad_id)
        else:
            yield idx, collate_lm([data.ids[i] for i in idx], [int(data.answer_start[i]) for i in idx], pad_id)


def partition(labels: np.ndarray, num_devices: int, kind: str, alpha: float, seed: int,
              min_size: int = 1) -> list[np.ndarray]:
    """Indices of each device's examples, via flwr-datasets' partitioners (seeded)."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    n = len(labels)
    if kind == "dirichlet" and len(np.unique(labels)) < 2:
        # Generated problems carry no label to skew by: Dirichlet over one class would only skew sizes.
        warnings.warn("partition.kind = 'dirichlet' needs labels to skew by; this data has one label, so the "
                      "partitions are iid", stacklevel=2)
        kind = "iid"
    if num_devices > n:
        raise DataError(f"{num_devices} devices but only {n} training examples: some partitions would be empty; "
                        "use fewer devices")
    ds = Dataset.from_dict({"label": labels.tolist(), "idx": list(range(n))})
    if kind == "iid":
        part = IidPartitioner(num_partitions=num_devices)
    elif kind == "dirichlet":
        # The partitioner retries only 10 times to meet min_partition_size: keep it well below n/devices.
        min_size = max(1, min(min_size, n // (4 * num_devices)))
        part = DirichletPartitioner(num_partitions=num_devices, partition_by="label", alpha=alpha,
                                    min_partition_size=min_size, self_balancing=False, shuffle=True, seed=seed)
    else:
        raise DataError(f"unknown partition kind {kind!r}; use 'dirichlet' or 'iid'")
    part.dataset = ds
    try:
        parts = [np.asarray(part.load_partition(i)["idx"], dtype=np.int64) for i in range(num_devices)]
    except ValueError as err:
        raise DataError(f"could not partition {n} examples over {num_devices} devices with alpha={alpha}: {err}; "
                        "use fewer devices or a larger alpha") from None
    for i, p in enumerate(parts):
        if len(p) == 0:
            raise DataError(f"partition of device {i} is empty; use fewer devices or a larger partition.alpha")
    return parts


def label_histogram(labels: np.ndarray, num_labels: int) -> list[int]:
    return np.bincount(labels, minlength=num_labels).tolist()


def sample_batches(n_examples: int, steps: int, batch_size: int, rng: np.random.Generator,
                   lengths: list[int] | None = None) -> list[np.ndarray]:
    """`steps` batches of local indices: shuffled epochs, cycling when the partition is small.

    With `lengths`, the round's examples are grouped by length before being cut into
    batches (as transformers' group_by_length does) and the batches are shuffled: the
    same examples, about 40 % fewer padded tokens on short snippets."""
    order: list[int] = []
    while len(order) < steps * batch_size:
        order.extend(rng.permutation(n_examples).tolist())
    flat = np.asarray(order[: steps * batch_size])
    if lengths is not None:
        flat = flat[np.argsort([lengths[i] for i in flat], kind="stable")]
    batches = [flat[s * batch_size : (s + 1) * batch_size] for s in range(steps)]
    if lengths is not None:
        batches = [batches[i] for i in rng.permutation(steps)]
    return batches
