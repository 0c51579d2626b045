"""What the language-model tasks share: the instruction format's end of turn, and the loss on
answer tokens of a left-padded batch (logits of the answer columns only: a 49k-word output layer
over every prompt token would cost about a fifth of the forward and most of the memory)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def end_of_turn_id(tokenizer) -> int | None:
    """The token that closes the assistant's turn in the chat template (SmolLM2: <|im_end|>), else eos."""
    if getattr(tokenizer, "chat_template", None):
        marker = "\u2063ANSWER\u2063"
        text = tokenizer.apply_chat_template([{"role": "user", "content": "Q"}, {"role": "assistant",
                                              "content": marker}], tokenize=False)
        tail = text.split(marker, 1)[1] if marker in text else ""
        ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
        if ids:
            return int(ids[0])
    for tok in (tokenizer.eos_token_id, getattr(tokenizer, "sep_token_id", None)):
        if tok is not None:
            return int(tok)
    return None


def causal_logits(model, batch: dict[str, torch.Tensor], keep: int) -> torch.Tensor:
    """Logits of the last `keep` columns of a left-padded batch."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=keep)
    return out.logits


def answer_keep(labels: torch.Tensor) -> int:
    """Columns whose logits answer_loss computes: the last k+1 of a left-padded batch whose answers
    (labels != -100) span the last k columns (at least 2, at most the width)."""
    width = labels.shape[1]
    cols = (labels != -100).any(0).nonzero()
    k = min(width - int(cols[0]), width - 1) if len(cols) else 1
    return k + 1


def answer_loss(model, batch: dict[str, torch.Tensor], reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy on the answer tokens only (labels -100 elsewhere). Answers end in the last
    column, so the logits of the last k+1 columns predict the k answer columns."""
    labels = batch["labels"]
    keep = answer_keep(labels)
    logits = causal_logits(model, batch, keep)[:, -keep:-1]
    target = labels[:, -(keep - 1):]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
                           reduction=reduction)
