"""Secure aggregation (privacy.secure_aggregation, engine/flower/secagg.py, privacy/secagg.py).

The padded-sum arithmetic is checked as a pure function against each method's own aggregate.
The protocol runs for real (Flower's SecAggPlusWorkflow on the server, Flower's secaggplus_mod on
the ClientApp) over engine/flower/inprocess.py's Grid: each message goes to the ClientApp with the
node's own persistent Context, as a SuperNode runs it, without Ray or sockets. test_slow_secagg_on_flower_simulation runs it on Flower's simulation engine (Ray).
"""

import os

import pytest
import torch

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


from fedlegend.config import build_config  # noqa: E402
from fedlegend.engine import flower as fl  # noqa: E402
from fedlegend.engine.flower.inprocess import run_in_process  # noqa: E402
from fedlegend.engine.flower.flwr_compat import SECAGG_CONFIGS, TaskIdentity  # noqa: E402
from fedlegend.engine.flower.secagg import error_bound, quantization_range  # noqa: E402
from fedlegend.engine.local import run_local  # noqa: E402
from fedlegend.experiment import build_experiment  # noqa: E402
from fedlegend.methods.aggregation import DeviceUpdate, layerwise_average, zero_pad_average  # noqa: E402
from fedlegend.privacy.secagg import aggregate_sums, contribution, device_weights  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def flower_identity(monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def tiny_cfg(**over):
    base = {"fleet.devices": 3, "run.rounds": 2, "train.local_steps": 1, "train.batch_size": 4,
            "data.eval_subset": 32, "run.eval_every": 1, "run.target_accuracy": 0.5, "method.name": "legend"}
    base.update(over)
    return build_config({}, base)


# ------------------------------------------------------------------ the arithmetic
def _global(layers=3, rank=4, d=5):
    g = {}
    for l in range(layers):
        g[f"layers.{l}.q.lora_A"] = torch.randn(rank, d)
        g[f"layers.{l}.q.lora_B"] = torch.randn(d, rank)
    g["head.weight"], g["head.bias"] = torch.randn(2, d), torch.randn(2)
    return g


def _update(g, layers, ranks, gen):
    s = {"head.weight": torch.randn(2, 5, generator=gen), "head.bias": torch.randn(2, generator=gen)}
    for l in layers:
        r = ranks[l]
        s[f"layers.{l}.q.lora_A"] = torch.randn(r, 5, generator=gen)
        s[f"layers.{l}.q.lora_B"] = torch.randn(5, r, generator=gen)
    return s


class _M:
    def __init__(self, name, weighting="mean"):
        self.info = type("I", (), {"name": name})()
        self.weighting = weighting


def _secure(g, method, updates):
    w = device_weights(method, {u.device: u.samples for u in updates})
    sums = None
    for u in updates:
        vec = contribution(g, u.state, *w[u.device])
        sums = vec if sums is None else [a + b for a, b in zip(sums, vec)]
    return aggregate_sums(g, sums, 0.5 * min(min(x) for x in w.values()))


@pytest.mark.parametrize("weighting", ["mean", "samples"])
def test_padded_sum_equals_layerwise_average(weighting):
    """LEGEND's eq. 17 over devices that train different layers: the sums of the padded, weighted
    contributions give the same adapter; a layer nobody trained keeps its value."""
    gen = torch.Generator().manual_seed(0)
    g = _global(layers=4)
    plans = [[3], [2, 3], [1, 2, 3], [3]]       # nobody trains layer 0
    updates = [DeviceUpdate(i, _update(g, ls, {l: 4 for l in ls}, gen), samples=10 + 7 * i)
               for i, ls in enumerate(plans)]
    got = _secure(g, _M("legend", weighting), updates)
    want = layerwise_average(g, updates, weighting)
    for k in g:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6)
    assert torch.equal(got["layers.0.q.lora_A"], g["layers.0.q.lora_A"])


