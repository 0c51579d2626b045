"""Sequence classification of single texts or text pairs: cross-entropy on the label, accuracy of
the argmax, any number of labels (the head has one output per label name)."""

from __future__ import annotations

import torch

from ..data import collate, eval_batches
from ..execution import model_device, to_device
from .base import Score, Task


class Classification(Task):
    """Encoding: Task.encode's default (a TextDataset's texts, or its pairs, and labels)."""
    name = "classification"

    def batch(self, data, idx, pad_id):
        type_ids = None if data.type_ids is None else [data.type_ids[i] for i in idx]
        return collate([data.ids[i] for i in idx], data.labels[idx], pad_id, type_ids)

    def loss(self, model, batch):
        return model(**batch).loss

    @torch.no_grad()
    def score(self, model, data, batch_size, pad_id):
        correct, loss_sum, device = 0, 0.0, model_device(model)
        for batch in eval_batches(data, batch_size, pad_id):
            batch = to_device(batch, device)
            out = model(**batch)
            loss_sum += float(out.loss) * len(batch["labels"])
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
        return Score(correct / len(data), loss_sum / len(data))
