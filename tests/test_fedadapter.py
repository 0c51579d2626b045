"""FedAdapter: the bottleneck-adapter host, slicing and element-wise aggregation, the progressive
(depth, width) search, and a tiny end-to-end run on the real default model."""

import json

import pytest
import torch

from fedlegend.devices import lora_forward_flops, round_work
from fedlegend.hosts.bottleneck import BottleneckHost, adapter_key, find_ffn_outputs
from fedlegend.methods.aggregation import DeviceUpdate, elementwise_average, pad_to
from fedlegend.methods.base import RoundView
from fedlegend.methods.fedadapter import FedAdapter, loss_slope, slice_width, trial_groups
from fedlegend.spec import inspect_model


def make_host(model, widths):
    spec = inspect_model(model, ("query", "value"))
    return BottleneckHost(model, spec, widths), spec


def batch(n=3, width=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 100, (n, width), generator=g),
            "attention_mask": torch.ones(n, width, dtype=torch.long), "labels": torch.tensor([0, 1, 0][:n])}


# ---------------------------------------------------------------- the host
def test_host_is_identity_at_init_and_finds_ffn_outputs(tiny_bert):
    tiny_bert.eval()
    b = batch()
    with torch.no_grad():
        base = tiny_bert(**b).logits.clone()
    host, _ = make_host(tiny_bert, {l: 8 for l in range(4)})
    assert host.sites == {l: f"bert.encoder.layer.{l}.output.dense" for l in range(4)}
    with torch.no_grad():
        assert torch.equal(host.model(**b).logits, base)                    # up = 0: exactly the base model
    g = host.read(host.GLOBAL)
    assert g[adapter_key(3, "down.weight")].shape == (8, 32) and g[adapter_key(3, "up.weight")].shape == (32, 8)
    assert torch.count_nonzero(g[adapter_key(3, "up.weight")]) == 0
    assert 0 < g[adapter_key(3, "down.weight")].abs().max() <= 0.02          # Houlsby: N(0, 1e-2) cut at 2 std
    assert {k for k in g if k.startswith("head.")} == {"head.weight", "head.bias"}   # the LoRA host's head keys
    g[adapter_key(3, "up.weight")] = torch.randn(32, 8)
    host.load(host.GLOBAL, g)
    with torch.no_grad():
        assert not torch.allclose(host.model(**b).logits, base)
    # the bottleneck spec prices an adapter of width w as 2 * hidden * w parameters per layer
    assert host.spec.lora_params_per_rank(2) == 2 * 32


def test_host_error_names_missing_ffn_projection(tiny_bert):
    with pytest.raises(ValueError, match="FFN output projection"):
        find_ffn_outputs(tiny_bert, 4, 32, 48)        # no Linear 48 -> 32 in this model


def test_only_active_layout_trains_on_its_layers(tiny_bert):
    host, _ = make_host(tiny_bert, {l: 8 for l in range(4)})
    g = host.read(host.GLOBAL)
    for l in range(4):                                  # make every global adapter non-trivial
        g[adapter_key(l, "up.weight")] = torch.randn(32, 8) * 0.1
    host.load(host.GLOBAL, g)
    plan = {2: 4, 3: 4}
    name = host.use(plan)
    assert name != host.GLOBAL
    payload = {k: slice_width(v, k, 4) for k, v in g.items() if k.startswith(("layers.2.", "layers.3.", "head."))}
    host.load(name, payload)
    assert set(host.params(name)) == set(payload)
    host.model.train()
    host.model(**batch()).loss.backward()
    for k, p in host.params(name).items():
        assert p.requires_grad and p.grad is not None, k
    for k, p in host.params(host.GLOBAL).items():
        if not k.startswith("head."):
            assert not p.requires_grad and p.grad is None, k
    assert all(p.grad is None for n, p in tiny_bert.named_parameters() if not n.startswith("classifier."))
    # the forward runs only the active layout: equal to a global layout holding just layers 2, 3 (width 4)
    host.model.eval()
    with torch.no_grad():
        out_layout = host.model(**batch()).logits
        only = {k: (torch.zeros_like(v) if k.startswith(("layers.0.", "layers.1.")) and "up." in k else v)
                for k, v in g.items()}
        for l in (2, 3):
            only[adapter_key(l, "up.weight")] = torch.cat([g[adapter_key(l, "up.weight")][:, :4],
                                                           torch.zeros(32, 4)], 1)
        host.use(host.global_ranks)
        host.load(host.GLOBAL, only)
        assert torch.allclose(host.model(**batch()).logits, out_layout, atol=1e-6)


