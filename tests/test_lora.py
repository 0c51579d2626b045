import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fedlegend.hosts.lora import LoraHost, lora_config
from fedlegend.spec import inspect_model, key_layer, lora_key, residual_key


def _batch():
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(5, 100, (4, 12), generator=g), "labels": torch.tensor([0, 1, 0, 1])}


def test_inspect_finds_targets_and_head(tiny_bert):
    spec = inspect_model(tiny_bert, ("query", "value"))
    assert spec.num_layers == 4 and spec.hidden == 32
    assert [(t.layer, t.module) for t in spec.targets_of(2)] == [(2, "attention.self.query"), (2, "attention.self.value")]
    assert spec.lora_params_per_rank(0) == 2 * (32 + 32)
    with pytest.raises(ValueError, match="model.target_modules"):
        inspect_model(tiny_bert, ("nope",))


def test_per_layer_ranks_and_canonical_layout(tiny_bert):
    spec = inspect_model(tiny_bert, ("query", "value"))
    host = LoraHost(tiny_bert, spec, {0: 1, 1: 2, 2: 3, 3: 4})
    st = host.read(host.GLOBAL)
    assert st[lora_key(3, "attention.self.query", "lora_A")].shape == (4, 32)      # (r, d_in)
    assert st[lora_key(3, "attention.self.query", "lora_B")].shape == (32, 4)      # (d_out, r)
    assert st[lora_key(0, "attention.self.value", "lora_A")].shape == (1, 32)
    assert {"head.weight", "head.bias"} <= set(st)
    assert key_layer("layers.3.attention.self.query.lora_A") == 3 and key_layer("head.weight") is None


def test_rank_pattern_first_match_uses_full_names(tiny_bert):
    spec = inspect_model(tiny_bert, ("query", "value"))
    cfg = lora_config(spec, {1: 2, 3: 7}, 2.0, 0.0)
    assert cfg.rank_pattern["bert.encoder.layer.1.attention.self.query"] == 2
    assert cfg.alpha_pattern["bert.encoder.layer.3.attention.self.value"] == 14.0   # alpha/r = 2 at every rank
    with pytest.raises(ValueError, match="outside"):
        lora_config(spec, {9: 2}, 2.0, 0.0)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_backward_stops_at_layer_L_minus_k(tiny_bert, depth):
    spec = inspect_model(tiny_bert, ("query", "value"))
    host = LoraHost(tiny_bert, spec, {l: 2 for l in range(4)})
    name = host.use({l: 2 for l in range(4 - depth, 4)})
    host.peft.train()
    host.peft(**_batch()).loss.backward()
    for pname, p in host.peft.named_parameters():
        if p.grad is not None:
            assert p.requires_grad
    graded = {int(n.split("layer.")[1].split(".")[0]) for n, p in host.peft.named_parameters()
              if p.grad is not None and ".layer." in n}
    assert graded == set(range(4 - depth, 4))
    # no frozen base weight below L-k received a gradient either
    assert all(p.grad is None for n, p in host.peft.named_parameters() if "lora_" not in n and "classifier" not in n)


def test_backward_work_grows_with_depth(tiny_bert):
    """The step's backward FLOPs (a clock-free stand-in for its time) grow with the depth k."""
    spec = inspect_model(tiny_bert, ("query", "value"))
    host = LoraHost(tiny_bert, spec, {l: 2 for l in range(4)})
    flops = []
    for depth in (1, 2, 3, 4):
        host.use({l: 2 for l in range(4 - depth, 4)})
        loss = host.peft(**_batch()).loss
        with FlopCounterMode(display=False) as fc:
            loss.backward()
        flops.append(fc.get_total_flops())
    assert all(b > a for a, b in zip(flops, flops[1:])), flops


def test_load_read_roundtrip_and_shape_check(tiny_bert):
    spec = inspect_model(tiny_bert, ("query", "value"))
    host = LoraHost(tiny_bert, spec, {l: 2 for l in range(4)})
    name = host.use({3: 2})
    st = {k: torch.randn_like(v) for k, v in host.read(name).items()}
    host.load(name, st)
    assert all(torch.equal(st[k], v) for k, v in host.read(name).items())
    bad = dict(st)
    k = next(iter(bad))
    bad[k] = torch.zeros(5, 5)
    with pytest.raises(ValueError, match="does not fit"):
        host.load(name, bad)