def test_padded_sum_equals_hetlora_zero_pad_average():
    """Heterogeneous ranks and layers (HetLoRA's zero-padded average by samples): padded rows add zero
    to the sum and the device's weight to the tensor's total, as zero_pad_average counts them."""
    gen = torch.Generator().manual_seed(1)
    g = _global(layers=3, rank=6)
    ranks = [{0: 2, 1: 2, 2: 2}, {1: 6, 2: 6}, {2: 3}]
    updates = [DeviceUpdate(i, _update(g, sorted(r), r, gen), samples=s) for i, (r, s) in enumerate(zip(ranks, [5, 20, 9]))]
    got = _secure(g, _M("hetlora", "samples"), updates)
    want = zero_pad_average(g, updates, lambda u, p: float(u.samples))
    for k in g:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6)


def test_quantization_range_never_wraps():
    for n in (2, 3, 6, 7, 8, 80, 1000):
        q = quantization_range(n)
        assert (n + 1) * q <= 2**32 and q <= 2**30
    assert error_bound(6, 8.0) < 2e-7


def test_methods_whose_rule_is_not_a_sum_are_refused():
    over = {"privacy.secure_aggregation": True, "run.engine": "flower"}
    for name, why in [("flexlora", "SVD"), ("hlora", "SVD"), ("flora", "stacked"), ("fedex-lora", "residual"),
                      ("fedadapter", "losses"), ("hierfedlora", "intra-group")]:
        with pytest.raises(Exception, match=why):
            build_config({}, {**over, "method.name": name})
    with pytest.raises(Exception, match="weighting"):
        build_config({}, {**over, "method.name": "hetlora"})
    with pytest.raises(Exception, match="--engine flower"):
        build_config({}, {"privacy.secure_aggregation": True})
    for name in ("legend", "fedlora", "ffa-lora", "fedra"):
        build_config({}, {**over, "method.name": name})
    build_config({}, {**over, "method.name": "hetlora", "method.hetlora.weighting": "samples"})


# ------------------------------------------------------------------ the protocol, in process
def run_on_local_grid(cfg, on_snapshot=None):
    return run_in_process(build_experiment(cfg), on_snapshot=on_snapshot, timeout=60.0)


def test_secagg_gives_the_plain_global_adapter(flower_identity):
    """LEGEND, 3 devices, 2 rounds under Flower's SecAgg+ (real masks, quantisation, unmasking): the same
    plans, clock and accuracy as the local engine's plain run; after round 1 (same start) the global adapter
    within the stated bound (n devices x 2R / 2^q on each sum, over a summed weight >= 1 for LEGEND's mean),
    after round 2 within 1e-4; records count the masked upload and the protocol's messages."""
    cfg = tiny_cfg()
    plain_snaps, secure_snaps = [], []
    plain_state, plain_recs = run_local(build_experiment(cfg), progress=False, on_snapshot=plain_snaps.append)
    strategy, grid = run_on_local_grid(tiny_cfg(**{"run.engine": "flower", "privacy.secure_aggregation": True}),
                                       on_snapshot=secure_snaps.append)
    recs = strategy.records
    assert [r["round"] for r in recs] == [1, 2]
    stages = [m.content.config_records.get(SECAGG_CONFIGS) for m in grid.sent]
    assert sum(s is not None for s in stages) == 2 * 4 * 3   # 4 stages x 3 nodes x 2 rounds
    for p, s in zip(plain_recs, recs):
        assert [(d["id"], d["layers"], d["ranks"]) for d in s["devices"]] == \
               [(d["id"], d["layers"], d["ranks"]) for d in p["devices"]]
        assert s["events"] == [] and s["round_time_s"] == pytest.approx(p["round_time_s"])
        assert s["accuracy"] == pytest.approx(p["accuracy"], abs=1 / 32 + 1e-9)
        sa = s["secagg"]
        assert sa["plain_bytes_up"] == p["bytes_up"] > 0
        # int64 masked values over the whole global shape (+ weights): more than the plain upload
        assert sa["masked_bytes_up"] > sa["plain_bytes_up"] and sa["protocol_bytes_up"] > 0
        assert s["bytes_up"] == sa["masked_bytes_up"] + sa["protocol_bytes_up"]
        assert s["bytes_down"] == p["bytes_down"] + sa["protocol_bytes_down"]
    bound = error_bound(3, cfg.privacy.secagg_range)
    assert recs[0]["secagg"]["max_error"] == bound
    first_plain, first_secure = plain_snaps[0].state, secure_snaps[0].state
    for k in first_plain:
        err = float((first_secure[k].double() - first_plain[k].double()).abs().max())
        assert err <= bound + 1e-7 * float(first_plain[k].abs().max()), (k, err, bound)
    assert set(strategy.state) == set(plain_state)
    worst = max(float((strategy.state[k] - plain_state[k]).abs().max()) for k in plain_state)
    assert worst < 1e-4, worst