def test_save_and_reload_reproduce_outputs(tiny_bert, tmp_path):
    host, spec = make_host(tiny_bert, {l: 4 for l in range(4)})
    g = {k: torch.randn_like(v) * 0.1 for k, v in host.read(host.GLOBAL).items()}
    host.save_pretrained(tmp_path, g)
    cfg = json.loads((tmp_path / "bottleneck_config.json").read_text())
    assert cfg["widths"] == {str(l): 4 for l in range(4)} and cfg["placement"]["1"].endswith("layer.1.output.dense")
    tiny_bert.eval()
    with torch.no_grad():
        want = host.model(**batch()).logits
    from transformers import BertConfig, BertForSequenceClassification
    fresh = BertForSequenceClassification(BertConfig(**tiny_bert.config.to_dict())).eval()
    fresh.load_state_dict(tiny_bert.state_dict())       # same base weights (head included: overwritten anyway)
    reloaded = BottleneckHost.from_pretrained(fresh, tmp_path, spec)
    with torch.no_grad():
        assert torch.allclose(reloaded.model(**batch()).logits, want, atol=1e-6)


# ---------------------------------------------------------------- slicing and aggregation
def test_slice_then_pad_round_trips():
    down, up = torch.randn(16, 10), torch.randn(10, 16)
    for key, t, w in (("layers.0.adapter.down.weight", down, 4), ("layers.0.adapter.up.weight", up, 4),
                      ("layers.0.adapter.down.bias", torch.randn(16), 8)):
        s = slice_width(t, key, w)
        padded, mask = pad_to(s, tuple(t.shape))
        assert torch.equal(padded * mask, t * mask) and torch.equal(padded * (1 - mask), torch.zeros_like(t))
        assert int(mask.sum()) == s.numel()
    assert slice_width(down, "layers.0.adapter.down.weight", 4).shape == (4, 10)
    assert slice_width(up, "layers.0.adapter.up.weight", 4).shape == (10, 4)
    assert torch.equal(slice_width(up, "layers.0.adapter.up.weight", 4), up[:, :4])


def test_elementwise_average_touches_only_trained_elements():
    k = "layers.3.adapter.up.weight"
    kd = "layers.3.adapter.down.weight"
    g = {k: torch.randn(6, 8), kd: torch.randn(8, 6), "layers.1.adapter.up.weight": torch.randn(6, 8),
         "head.bias": torch.zeros(2)}
    a = DeviceUpdate(0, {k: torch.ones(6, 2), kd: torch.ones(2, 6), "head.bias": torch.ones(2)}, samples=1)
    b = DeviceUpdate(1, {k: 3 * torch.ones(6, 4), kd: 3 * torch.ones(4, 6), "head.bias": 3 * torch.ones(2)}, samples=3)
    new = elementwise_average(g, [a, b], "samples")
    assert torch.allclose(new[k][:, :2], torch.full((6, 2), 2.5))        # (1*1 + 3*3) / 4
    assert torch.equal(new[k][:, 2:4], torch.full((6, 2), 3.0))           # only b trained these
    assert torch.equal(new[k][:, 4:], g[k][:, 4:])                        # nobody: kept
    assert torch.allclose(new[kd][:2], torch.full((2, 6), 2.5)) and torch.equal(new[kd][4:], g[kd][4:])
    assert torch.equal(new["layers.1.adapter.up.weight"], g["layers.1.adapter.up.weight"])
    assert torch.allclose(new["head.bias"], torch.full((2,), 2.5))
    plain = elementwise_average(g, [a, b], "mean")
    assert torch.allclose(plain[k][:, :2], torch.full((6, 2), 2.0))