def test_residual_is_added_to_the_frozen_weight_and_removed_again(tiny_bert):
    """A state's residual makes the frozen weight W0 + residual; a state without one restores W0."""
    spec = inspect_model(tiny_bert, ("query", "value"))
    host = LoraHost(tiny_bert, spec, {l: 2 for l in range(4)})
    host.peft.eval()
    plain = host.read(host.GLOBAL)
    with torch.no_grad():
        base_logits = host.model(**_batch()).logits
    t = spec.targets_of(1)[0]
    res = torch.randn(t.d_out, t.d_in, generator=torch.Generator().manual_seed(1))
    host.load(host.GLOBAL, {**plain, residual_key(1, t.module): res})
    weight = host._base_linear(t.full_name).weight
    assert torch.allclose(weight, host._w0[t.full_name] + res)
    with torch.no_grad():
        assert not torch.allclose(host.model(**_batch()).logits, base_logits)
    assert not any(k.endswith("residual") for k in host.read(host.GLOBAL))   # never trained or uploaded
    host.load(host.GLOBAL, plain)
    with torch.no_grad():
        assert torch.allclose(host.model(**_batch()).logits, base_logits)
    with pytest.raises(ValueError, match="does not fit"):
        host.load(host.GLOBAL, {**plain, residual_key(1, t.module): torch.zeros(3, 3)})


# ------------------------------------------------------------------ the bounded layout cache
def _data(n=24, seed=0):
    from fedlegend.data import Encoded

    g = np.random.default_rng(seed)
    return Encoded([g.integers(5, 100, size=int(g.integers(4, 12))).tolist() for _ in range(n)],
                   g.integers(0, 2, size=n))


def _train(host, plan, payload, data):
    from fedlegend.client import train_local
    from fedlegend.tasks import build_task

    return train_local(host, build_task("classification"), plan, payload, data, steps=3, batch_size=4, lr=1e-2,
                       rng=np.random.default_rng(7), pad_id=0)


def test_layout_cache_is_bounded_keeps_global_and_recreates_identically(tiny_bert):
    """max_layouts=3 and five layouts: at most 3 held, the global one never evicted, and a layout trains
    to exactly the same state whether it was just created, cached, or evicted and created again."""
    from fedlegend.methods.aggregation import truncated_assignment
    from fedlegend.methods.base import LoraPlan

    spec = inspect_model(tiny_bert, ("query", "value"))
    assert tiny_bert.config.hidden_dropout_prob > 0       # training draws dropout masks from torch's generator
    host = LoraHost(tiny_bert, spec, {l: 4 for l in range(4)}, max_layouts=3)
    g = {k: torch.randn_like(v) * 0.1 for k, v in host.read(host.GLOBAL).items()}
    data = _data()
    first = LoraPlan(0, {2: 2, 3: 3})
    payload = truncated_assignment(g, first.ranks)
    created = _train(host, first, payload, data)
    name = host.layouts()[-1]
    cached = _train(host, first, payload, data)           # the same layout, from the cache
    assert host.layouts()[-1] == name
    for ranks in ({3: 1}, {1: 2, 3: 2}, {0: 1}, {l: 1 for l in range(4)}):
        host.use(ranks)
        held = host.layouts()
        assert len(held) <= 3 and host.GLOBAL in held
    assert len(host.layouts()) == 3 and name not in host.layouts()   # the first layout was evicted
    host.load(host.use(host.global_ranks), g)             # the global layout is still there and usable
    recreated = _train(host, first, payload, data)        # created afresh, under a new name
    assert host.layouts()[-1] != name
    for other in (cached, recreated):
        assert other.state.keys() == created.state.keys() and other.loss == created.loss
        assert all(torch.equal(other.state[k], created.state[k]) for k in created.state)
    assert not all(torch.equal(created.state[k], payload[k]) for k in created.state)   # it did train


def test_creating_a_layout_leaves_torchs_generator_alone(tiny_bert):
    from fedlegend.hosts.bottleneck import BottleneckHost

    spec = inspect_model(tiny_bert, ("query", "value"))
    host = LoraHost(tiny_bert, spec, {l: 2 for l in range(4)})
    torch.manual_seed(123)
    state = torch.get_rng_state()
    host.use({1: 3, 2: 3})                                # a new layout: peft initialises its tensors
    assert torch.equal(torch.get_rng_state(), state)
    from transformers import BertConfig, BertForSequenceClassification
    other = BottleneckHost(BertForSequenceClassification(BertConfig(**tiny_bert.config.to_dict())), spec,
                           {l: 4 for l in range(4)})
    state = torch.get_rng_state()
    other.use({3: 2})
    assert torch.equal(torch.get_rng_state(), state)
