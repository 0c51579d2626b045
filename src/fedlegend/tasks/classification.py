"""Sequence classification: cross-entropy on the label, accuracy of the argmax."""

from __future__ import annotations

import torch

from ..data import collate, eval_batches
from .base import Score, Task


class Classification(Task):
    name = "classification"

    def batch(self, data, idx, pad_id):
        return collate([data.ids[i] for i in idx], data.labels[idx], pad_id)

    def loss(self, model, batch):
        return model(**batch).loss

    @torch.no_grad()
    def score(self, model, data, batch_size, pad_id):
        correct, loss_sum = 0, 0.0
        for batch in eval_batches(data, batch_size, pad_id):
            out = model(**batch)
            loss_sum += float(out.loss) * len(batch["labels"])
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
        return Score(correct / len(data), loss_sum / len(data))