# ---------------------------------------------------------------- the progressive search
@pytest.fixture
def method(tiny_bert, method_ctx):
    spec = inspect_model(tiny_bert, ("query", "value"))
    ctx = method_ctx(spec=spec, n=6, steps=1, batch_size=4, nominal_width=16, seed=0)
    return FedAdapter(ctx, init_depth=2, init_width=4, depth_step=1, max_width=16, trial_rounds=2)


def global_state(spec_layers=4, width=16, hidden=32):
    g = {}
    for l in range(spec_layers):
        g[adapter_key(l, "down.weight")] = torch.randn(width, hidden)
        g[adapter_key(l, "down.bias")] = torch.zeros(width)
        g[adapter_key(l, "up.weight")] = torch.zeros(hidden, width)
        g[adapter_key(l, "up.bias")] = torch.zeros(hidden)
    g["head.weight"], g["head.bias"] = torch.zeros(2, hidden), torch.zeros(2)
    return g


def run_period(m, g, rounds, rate):
    """Feed the method synthetic rounds: each group's loss falls at `rate[group]` per virtual second."""
    loss = {grp: 1.0 for grp in rate}
    for h in rounds:
        out = m.configure(RoundView(h, list(range(6))), g)
        plans = {d: a.plan for d, a in out.items()}
        updates = [DeviceUpdate(d, {k: v + 1.0 for k, v in a.payload.items()}, samples=10,
                                loss=loss[m._group_of[d]], time_s=2.0) for d, a in out.items()]
        for grp in loss:
            loss[grp] -= rate[grp] * 2.0
        g = m.aggregate(h, g, updates).state     # observes the reported losses and times, then aggregates
    return g, plans


def test_search_upgrades_to_the_best_progressing_trial(method):
    assert method.candidates() == {"current": (2, 4), "deeper": (3, 4), "wider": (2, 8)}
    g0 = global_state()
    g, plans = run_period(method, g0, [1, 2], {"current": 0.01, "deeper": 0.05, "wider": 0.02})
    assert method.history[-1]["winner"] == "deeper" and method.current == (3, 4)
    assert method.history[-1]["progress"]["deeper"] == pytest.approx(0.05)
    # the new global adapter is the deeper group's model: layers 1-3, width 4, trained twice (+1 per round)
    assert torch.allclose(g[adapter_key(1, "up.weight")][:, :4], torch.full((32, 4), 2.0))
    assert torch.equal(g[adapter_key(1, "up.weight")][:, 4:], g0[adapter_key(1, "up.weight")][:, 4:])
    assert torch.equal(g[adapter_key(0, "up.weight")], g0[adapter_key(0, "up.weight")])
    # the wider group's units 4..7 were discarded with its model
    assert torch.equal(g[adapter_key(3, "up.weight")][:, 4:], g0[adapter_key(3, "up.weight")][:, 4:])
    # next period: deeper (4, 4) vs wider (3, 8) vs current; now the wider one progresses best
    g, plans = run_period(method, g, [3, 4], {"current": 0.01, "deeper": 0.0, "wider": 0.03})
    assert method.current == (3, 8)
    assert {tuple(sorted(p.ranks.items())) for p in plans.values()} == {
        ((1, 4), (2, 4), (3, 4)), ((0, 4), (1, 4), (2, 4), (3, 4)), ((1, 8), (2, 8), (3, 8))}
    # the current configuration keeps its place when it progresses best
    run_period(method, g, [5, 6], {"current": 0.05, "deeper": 0.01, "wider": 0.01})
    assert method.current == (3, 8)


