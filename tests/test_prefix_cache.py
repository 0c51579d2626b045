"""The frozen-prefix cache: the same computation as the uncached forward (fp32 within 1e-5),
on encoders (BERT, MPNet) and a decoder (Llama); whole runs of LEGEND, FedRA, HierFedLoRA and
FedAdapter cached vs uncached; invalidation when a residual changes the frozen weights; eviction.

Tolerance: fp32, atol 1e-5 on losses, gradients and adapter tensors. The cached states are
computed per example without padding, so they differ from the padded batch's by float rounding
only (about 1e-7 relative; often not at all)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedlegend.prefix_cache import PrefixCache, layer_list, pays, split_examples

ATOL = 1e-5


# ---------------------------------------------------------------- tiny random models (unit tests only)
def tiny_bert():
    from transformers import BertConfig, BertModel

    from fedlegend.models.encoder import MeanPoolClassifier
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return MeanPoolClassifier(BertModel(cfg, add_pooling_layer=False), 2, 0.0)


def tiny_mpnet():
    from transformers import MPNetConfig, MPNetModel

    from fedlegend.models.encoder import MeanPoolClassifier
    cfg = MPNetConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                      max_position_embeddings=70, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return MeanPoolClassifier(MPNetModel(cfg, add_pooling_layer=False), 2, 0.0)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    return LlamaForCausalLM(cfg)


class Bare:
    """A host-like holder of a model whose frozen weights never change (the cache's view of a host)."""
    def __init__(self, model, num_layers=4):
        self.model, self.spec = model, SimpleNamespace(num_layers=num_layers)

    def frozen_version(self, below):
        return ()


def right_padded(lengths, vocab=100, seed=0, labels="class"):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros((len(lengths), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, :n] = 1
    if labels == "lm-left":     # the LM tasks' batches (data.collate_lm): left padding, positions of real tokens
        from fedlegend.data import collate_lm
        return collate_lm([ids[i, :n].tolist() for i, n in enumerate(lengths)], [n // 2 for n in lengths], 0)
    lab = torch.tensor([i % 2 for i in range(len(lengths))]) if labels == "class" else ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


def loss_and_grads(model, batch, trained):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in trained]


@pytest.mark.parametrize("build,labels", [(tiny_bert, "class"), (tiny_mpnet, "class"), (tiny_llama, "lm"),
                                          (tiny_llama, "lm-left")], ids=["bert", "mpnet", "llama", "llama-left"])
@pytest.mark.parametrize("boundary", [1, 3])
def test_cached_forward_equals_uncached(build, labels, boundary):
    """Layers < boundary frozen, the rest trained: same loss and gradients cached and uncached, also
    on the second pass (from the cache) and with the same examples in another batch (other width)."""
    torch.manual_seed(0)
    model = build()
    _, _, layers = layer_list(model, 4)
    trained = [p for l in list(layers)[boundary:] for p in l.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    model.train()
    host, cache, ranks = Bare(model), PrefixCache(), {l: 4 for l in range(boundary, 4)}
    for batch in (right_padded([5, 9, 3, 7], labels=labels), right_padded([5, 9, 3, 7, 20], labels=labels)):
        want_loss, want_grads = loss_and_grads(model, batch, trained)
        for _ in range(2):
            with cache.feeding(host, ranks, batch):
                loss, grads = loss_and_grads(model, batch, trained)
            assert torch.allclose(loss, want_loss, atol=ATOL, rtol=0)
            assert all(torch.allclose(g, w, atol=ATOL, rtol=0) for g, w in zip(grads, want_grads))
        assert len(layers) == 4 and layer_list(model, 4)[2] is layers   # the model is whole again
    assert cache.stats.misses == 5 and cache.stats.hits == 4 + 5 + 4  # the 5th example is new in batch 2


def test_layer_zero_and_left_padding_bypass_the_cache():
    model = tiny_bert()
    host, cache = Bare(model), PrefixCache()
    batch = right_padded([4, 6])
    with cache.feeding(host, {0: 4, 3: 4}, batch):     # an adapter on layer 0: nothing is frozen below it
        model(**batch)
    left = {k: v.flip(1) if k != "labels" else v for k, v in batch.items()}
    assert split_examples(left) is None                 # left padding without position_ids: not cacheable
    with_pos = {**left, "position_ids": (left["attention_mask"].cumsum(1) - 1).clamp(min=0)}
    assert [tuple(e["input_ids"].shape) for e in split_examples(with_pos)] == [(1, 4), (1, 6)]
    with cache.feeding(host, {2: 4}, left):
        model(**left)
    assert cache.stats.bypassed == 2 and len(cache) == 0


def test_split_examples_keys_every_input_and_drops_labels():
    batch = right_padded([2, 4])
    batch["token_type_ids"] = torch.ones_like(batch["input_ids"])
    ex = split_examples(batch)
    assert [tuple(e["input_ids"].shape) for e in ex] == [(1, 2), (1, 4)]
    assert set(ex[0]) == {"input_ids", "attention_mask", "token_type_ids"}


def test_eviction_by_bytes_keeps_results_equal():
    """A cache too small for the batch evicts (least recently used first) and recomputes: the same
    bits as a cache that holds everything, since each state is computed alone either way."""
    torch.manual_seed(0)
    model = tiny_bert()
    for p in model.parameters():
        p.requires_grad_(False)
    batch = right_padded([5, 9, 3, 7])
    host = Bare(model)
    per_example = 9 * 32 * 4          # the largest example's states, fp32
    small, big = PrefixCache(max_mb=2.5 * per_example / 2**20), PrefixCache()
    outs = []
    for cache in (small, big, small):
        with cache.feeding(host, {2: 4}, batch):
            outs.append(model(**batch).logits)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])
    assert small.stats.evictions > 0 and small.bytes <= small.max_bytes
    assert big.stats.evictions == 0 and len(big) == 4


def test_fp16_storage_halves_the_bytes_and_stays_close():
    torch.manual_seed(0)
    model = tiny_bert()
    batch = right_padded([5, 9, 3, 7])
    host = Bare(model)
    full, half = PrefixCache(), PrefixCache(fp16=True)
    with torch.no_grad():
        want = model(**batch).logits
        for c in (full, half):
            with c.feeding(host, {2: 4}, batch):
                model(**batch)
        with half.feeding(host, {2: 4}, batch):
            got = model(**batch).logits
    assert half.bytes * 2 == full.bytes
    assert torch.allclose(got, want, atol=1e-2) and half.stats.hits == 4


def test_dropout_on_the_prefix_runs_without_it():
    """With dropout on, the cached states are the prefix's eval-mode output (docs/cache.md)."""
    from transformers import BertConfig, BertModel

    from fedlegend.models.encoder import MeanPoolClassifier
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=64, hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5)
    model = MeanPoolClassifier(BertModel(cfg, add_pooling_layer=False), 2, 0.5)
    model.train()
    cache, batch = PrefixCache(), right_padded([5, 9])
    with cache.feeding(Bare(model), {2: 4}, batch):
        model(**batch)
    assert model.training                       # train mode restored
    (states, _), = [next(iter(cache._store.values()))]
    model.eval()
    captured = []
    _, _, layers = layer_list(model, 4)
    h = layers[2].register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    with torch.no_grad():
        model(**{k: v[:1, :5] for k, v in batch.items() if k != "labels"})
    h.remove()
    assert torch.equal(states, captured[0][0])


# ---------------------------------------------------------------- the residual invalidates (LoraHost)
def test_a_new_residual_below_the_boundary_invalidates(tiny_bert):
    """FLoRA / FedEx-LoRA fold a residual into the frozen weights: a new one below the boundary
    gives new keys, so the cached forward follows the weights (and equals the uncached one)."""
    from fedlegend.hosts import build_host
    from fedlegend.spec import inspect_model, residual_key

    model = tiny_bert
    spec = inspect_model(model, ("query", "value"))
    host = build_host("lora", model, spec, {l: 2 for l in range(4)}, 2.0, 0.0)
    ranks = {2: 2, 3: 2}
    name = host.use(ranks)
    base = host.read(name)
    host.model.eval()                 # this BERT has dropout 0.1
    batch = right_padded([5, 9, 3])
    cache = PrefixCache()
    t = next(t for t in spec.targets_of(0) if t.module.endswith("value"))
    outs, res = [], torch.randn(t.d_out, t.d_in, generator=torch.Generator().manual_seed(1))
    for scale in (0.0, 0.5, 0.5, 2.0):
        host.load(name, {**base, residual_key(0, t.module): scale * res})
        with torch.no_grad():
            want = host.model(**batch).logits
            with cache.feeding(host, ranks, batch):
                got = host.model(**batch).logits
        assert torch.allclose(got, want, atol=ATOL, rtol=0)
        outs.append(got)
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[3])
    assert cache.stats.misses == 3 * 3 and cache.stats.hits == 3   # 0.5 twice: the second is served
    # a residual above the boundary is not part of layer 2's prefix: its version stays
    before = host.frozen_version(2)
    host.load(name, {**base, residual_key(0, t.module): 2.0 * res, residual_key(3, t.module): res})
    assert host.frozen_version(2) == before and host.frozen_version(4) != before
    assert host.frozen_version(0) == ()


