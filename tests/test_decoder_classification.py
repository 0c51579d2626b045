"""Classification on a decoder (issue 12 item 2): a causal LM's blocks with a trained head on the last
real token (models.LastTokenClassifier), picked when data.task is classification and the model a decoder.

The tiny random Llama of tests/test_decoder.py (4 blocks, hidden 64, grouped-query attention, a 64-word
vocabulary, no pad token: eos pads) classifies a file of random words into three labels.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from fedlegend.methods import METHODS
from fedlegend.methods.base import Estimator

from test_decoder import WORDS, llama_dir  # noqa: F401  (the tiny Llama folder fixture)


@pytest.fixture(scope="module")
def word_labels(tmp_path_factory):
    """Texts of 2-9 random words labelled by their count: few (2-4), some (5-6), many (7-9)."""
    rng = random.Random(0)
    rows = []
    for _ in range(90):
        n = rng.randint(2, 9)
        rows.append({"text": " ".join(rng.sample(WORDS, n)), "label": "few" if n < 5 else "some" if n < 7 else "many"})
    p = tmp_path_factory.mktemp("words") / "count.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def _cfg(tiny_cfg, llama_dir, word_labels, **over):
    return tiny_cfg(**{"model.name": "local", "model.path": str(llama_dir), "data.name": "file",
                       "data.path": str(word_labels), "data.test_size": 15, "data.max_length": 16,
                       "data.eval_subset": 10, "partition.kind": "iid", "train.local_steps": 1, "train.lr": 0.02,
                       **over})


def test_pooling_reads_the_last_real_token_whatever_the_padding(llama_dir):
    """Right padding, left padding and no padding give the same logits; the pad id (eos here) is never
    read: an eos inside the text is a real token."""
    from fedlegend.models import load_decoder_classifier

    torch.manual_seed(0)
    model = load_decoder_classifier(llama_dir, num_labels=3).eval()
    a, b = [1, 5, 2, 9, 11], [1, 7, 8]                      # 2 = eos = the pad id, inside text a
    with torch.no_grad():
        alone = torch.cat([model(input_ids=torch.tensor([x])).logits for x in (a, b)])
        right = model(input_ids=torch.tensor([a, b + [2, 2]]),
                      attention_mask=torch.tensor([[1] * 5, [1] * 3 + [0, 0]])).logits
        left = model(input_ids=torch.tensor([a, [2, 2] + b]),
                     attention_mask=torch.tensor([[1] * 5, [0, 0] + [1] * 3])).logits
    torch.testing.assert_close(right, alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(left, alone, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no real token"):
        model(input_ids=torch.tensor([a]), attention_mask=torch.zeros(1, 5, dtype=torch.long))


def test_spec_and_cost_model_of_a_classifying_decoder(llama_dir):
    """Blocks priced as the decoder's (grouped-query attention, gated MLP), no lm_head (it is not run),
    the trained head once per sequence: forward and the two gradients of its weights and input."""
    from fedlegend.client import step_shape
    from fedlegend.data import collate
    from fedlegend.devices import layer_forward_flops, step_work_flops
    from fedlegend.models import load_decoder_classifier
    from fedlegend.spec import inspect_model
    from fedlegend.tasks import build_task

    spec = inspect_model(load_decoder_classifier(llama_dir, num_labels=3), ("q_proj", "v_proj"))
    assert spec.kind == "decoder" and spec.has_head and spec.head_module == "classifier" and spec.vocab == 0
    assert spec.head_shapes == {"weight": (3, 64), "bias": (3,)} and spec.num_labels == 3
    assert spec.block_macs == 30720 and spec.attn_width == 64 and spec.num_layers == 4
    batch = collate([[1, 5, 6], [1, 7, 8, 9, 10]], np.array([0, 2]), pad_id=2)
    assert step_shape(build_task("classification"), batch) == (2, 5, 1)
    b, w, h, L = 2, 5, 64, 4
    block = 2 * b * w * 30720 + 2 * (2 * b * w * w * 64)
    assert layer_forward_flops(spec, b, w) == block
    lora = 2 * b * w * 4 * ((h + 64) + (h + 32))
    head = 2 * b * (3 * 64 + 3)
    fwd, bwd = step_work_flops(spec, {3: 4}, {3}, b, w, 1)
    assert fwd == L * block + lora + head
    assert bwd == 2 * head + block + 2 * lora


def test_a_pair_is_one_text_for_a_tokenizer_without_separator(llama_dir):
    from fedlegend.data import encode
    from fedlegend.models import load_tokenizer

    tok = load_tokenizer(llama_dir)
    assert tok.sep_token is None
    pair = encode(tok, ["w1 w2"], [0], 16, pairs=["w3"])
    assert pair.type_ids is None and pair.ids == encode(tok, ["w1 w2\nw3"], [0], 16).ids


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_classifies_on_a_decoder(name, tiny_cfg, llama_dir, word_labels, tmp_path, run_round):
    """Train two rounds, aggregate (the head with its "head.*" keys, as an encoder's), export, reload the
    export as users do and get the host's logits back."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from fedlegend.experiment import build_experiment
    from fedlegend.hosts import BottleneckHost
    from fedlegend.models import load_decoder_classifier

    exp = build_experiment(_cfg(tiny_cfg, llama_dir, word_labels, **{"method.name": name}))
    assert exp.spec.kind == "decoder" and exp.spec.has_head and exp.task.name == "classification"
    heads = {k for k in exp.initial_state if k.startswith("head.")}
    assert heads == {"head.weight", "head.bias"}
    est, state = Estimator(exp.method.info.rho), exp.initial_state
    for round_ in (1, 2):
        out = run_round(exp, round_, state, est)
        assert out.record["devices"], out.record["events"]
        assert all(np.isfinite(r["loss"]) and r["time_s"] > 0 for r in out.record["devices"])
        assert set(out.state) == set(state)
        state = out.state
    assert not torch.equal(state["head.weight"], exp.initial_state["head.weight"]), "the head did not train"
    adapter = tmp_path / "adapter"
    exp.host.save_pretrained(adapter, state)
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    host = exp.host
    host.load(host.use(host.global_ranks), state)
    host.model.eval()
    with torch.no_grad():
        want = host.model(input_ids=ids).logits
    base = load_decoder_classifier(llama_dir, num_labels=3)
    if isinstance(host, BottleneckHost):
        model = BottleneckHost.from_pretrained(base, adapter).model
    else:
        assert json.loads((adapter / "adapter_config.json").read_text())["task_type"] is None
        if (adapter / "residual.safetensors").exists():   # FLoRA, FedEx-LoRA: folded into the weights
            with torch.no_grad():
                for pname, res in load_file(str(adapter / "residual.safetensors")).items():
                    base.get_parameter(pname).add_(res)
        model = PeftModel.from_pretrained(base, adapter)
    model.eval()
    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_a_decoder_classification_run_scores_accuracy(tiny_cfg, llama_dir, word_labels, tmp_path):
    from fedlegend.rundir import run_experiment

    run_experiment(_cfg(tiny_cfg, llama_dir, word_labels), tmp_path / "run", progress=False)
    records = [json.loads(x) for x in (tmp_path / "run" / "records.jsonl").read_text().splitlines()]
    accs = [r["accuracy"] for r in records if r.get("accuracy") is not None]
    assert len(accs) == 2 and all(0.0 <= a <= 1.0 for a in accs)
