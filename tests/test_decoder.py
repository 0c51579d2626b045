"""Decoder LLMs (causal LMs) as the base model: loading, spec, cost model, every method, export.

A tiny random Llama (4 blocks, hidden 64, grouped-query attention 4 heads / 2 kv heads, gated MLP,
a 64-word vocabulary) stands in for SmolLM2 here; the real SmolLM2 conversion is the slow test at
the end. The runs use the generation task (fedlegend.tasks.generation: loss on the answer, greedy
generation scored by its final number) on a prompt/answer file of random words; the tasks
themselves are tested in their own files, these tests check the model, host, method and export
path on a decoder.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from fedlegend.errors import ModelError, UserError
from fedlegend.methods import METHODS
from fedlegend.methods.base import Estimator

WORDS = [f"w{i}" for i in range(51)]
DIGITS = [str(i) for i in range(10)]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *WORDS, *DIGITS])}   # 64 tokens
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    # like Llama's: bos and eos, no pad token
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _llama_config(**over):
    from transformers import LlamaConfig

    kw = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    return LlamaConfig(**{**kw, **over})


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny random Llama saved as a Hugging Face folder with its tokenizer (which has no pad token)."""
    from transformers import LlamaForCausalLM

    d = tmp_path_factory.mktemp("tiny-llama") / "model"
    torch.manual_seed(0)
    LlamaForCausalLM(_llama_config()).save_pretrained(d)
    _tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def word_file(tmp_path_factory):
    """Prompt/answer pairs: a few random words, answered by how many there are (a one-digit number)."""
    rng = random.Random(0)
    rows = []
    for _ in range(120):
        words = rng.sample(WORDS, rng.randint(2, 9))
        rows.append({"prompt": " ".join(words), "answer": str(len(words))})
    p = tmp_path_factory.mktemp("words") / "count.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def _decoder_cfg(tiny_cfg, llama_dir, word_file, **over):
    return tiny_cfg(**{"model.name": "local", "model.path": str(llama_dir), "data.name": "file",
                       "data.path": str(word_file), "data.test_size": 20, "data.max_length": 16,
                       "data.max_new_tokens": 2, "data.eval_subset": 10, "partition.kind": "iid",
                       "train.local_steps": 1, "train.lr": 0.02, **over})


# ------------------------------------------------------------------ model, spec, assets
def test_local_causal_lm_is_a_decoder_without_head(llama_dir):
    from fedlegend.assets import resolve_model
    from fedlegend.models import build_model, load_tokenizer
    from fedlegend.spec import inspect_model

    asset = resolve_model("local", str(llama_dir))
    assert asset.kind == "decoder" and {"q_proj", "v_proj"} <= set(asset.target_modules)
    model = build_model(asset.kind, asset.path, num_labels=0)
    spec = inspect_model(model, asset.target_modules)
    assert spec.kind == "decoder" and not spec.has_head and spec.head_shapes == {} and spec.head_params() == 0
    assert spec.num_layers == 4 and spec.hidden == 64 and spec.vocab == 64 and spec.attn_width == 4 * 16
    assert [t.module for t in spec.targets_of(3)] == ["self_attn.q_proj", "self_attn.v_proj"]
    assert spec.targets_of(0)[1].d_out == 2 * 16              # v_proj: kv heads x head_dim (grouped-query)
    tok = load_tokenizer(asset.path)
    assert tok.pad_token_id == tok.eos_token_id == 2          # Llama tokenizers have no pad: eos pads


def test_block_macs_hand_count(llama_dir):
    """q, o: h x (heads*hd); k, v: h x (kv_heads*hd); gate, up, down: h x i."""
    from fedlegend.models import load_causal_lm
    from fedlegend.spec import inspect_model

    spec = inspect_model(load_causal_lm(llama_dir), ("q_proj", "v_proj"))
    h, i, q, kv = 64, 96, 4 * 16, 2 * 16
    assert spec.block_macs == 2 * h * q + 2 * h * kv + 3 * h * i == 30720


