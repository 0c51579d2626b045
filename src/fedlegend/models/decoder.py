"""The decoder base model: a pretrained causal LM (Llama, Qwen, SmolLM2, ...) used as it is.

The model is transformers' AutoModelForCausalLM itself: the task computes its loss on the
logits over the vocabulary, its output layer (lm_head) stays frozen and untrained, so the
canonical adapter state of a decoder has no "head.*" keys (fedlegend.spec). An exported
LoRA adapter loads with
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_folder), adapter_folder)
and generates.

Classification on a decoder (data.task = classification with a causal LM, `LastTokenClassifier`):
the decoder's blocks without their lm_head (AutoModel) and a trained linear head on the hidden state
of each sequence's last real token (the one that has seen the whole text, as transformers'
...ForSequenceClassification pools), kept under the encoder's head keys ("head.weight", "head.bias")
so every method trains and aggregates it as an encoder's head. Export:
    PeftModel.from_pretrained(load_decoder_classifier(base_folder, num_labels), adapter_folder)

Also here: the folder checks of a user's decoder (a causal LM with a tokenizer), the pad token
(Llama tokenizers have none: eos pads) and the one-time conversion of a GGUF file (the packaged
SmolLM2) to a plain fp32 Hugging Face folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelError

# files of which at least one makes a folder's tokenizer loadable by AutoTokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
# attention projections LoRA goes on by default; a model has one family of these names: q_proj/v_proj
# (Llama, Qwen, Mistral, Gemma, Phi, OPT), query_key_value (GPT-NeoX, Falcon, BLOOM), qkv_proj, Wqkv
DECODER_TARGETS = ("q_proj", "v_proj", "query_key_value", "qkv_proj", "Wqkv")
DROPOUT_KEYS = ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop")


def _config(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelError(f"{path}: cannot read the model config ({err}); give a Hugging Face model folder") from None


def architectures(folder: str | Path) -> list[str]:
    """The `architectures` of a Hugging Face folder's config.json ([] if it names none)."""
    return [str(a) for a in _config(folder).get("architectures") or []]


def is_causal_lm(folder: str | Path) -> bool:
    """config.json's architectures name a causal-LM class (what model.kind = 'auto' goes by)."""
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures(folder))


def may_be_causal_lm(folder: str | Path) -> bool:
    """A causal LM by its architectures, or (none given) a model_type transformers has a causal LM of."""
    if architectures(folder):
        return is_causal_lm(folder)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return _config(folder).get("model_type") in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def check_decoder_folder(folder: str | Path) -> None:
    """A folder fedlegend can fine-tune as a decoder: a causal LM with its tokenizer, else a ModelError
    naming the folder and the fix."""
    folder = Path(folder)
    if not may_be_causal_lm(folder):
        found = architectures(folder) or ["none"]
        raise ModelError(f"{folder} is not a causal LM (config.json architectures: {', '.join(found)}; expected "
                         "e.g. LlamaForCausalLM); give a decoder folder, or set model.kind = 'encoder' "
                         "(--model-kind encoder) for an encoder")
    check_tokenizer(folder)


def check_tokenizer(folder: str | Path) -> None:
    folder = Path(folder)
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(f"{folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save it next to the "
                         "weights with tokenizer.save_pretrained(folder)")


def load_tokenizer(folder: str | Path):
    """The folder's tokenizer, with a pad token: Llama-family tokenizers have none, so eos pads.

    With pad == eos, a task must build its loss labels from the attention mask (never from
    `ids == pad_id`, which would also hide the real eos)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise ModelError(f"{folder}: the tokenizer has neither a pad nor an eos token; set one with "
                             "tokenizer.pad_token = ... and save it with tokenizer.save_pretrained(folder)")
        tok.pad_token = tok.eos_token
    return tok


def _pretrained(auto_class, path: str | Path, dropout: float, what: str) -> nn.Module:
    """`auto_class`.from_pretrained of a checked decoder folder (fp32, never the network), its config's
    and modules' dropout rates replaced by `dropout`; a ModelError naming the folder if it fails."""
    from transformers import AutoConfig

    check_decoder_folder(path)
    config = AutoConfig.from_pretrained(str(path))
    for key in DROPOUT_KEYS:
        if isinstance(getattr(config, key, None), float):
            setattr(config, key, float(dropout))
    try:
        model = auto_class.from_pretrained(str(path), config=config, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise ModelError(f"{path}: cannot load {what} ({' '.join(str(err).split())[:300]}); give a "
                         "Hugging Face causal-LM folder with config.json and weights") from None
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = dropout
    return model


def load_causal_lm(path: str | Path, num_labels: int = 0, dropout: float = 0.0) -> nn.Module:
    """A pretrained causal LM (fp32) from a local folder, never the network; `num_labels` is unused
    (the vocabulary is the output). `dropout` replaces the config's dropout rates."""
    from transformers import AutoModelForCausalLM

    return _pretrained(AutoModelForCausalLM, path, dropout, "it as a causal LM")


class LastTokenClassifier(nn.Module):
    """A decoder's blocks plus a linear head on the last real token's hidden state.

    The last real token is found from the attention mask (the last position whose mask is 1), never
    from the pad id (a decoder's pad token is usually its eos), and positions count real tokens
    only, so right- and left-padded batches give the same logits. `backbone_kind` tells fedlegend.spec.inspect_model to price the blocks as
    a decoder's."""
    backbone_kind = "decoder"

    def __init__(self, backbone: nn.Module, num_labels: int, dropout: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config          # peft and inspect_model read the decoder's config
        self.num_labels = num_labels
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(backbone.config.hidden_size, num_labels)

    def forward(self, input_ids=None, attention_mask=None, labels=None, token_type_ids=None, **kwargs):
        from transformers.modeling_outputs import SequenceClassifierOutput

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if not bool(attention_mask.any(1).all()):
            raise ValueError("a sequence of the batch has no real token (its attention mask is all 0)")
        # positions count real tokens only, so left padding gives what right padding gives; segments
        # (token_type_ids) mean nothing to a decoder: a pair is one text (data.encode)
        positions = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=positions).last_hidden_state
        cols = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (attention_mask.bool() * (cols + 1)).argmax(1)       # the last position with mask 1
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        logits = self.classifier(self.dropout(pooled))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def load_decoder_classifier(path: str | Path, num_labels: int, dropout: float = 0.0) -> LastTokenClassifier:
    """A pretrained causal LM's blocks (fp32, from a local folder; its lm_head is not loaded) plus a fresh
    classification head of `num_labels` outputs; `dropout` replaces the config's rates and is the head's."""
    from transformers import AutoModel

    if num_labels < 2:
        raise ModelError(f"{path}: classification on a decoder needs two or more labels, got {num_labels}")
    return LastTokenClassifier(_pretrained(AutoModel, path, dropout, "the decoder's blocks"), num_labels, dropout)


def convert_gguf(gguf_file: str | Path, target: str | Path) -> Path:
    """Dequantise a GGUF causal LM once into a plain fp32 Hugging Face folder (weights + tokenizer).

    transformers loads a GGUF as a quantized model (hf_quantizer, config.quantization_config): both
    are cleared before saving, or the saved folder would ask for the GGUF again. Written to a
    temporary folder first and renamed, so an interrupted conversion leaves nothing half-written."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file, target = Path(gguf_file), Path(target)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                 dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    target.parent.mkdir(parents=True, exist_ok=True)
    if (target / "config.json").exists():   # another process converted it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
        return target
    tmp.rename(target)
    return target