# ---------------------------------------------------------------- whole runs, cached vs uncached
@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    """60 real Rotten Tomatoes snippets (20 held out): 3 devices of ~13 examples, 4 steps of 4 a round:
    examples are drawn again within a round, so even FedRA's random layer sets meet cached states."""
    import csv

    from fedlegend.datasets import resolve_dataset
    ds = resolve_dataset("rotten-tomatoes")
    path = tmp_path_factory.mktemp("data") / "small.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(60):
            w.writerow([ds.texts[i], ds.label_names[ds.labels[i]]])
    return path


def run_method(cfg):
    from fedlegend.engine.local import run_local
    from fedlegend.experiment import build_experiment

    exp = build_experiment(cfg)
    state, records = run_local(exp, progress=False)
    return exp, state, records


@pytest.mark.slow   # two 3-round runs of the real MiniLM per method
@pytest.mark.parametrize("method", ["legend", "fedra", "hierfedlora", "fedadapter"])
def test_cached_run_equals_uncached_run(method, small_file, tiny_cfg):
    over = {"method.name": method, "data.name": "file", "data.path": str(small_file), "data.test_size": 20,
            "data.eval_subset": 20, "run.rounds": 3, "run.eval_every": 2, "train.local_steps": 4,
            "method.fedadapter.trial_rounds": 2, "method.hierfedlora.min_depth": 1}
    exp_on, state_on, rec_on = run_method(tiny_cfg(**over, **{"cache.prefix_cache": True}))
    exp_off, state_off, rec_off = run_method(tiny_cfg(**over, **{"cache.prefix_cache": False}))
    assert exp_off.prefix_cache is None and exp_on.prefix_cache.stats.hits > 0
    for on, off in zip(rec_on, rec_off, strict=True):
        assert on["virtual_time_s"] == off["virtual_time_s"]            # the cost model never sees the cache
        assert [(d["id"], d["layers"]) for d in on["devices"]] == [(d["id"], d["layers"]) for d in off["devices"]]
        assert [d["loss"] for d in on["devices"]] == pytest.approx([d["loss"] for d in off["devices"]], abs=ATOL)
        assert on["train_loss"] == pytest.approx(off["train_loss"], abs=ATOL)
        if off["loss"] is not None:
            assert on["loss"] == pytest.approx(off["loss"], abs=ATOL)
    assert state_on.keys() == state_off.keys()
    assert all(torch.allclose(state_on[k], state_off[k], atol=ATOL, rtol=0) for k in state_off)