def test_decoder_flops_against_a_hand_count(llama_dir):
    """A training step of the tiny Llama, LoRA on the top 2 blocks, batch 3 x 10 tokens, counted by hand."""
    from fedlegend.devices import layer_forward_flops, step_work_flops
    from fedlegend.models import load_causal_lm
    from fedlegend.spec import inspect_model

    spec = inspect_model(load_causal_lm(llama_dir), ("q_proj", "v_proj"))
    b, w, h, V, L = 3, 10, 64, 64, 4
    block = 2 * b * w * 30720 + 2 * (2 * b * w * w * 64)             # projections + (QK^T and PV)
    assert layer_forward_flops(spec, b, w) == block
    ranks = {2: 4, 3: 8}
    lora = {l: 2 * b * w * r * ((h + 64) + (h + 32)) for l, r in ranks.items()}   # q: 64->64, v: 64->32
    lm_head = 2 * b * w * h * V
    fwd, bwd = step_work_flops(spec, ranks, set(ranks), b, w)
    assert fwd == L * block + sum(lora.values()) + lm_head
    # backward: the frozen lm_head's input gradient, then blocks 3 and 2 (activation grads + LoRA weights)
    assert bwd == lm_head + 2 * block + 2 * sum(lora.values())
    # nothing trains: no backward at all (not even through the lm_head)
    assert step_work_flops(spec, ranks, set(), b, w)[1] == 0.0


def test_lm_step_prices_the_lm_head_at_the_kept_logits_only(llama_dir):
    """An LM task's step runs the lm_head on the last k+1 columns only (logits_to_keep): the step's shape
    says so, the lm_head sees exactly those positions, and the cost model charges its forward and its
    input gradient there, hand-counted (batch 2 x width 6, answers in the last 2 columns: keep 3)."""
    from fedlegend.client import step_shape
    from fedlegend.data import collate_lm
    from fedlegend.devices import layer_forward_flops, round_work, step_work_flops
    from fedlegend.models import load_causal_lm
    from fedlegend.spec import inspect_model
    from fedlegend.tasks import build_task

    model = load_causal_lm(llama_dir)
    spec = inspect_model(model, ("q_proj", "v_proj"))
    batch = collate_lm([[5, 6, 7, 8, 9, 10], [5, 6, 7, 8]], [4, 2], pad_id=2)   # answers: columns 4 and 5
    seen = []
    model.lm_head.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    for name in ("generation", "multiple-choice"):
        task = build_task(name)
        assert step_shape(task, batch) == (2, 6, 3)
        task.loss(model, batch)
        assert seen.pop() == (2, 3, 64)                            # the lm_head ran at 3 positions per row
    assert step_shape(build_task("classification"), batch) == (2, 6, 1)   # a pooled head: once per sequence
    b, w, keep, h, V, L = 2, 6, 3, 64, 64, 4
    block = layer_forward_flops(spec, b, w)
    ranks = {3: 8}
    lora = 2 * b * w * 8 * ((h + 64) + (h + 32))
    lm_head = 2 * b * keep * h * V                                 # not 2 * b * w * h * V
    fwd, bwd = step_work_flops(spec, ranks, set(ranks), b, w, keep)
    assert fwd == L * block + lora + lm_head
    assert bwd == lm_head + block + 2 * lora                       # lm_head's input gradient, then block 3
    every = step_work_flops(spec, ranks, set(ranks), b, w)         # None: every position (the old price)
    assert every[0] - fwd == every[1] - bwd == 2 * b * (w - keep) * h * V
    work = round_work(spec, ranks, [(b, w, keep), (b, w, keep)], 0, 0)
    assert (work.forward_flops, work.backward_flops) == (2 * fwd, 2 * bwd)


def test_legend_plans_with_the_lm_head_at_the_typical_answer_positions(tiny_cfg, llama_dir, word_file):
    """LEGEND's eq. 14-15 budget check prices a step as the devices run it: the lm_head at the typical
    answer length + 1 (90th percentile, as the width), not at every position."""
    import numpy as np

    from fedlegend.data import Encoded
    from fedlegend.devices import step_work_flops
    from fedlegend.experiment import build_experiment, nominal_outputs_of

    enc = Encoded(ids=[[1] * 10] * 10, labels=np.zeros(10, int), answer_start=np.array([9] * 9 + [5]))
    assert nominal_outputs_of(enc) == int(np.percentile([1] * 9 + [5], 90)) + 1 == 2
    assert nominal_outputs_of(Encoded(ids=[[1, 2]], labels=np.zeros(1, int))) is None   # a pooled head
    exp = build_experiment(_decoder_cfg(tiny_cfg, llama_dir, word_file))
    ctx = exp.method.ctx
    answers = [len(x) - int(a) for x, a in zip(exp.train.ids, exp.train.answer_start)]
    assert ctx.nominal_outputs == int(np.percentile(answers, 90)) + 1 < ctx.nominal_width
    ranks = exp.method.layer_ranks(2)
    planned = step_work_flops(exp.spec, ranks, set(ranks), ctx.batch_size, ctx.nominal_width, ctx.nominal_outputs)
    assert planned < step_work_flops(exp.spec, ranks, set(ranks), ctx.batch_size, ctx.nominal_width)


