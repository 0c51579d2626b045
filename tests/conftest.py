"""Shared fixtures: a tiny random BERT, a tiny run config, and tiny model specs / method contexts.

The factories are session-scoped callables (stateless), so module-scoped fixtures and
hypothesis tests can use them too.
"""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

# The smallest run of the real default model and data every end-to-end test starts from:
# 3 devices, 2 rounds of 1 local step, a 48-example test slice, evaluated every round.
TINY_RUN = {"fleet.devices": 3, "run.rounds": 2, "train.local_steps": 1, "train.batch_size": 4,
            "data.eval_subset": 48, "run.eval_every": 1, "run.target_accuracy": 0.5}


def _tiny_cfg(**over):
    """A validated Config: TINY_RUN with dotted overrides, e.g. tiny_cfg(**{"method.name": "flora"})."""
    from fedlegend.config import build_config

    return build_config({}, {**TINY_RUN, **over})


def _model_spec(L=6, d=32, modules=("q", "v"), intermediate=None, head_bias=True, num_labels=2):
    """A hand-made ModelSpec: L layers, each with square d x d LoRA targets `modules`."""
    from fedlegend.spec import LoraTarget, ModelSpec

    targets = tuple(LoraTarget(l, m, f"enc.layer.{l}.{m}", d, d) for l in range(L) for m in modules)
    head = {"weight": (num_labels, d), **({"bias": (num_labels,)} if head_bias else {})}
    return ModelSpec(num_layers=L, hidden=d, intermediate=intermediate or 4 * d, targets=targets,
                     head_module="classifier", head_shapes=head, num_labels=num_labels)


def _method_ctx(L=6, n=4, d=32, steps=2, batch_size=4, nominal_width=16, seed=0, alpha=2.0,
                label_counts=(), spec=None, **spec_kw):
    """A MethodContext on a hand-made spec (or `spec`): n devices, `steps` local steps each
    (an int for all, or a per-device tuple)."""
    from fedlegend.methods.base import MethodContext

    spec = spec if spec is not None else _model_spec(L, d, **spec_kw)
    local_steps = tuple(steps) if isinstance(steps, (tuple, list)) else (steps,) * n
    return MethodContext(spec=spec, num_devices=n, local_steps=local_steps, batch_size=batch_size,
                         nominal_width=nominal_width, seed=seed, alpha_over_rank=alpha,
                         label_counts=tuple(tuple(c) for c in label_counts))


def _run_round(exp, round_, state, estimator):
    """One round of the local engine from its server and device halves: plan, train every assigned
    device in this process, validate and aggregate. Returns the RoundOutcome."""
    from fedlegend.engine.local import finish_round, plan_round, run_device

    rp = plan_round(exp, round_, state, estimator)
    replies = {dev: run_device(exp, a) for dev, a in rp.assignments.items()}
    return finish_round(exp, rp, state, estimator, replies)


@pytest.fixture(scope="session")
def run_round():
    """run_round(exp, round, global_state, estimator) -> RoundOutcome (the local engine's round)."""
    return _run_round


@pytest.fixture(scope="session")
def tiny_cfg():
    """Factory of tiny run configs: tiny_cfg(**{"method.name": "fedlora", "fleet.devices": 2})."""
    return _tiny_cfg


@pytest.fixture(scope="session")
def model_spec():
    """Factory of hand-made ModelSpecs: model_spec(L=6, d=32, modules=("q", "v"))."""
    return _model_spec


@pytest.fixture(scope="session")
def method_ctx():
    """Factory of tiny MethodContexts: method_ctx(L=6, n=4, d=32, steps=2, alpha=2.0, label_counts=...)."""
    return _method_ctx


@pytest.fixture
def tiny_bert():
    """A tiny random BERT classifier (unit tests only; runs use real pretrained weights)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2)
    return BertForSequenceClassification(cfg)


# Slow tests in files this conftest's owners do not edit (Flower engine and deployment), by node id:
# the others carry @pytest.mark.slow where they are defined.
SLOW_ELSEWHERE = ("test_flower_deploy.py::test_deployed_federation",)


def pytest_collection_modifyitems(config, items):
    """The `slow` marker also on tests named test_slow_* (the Flower simulation, the deployed restart)
    and on SLOW_ELSEWHERE: all of them run by default, `-m "not slow"` leaves them out."""
    for item in items:
        if (getattr(item, "originalname", item.name).startswith("test_slow_")
                or item.nodeid.split("/")[-1] in SLOW_ELSEWHERE):
            item.add_marker(pytest.mark.slow)