def test_auto_turns_the_cache_on_where_examples_repeat():
    assert pays(visits_per_example=3.0, working_set_bytes=10 * 2**20, max_bytes=1024 * 2**20)
    assert not pays(visits_per_example=0.9, working_set_bytes=10 * 2**20, max_bytes=1024 * 2**20)
    assert not pays(visits_per_example=12.0, working_set_bytes=2048 * 2**20, max_bytes=1024 * 2**20)


def test_cache_for_settings():
    from fedlegend.config import CacheConfig
    from fedlegend.prefix_cache import cache_for

    lengths = [30] * 100
    assert cache_for(CacheConfig(), 384, lengths, draws=1000) is not None            # auto, 10 draws each
    assert cache_for(CacheConfig(), 384, lengths, draws=100) is None                 # 1 draw each: no reuse
    assert cache_for(CacheConfig(), 384, lengths, draws=1000, dropout=0.1) is None   # auto keeps dropout exact
    assert cache_for(CacheConfig(prefix_cache=True), 384, lengths, draws=100, dropout=0.1) is not None
    assert cache_for(CacheConfig(prefix_cache=False), 384, lengths, draws=1000) is None
    assert cache_for(CacheConfig(max_mb=1.0), 384, lengths, draws=1000) is None      # 4.4 MB do not fit 1 MB


def test_no_prefix_cache_flag():
    from fedlegend.cli import _add_common, _overrides
    import argparse

    p = argparse.ArgumentParser()
    _add_common(p)
    assert _overrides(p.parse_args(["--no-prefix-cache"]))["cache.prefix_cache"] is False
    assert _overrides(p.parse_args([]))["cache.prefix_cache"] is None
    assert np.isfinite(PrefixCache(max_mb=1).max_bytes)