def test_encoder_prices_are_unchanged(model_spec):
    """Specs without decoder fields price as before: 4h^2 + 2hi per token, a trained head twice."""
    from fedlegend.devices import step_work_flops

    spec = model_spec(L=4, d=32)
    b, w, h, i = 2, 8, 32, 128
    block = 2.0 * b * w * (4 * h * h + 2 * h * i) + 4.0 * b * w * w * h
    head = 2.0 * b * spec.head_params()
    fwd, bwd = step_work_flops(spec, {3: 2}, {3}, b, w)
    assert fwd == head + 4 * block + 2.0 * b * w * 2 * spec.lora_params_per_rank(3)
    assert bwd == 2 * head + block + 2 * (2.0 * b * w * 2 * spec.lora_params_per_rank(3))


def test_smollm2_scale_prices_are_plausible():
    """SmolLM2-135M's published shape (30 blocks, hidden 576, 9 heads / 3 kv heads, MLP 1536, 49,152 words):
    about 2 x 135 M FLOPs per token forward (the tied embedding priced once, as the lm_head)."""
    from fedlegend.devices import step_work_flops
    from fedlegend.spec import LoraTarget, ModelSpec

    h, i, q, kv = 576, 1536, 576, 192
    targets = tuple(LoraTarget(l, m, f"model.layers.{l}.self_attn.{m}", h, d)
                    for l in range(30) for m, d in (("q_proj", q), ("v_proj", kv)))
    spec = ModelSpec(30, h, i, targets, "", {}, 0, kind="decoder", block_macs=2 * h * q + 2 * h * kv + 3 * h * i,
                     attn_width=q, vocab=49152)
    fwd, _ = step_work_flops(spec, {29: 8}, {29}, 1, 128)
    per_token = fwd / 128
    assert 2 * 134e6 < per_token < 2 * 140e6 + 4 * 128 * 576 * 30 / 1   # params + attention scores