def test_a_period_ending_without_updates_still_closes_the_period(method):
    """Every update of a period's last round lost: the period still ends (a winner, from what the
    trials did) and the current group's earlier work becomes the global adapter."""
    g0 = global_state()
    g, _ = run_period(method, g0, [1], {"current": 0.01, "deeper": 0.05, "wider": 0.02})
    method.configure(RoundView(2, list(range(6))), g)
    new = method.aggregate(2, g, []).state
    assert [h["round"] for h in method.history] == [2] and method.history[0]["winner"] == "current"
    assert torch.allclose(new[adapter_key(2, "up.weight")][:, :4], torch.full((32, 4), 1.0))   # round 1's training


def test_groups_are_deterministic_and_cover_devices():
    a = trial_groups(list(range(7)), 3, seed=1, period=2)
    assert a == trial_groups(list(range(7)), 3, seed=1, period=2)
    assert sorted(sum(a, [])) == list(range(7)) and sorted(len(x) for x in a) == [2, 2, 3]
    assert a != trial_groups(list(range(7)), 3, seed=1, period=3)
    assert loss_slope([1.0, 1.0, 1.0], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    assert loss_slope([1.0], [3.0]) is None


def test_search_stops_at_the_caps(tiny_bert, method_ctx):
    spec = inspect_model(tiny_bert, ("query", "value"))
    ctx = method_ctx(spec=spec, n=3, steps=1, batch_size=4, nominal_width=16)
    m = FedAdapter(ctx, init_depth=4, init_width=16, max_width=16)
    assert m.candidates() == {"current": (4, 16)}
    assert FedAdapter(ctx, init_depth=4, init_width=16, max_width=16, search=False).candidates() == {"current": (4, 16)}
    assert FedAdapter(ctx, search=False).candidates() == {"current": (2, 8)}


def test_cost_model_prices_adapter_width_as_its_parameters(tiny_bert):
    host, lora_spec = make_host(tiny_bert, {l: 8 for l in range(4)})
    w, b, t = 8, 4, 16
    assert lora_forward_flops(host.spec, 3, w, b, t) == 2.0 * b * t * (w * 32 + 32 * w)   # down + up matmuls
    wide = round_work(host.spec, {3: 16}, [(b, t, 1)], 0, 0)
    narrow = round_work(host.spec, {3: 8}, [(b, t, 1)], 0, 0)
    assert wide.forward_flops > narrow.forward_flops and wide.backward_flops > narrow.backward_flops


# ---------------------------------------------------------------- end to end (real default model, tiny)
def test_fedadapter_end_to_end(tmp_path, tiny_cfg):
    from fedlegend.assets import resolve_model
    from fedlegend.data import eval_batches
    from fedlegend.models import load_base_model
    from fedlegend.rundir import run_experiment

    cfg = tiny_cfg(**{"method.name": "fedadapter", "method.fedadapter.trial_rounds": 2})
    summary = run_experiment(cfg, tmp_path, progress=False)
    recs = [json.loads(l) for l in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all(not r["events"] for r in recs) and recs[-1]["accuracy"] is not None
    configs = {(d["depth"], tuple(d["ranks"])) for d in recs[0]["devices"]}
    assert configs == {(2, (8, 8)), (4, (8, 8, 8, 8)), (2, (16, 16))}   # current, deeper, wider trial groups
    assert all(r["bytes_up"] > 0 and r["round_time_s"] > 0 for r in recs)
    assert (tmp_path / "adapter" / "bottleneck_config.json").exists()
    # the exported adapter, reloaded on a fresh base model, reproduces the final accuracy
    from fedlegend.experiment import build_experiment
    exp = build_experiment(cfg)
    base = load_base_model(resolve_model("minilm-l6").path, num_labels=2)
    model = BottleneckHost.from_pretrained(base, tmp_path / "adapter").model.eval()
    correct = 0
    with torch.no_grad():
        for bt in eval_batches(exp.test, 16, exp.pad_id):
            correct += int((model(**bt).logits.argmax(-1) == bt["labels"]).sum())
    assert correct / len(exp.test) == pytest.approx(summary["final_accuracy"])
