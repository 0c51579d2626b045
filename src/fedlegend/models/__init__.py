"""Base models, found by kind: what a device fine-tunes (frozen, under an adapter host).

A model kind is a loader (path, num_labels, dropout) -> nn.Module with a `config` (its
transformer's) and a task head (encoders) or an output layer over the vocabulary (decoders)
that fedlegend.spec.inspect_model finds. A new model family is one module here and one entry
below; methods and engines do not change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from torch import nn

from .decoder import LastTokenClassifier, load_causal_lm, load_decoder_classifier, load_tokenizer
from .encoder import MeanPoolClassifier, load_base_model

MODELS: dict[str, Callable[..., nn.Module]] = {
    "encoder": load_base_model,   # a sentence encoder with a mean-pooling classification head
    "decoder": load_causal_lm,    # a causal LM as it is (its lm_head frozen, no task head)
    "decoder-classifier": load_decoder_classifier,   # a causal LM's blocks + a head on the last token
}


def model_kind(asset_kind: str, task: str) -> str:
    """The loader for a model folder's kind and the task: a decoder that classifies gets a head."""
    return "decoder-classifier" if asset_kind == "decoder" and task == "classification" else asset_kind


def build_model(kind: str, path: str | Path, num_labels: int, dropout: float = 0.1) -> nn.Module:
    if kind not in MODELS:
        raise ValueError(f"unknown model kind {kind!r}; registered kinds: {', '.join(sorted(MODELS))}")
    return MODELS[kind](path, num_labels=num_labels, dropout=dropout)


__all__ = ["MODELS", "LastTokenClassifier", "MeanPoolClassifier", "build_model", "load_base_model", "load_causal_lm",
           "load_decoder_classifier", "load_tokenizer", "model_kind"]