def test_secagg_survives_a_dropped_device(flower_identity):
    """A device the fleet drops out raises in the round's training stage: SecAgg+ rebuilds its pairwise
    masks from the others' key shares and the round completes with the rest (6 devices, 1 or more dropped)."""
    cfg = tiny_cfg(**{"fleet.devices": 6, "run.rounds": 1, "fleet.dropout_rate": 0.3, "run.engine": "flower",
                      "privacy.secure_aggregation": True})
    strategy, _ = run_on_local_grid(cfg)
    recs = strategy.records
    failed = [e for r in recs for e in r["events"] if e["kind"] == "failed"]
    assert failed and all("dropped out" in e["detail"] for e in failed)
    assert all(r["devices"] for r in recs)
    assert any(not torch.equal(strategy.state[k], strategy.exp.initial_state[k]) for k in strategy.state)
    assert all(torch.isfinite(t).all() for t in strategy.state.values())


def test_dp_on_the_flower_strategy_matches_the_local_engine(flower_identity):
    """Central DP (--dp-epsilon) through the Flower strategy: the same records (epsilon per round, noise
    multiplier) and, noise being keyed by (seed, round), the same adapter as the local engine."""
    over = {"privacy.epsilon": 8.0}
    local_state, local_recs = run_local(build_experiment(tiny_cfg(**over)), progress=False)
    strategy, _ = run_on_local_grid(tiny_cfg(**over, **{"run.engine": "flower"}))
    for lr, fr in zip(local_recs, strategy.records):
        for key in ("epsilon", "delta", "noise_multiplier", "bytes_up", "bytes_down"):
            assert fr[key] == lr[key], key
        assert fr["accuracy"] == pytest.approx(lr["accuracy"])
    for k in local_state:
        torch.testing.assert_close(strategy.state[k], local_state[k], atol=1e-5, rtol=1e-4)


def test_secagg_with_central_dp(flower_identity):
    """Secure aggregation composes with central DP: the devices clip, the server noises the aggregate it
    computed from the sums (which tensors each device trained is public: its plan)."""
    strategy, _ = run_on_local_grid(tiny_cfg(**{"run.rounds": 1, "run.engine": "flower",
                                                "privacy.secure_aggregation": True, "privacy.epsilon": 8.0}))
    rec = strategy.records[0]
    assert rec["epsilon"] <= 8.0 and rec["secagg"]["masked_bytes_up"] > 0
    assert all(torch.isfinite(t).all() for t in strategy.state.values())


@pytest.mark.slow
def test_slow_secagg_on_flower_simulation():
    """The same under Flower's simulation engine (Ray, one SuperNode per device)."""
    plain_state, _ = run_local(build_experiment(tiny_cfg()), progress=False)
    strategy = fl.MethodStrategy(build_experiment(tiny_cfg(**{"run.engine": "flower",
                                                              "privacy.secure_aggregation": True})))
    fl.simulate(strategy, cpus_per_client=1)
    assert [r["round"] for r in strategy.records] == [1, 2]
    worst = max(float((strategy.state[k] - plain_state[k]).abs().max()) for k in plain_state)
    assert worst < 1e-4, worst
    assert all(r["secagg"]["masked_bytes_up"] > 0 for r in strategy.records)