# ------------------------------------------------------------------ bad input
def test_bad_decoder_folders_name_the_folder_and_the_fix(tmp_path, llama_dir):
    from fedlegend.assets import resolve_model
    from fedlegend.models import load_causal_lm
    from fedlegend.spec import inspect_model

    enc = tmp_path / "encoder"
    enc.mkdir()
    (enc / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    _tokenizer().save_pretrained(enc)
    with pytest.raises(UserError, match=r"encoder.*not a causal LM.*model.kind = 'encoder'"):
        resolve_model("local", str(enc), kind="decoder")
    no_tok = tmp_path / "no-tokenizer"
    no_tok.mkdir()
    (no_tok / "config.json").write_text((llama_dir / "config.json").read_text())
    with pytest.raises(UserError, match=r"no-tokenizer has no tokenizer.*save_pretrained"):
        resolve_model("local", str(no_tok))
    with pytest.raises(ModelError, match=r"model/?: no Linear module named any of \['wq'\].*self_attn.q_proj.*"
                                         r"model.target_modules"):
        inspect_model(load_causal_lm(llama_dir), ("wq",), source=str(llama_dir))
    with pytest.raises(UserError, match=r"smollm2-135m.*registered decoder.*model.kind = 'auto'"):
        resolve_model("smollm2-135m", kind="encoder")
    bare = tmp_path / "no-architectures"        # config.json without architectures: auto reads it as an encoder,
    bare.mkdir()                                # model.kind = 'decoder' accepts it by its model_type
    (bare / "config.json").write_text(json.dumps({"model_type": "llama"}))
    _tokenizer().save_pretrained(bare)
    assert resolve_model("local", str(bare)).kind == "encoder"
    assert resolve_model("local", str(bare), kind="decoder").kind == "decoder"


# ------------------------------------------------------------------ every method on a decoder
def _reload_and_generate(exp, state, adapter_dir, base_dir):
    """The export loaded as users load it; returns (reloaded model, its logits, the host's logits)."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from fedlegend.hosts import BottleneckHost
    from fedlegend.models import load_causal_lm

    ids = torch.tensor([[1, 5, 7, 9, 11]])
    host = exp.host
    host.load(host.use(host.global_ranks), state)
    host.model.eval()
    with torch.no_grad():
        want = host.model(input_ids=ids).logits
    if isinstance(host, BottleneckHost):
        model = BottleneckHost.from_pretrained(load_causal_lm(base_dir), adapter_dir).model
    else:
        base = AutoModelForCausalLM.from_pretrained(base_dir)
        if (adapter_dir / "residual.safetensors").exists():   # FLoRA, FedEx-LoRA: folded into the weights
            with torch.no_grad():
                for name, res in load_file(str(adapter_dir / "residual.safetensors")).items():
                    base.get_parameter(name).add_(res)
        model = PeftModel.from_pretrained(base, adapter_dir)
    model.eval()
    with torch.no_grad():
        got = model(input_ids=ids).logits
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4, do_sample=False,
                             pad_token_id=2)
    assert out.shape == (1, ids.shape[1] + 4)
    return got, want


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_trains_aggregates_and_exports_on_a_decoder(name, tiny_cfg, llama_dir, word_file, tmp_path,
                                                                  run_round):
    from fedlegend.experiment import build_experiment

    exp = build_experiment(_decoder_cfg(tiny_cfg, llama_dir, word_file, **{"method.name": name}))
    assert exp.spec.kind == "decoder" and exp.task.name == "generation"
    assert not any(k.startswith("head.") for k in exp.initial_state)       # lm_head stays frozen
    est, state = Estimator(exp.method.info.rho), exp.initial_state
    for round_ in (1, 2):        # round 2 plans from the devices' status reports (LEGEND: depths adapt)
        out = run_round(exp, round_, state, est)
        assert out.record["devices"], out.record["events"]
        assert all(np.isfinite(r["loss"]) and r["time_s"] > 0 for r in out.record["devices"])
        assert set(out.state) == set(state) and not any(k.startswith("head.") for k in out.state)
        state = out.state
    changed = [k for k in state if not torch.equal(state[k], exp.initial_state[k])]
    assert changed, "two rounds of training changed no tensor"
    adapter = tmp_path / "adapter"
    exp.host.save_pretrained(adapter, state)
    if exp.method.info.host == "lora":
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        assert cfg["task_type"] == "CAUSAL_LM" and not cfg.get("modules_to_save")
    got, want = _reload_and_generate(exp, state, adapter, llama_dir)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ the real SmolLM2
@pytest.mark.slow
def test_slow_smollm2_converts_once_and_runs(tmp_path, monkeypatch):
    """The packaged GGUF converts to an fp32 folder (about 30-40 s on 2 cores), loads as a decoder with
    30 blocks of hidden 576, and its forward pass gives finite logits over the 49,152-word vocabulary."""
    pytest.importorskip("gguf")
    monkeypatch.setenv("FEDLEGEND_CACHE", str(tmp_path))
    from fedlegend.assets import resolve_model
    from fedlegend.models import build_model, load_tokenizer
    from fedlegend.spec import inspect_model

    asset = resolve_model("smollm2-135m")
    assert asset.kind == "decoder" and asset.path == tmp_path / "smollm2-135m-instruct"
    cfg = json.loads((asset.path / "config.json").read_text())
    assert "quantization_config" not in cfg                   # a plain fp32 folder, not the GGUF again
    model = build_model(asset.kind, asset.path, num_labels=0)
    spec = inspect_model(model, asset.target_modules)
    assert (spec.num_layers, spec.hidden, spec.vocab) == (30, 576, 49152) and len(spec.targets) == 60
    assert next(model.parameters()).dtype == torch.float32
    tok = load_tokenizer(asset.path)
    batch = tok(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[-1] == 49152 and torch.isfinite(logits).all()
    assert resolve_model("smollm2-135m").path == asset.path     # the second call reuses the folder
