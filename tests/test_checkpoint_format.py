"""The checkpoint format (checkpoint.py): nested method state <-> JSON + safetensors, exactly, without
pickle; corrupt, truncated and foreign checkpoints give one clear line and run no code."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlegend import checkpoint as ck
from fedlegend import rundir
from fedlegend.checkpoint import CheckpointError, EncodeError, decode, encode
from fedlegend.engine.local import Snapshot
from fedlegend.methods.base import Estimate, LoraPlan, StatusReport


def same(a, b) -> bool:
    """Exact equality of trees: types (tuple vs list, set vs frozenset, numpy dtypes), NaN == NaN,
    -0.0 != 0.0, tensors by dtype, shape and bits, dict key order."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return (a.dtype == b.dtype and a.shape == b.shape and a.requires_grad == b.requires_grad
                and torch.equal(a.detach().contiguous().reshape(-1).view(torch.uint8) if a.numel() else a.detach(),
                                b.detach().contiguous().reshape(-1).view(torch.uint8) if b.numel() else b.detach()))
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, np.generic):
        return a.dtype == b.dtype and same(a.item(), b.item())
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (set, frozenset)):
        return a == b
    if hasattr(a, "__dataclass_fields__"):
        return all(same(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    return a == b


def round_trip(tree, tmp: Path | None = None):
    body, tensors = encode(tree)
    body = json.loads(json.dumps(body, allow_nan=False))       # strict JSON in between
    if tmp is None:
        from safetensors.torch import load, save
        tensors = load(save(tensors))
        return decode(body, tensors)
    ck.write(tmp, {}, tree, 1)
    return ck.read_tree(tmp, ck.read_manifest(tmp, 1))


# ------------------------------------------------------------------ random trees
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int8,
          torch.uint8, torch.bool]


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
    n = math.prod(shape)
    raw = draw(st.binary(min_size=n * torch.empty(0, dtype=dtype).element_size(),
                         max_size=n * torch.empty(0, dtype=dtype).element_size()))
    t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape) if n else torch.empty(shape, dtype=dtype)
    return t.clone()


floats = st.floats(allow_nan=True, allow_infinity=True)
np_scalars = st.one_of(floats.map(np.float64), st.floats(width=32).map(np.float32), st.integers(-2**63, 2**63 - 1).map(np.int64),
                       st.integers(0, 255).map(np.uint8), st.booleans().map(np.bool_))
hashables = st.one_of(st.integers(), st.text(max_size=5), st.booleans(), st.none())
scalars = st.one_of(st.none(), st.booleans(), st.integers(), floats, st.text(max_size=8), np_scalars)
keys = st.one_of(st.integers(-5, 1000), st.text(max_size=6), st.sampled_from(["$tensor", "$dict", "$", "__metadata__"]))


def dataclasses_of(children):
    return st.one_of(
        st.builds(Estimate, floats, floats, floats),
        st.builds(LoraPlan, st.integers(0, 9), st.dictionaries(st.integers(0, 11), st.integers(1, 16), max_size=4),
                  st.lists(st.sampled_from(["lora_A", "residual"]), max_size=2).map(tuple)),
        st.builds(StatusReport, st.integers(0, 9), floats, floats, floats, st.integers(0, 100)),
    )


trees = st.recursive(
    st.one_of(scalars, tensors()),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.sets(hashables, max_size=4),
        st.frozensets(st.integers(), max_size=4),
        st.dictionaries(keys, children, max_size=4),
        dataclasses_of(children),
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees)
def test_random_trees_round_trip_exactly(tree):
    assert same(round_trip(tree), tree)


def test_shared_tensor_stays_shared_and_files_round_trip(tmp_path):
    t = torch.arange(6.0)
    tree = {"a": t, "b": [t, t[2:4]], 3: {"x": (1, 2.5, None)}, "s": {1, 2}, "e": {0: Estimate(1.0, 2.0, 3.0)}}
    back = round_trip(tree, tmp_path / "c")
    assert same(back, tree) and back["a"] is back["b"][0] and back["b"][1] is not back["a"]
    assert [p.name for p in sorted((tmp_path / "c").iterdir())][0] == "checkpoint.json"


@pytest.mark.parametrize("bad, where", [
    (object(), "the root"), ({"a": [1, {2: object()}]}, "a[1][2]"), ({(1, 2): 3}, "dict key (1, 2)"),
    ({True: 1}, "dict key True"), ({"z": 1 + 2j}, "z: a builtins.complex"), ({"p": Path("x")}, "p: a pathlib"),
    ({"n": np.zeros(3)}, "n: a numpy.ndarray"), ({"c": torch.zeros(2, dtype=torch.complex64)}, "c: a torch.complex64"),
    ({"m": torch.nn.Parameter(torch.zeros(1))}, "m: a Parameter"),
])
def test_refuses_what_it_cannot_hold(bad, where):
    with pytest.raises(EncodeError, match=re.escape(where)):
        encode(bad)


@pytest.mark.parametrize("body, why", [
    ({"$tensor": "nope"}, "missing from the tensor file"), ({"$what": 1}, "unknown tag"),
    ({"$dataclass": "os:system", "fields": {}}, "not fedlegend's own"),
    ({"$dataclass": "fedlegend.rundir:run_experiment", "fields": {}}, "not a dataclass"),
    ({"$dataclass": "fedlegend.methods.base:Estimate", "fields": {"mu": 1.0}}, "fields of"),
    ({"$np": "O", "v": 1}, "numpy"), ({"$tuple": 3}, "holds no list"), ({"$dict": [[1.5, 2]]}, "bad $dict entry"),
    ({"$tensor": "t", "junk": 1}, "unexpected keys"),
])
def test_decode_refuses_what_encode_never_writes(body, why):
    with pytest.raises(CheckpointError, match=re.escape(why)):
        decode({"x": body}, {"t": torch.zeros(1)})


# ------------------------------------------------------------------ every method's state after two rounds
@pytest.mark.slow   # a real 2-round run per registered method
def test_every_method_state_round_trips(tiny_cfg, run_round, tmp_path):
    from fedlegend.experiment import build_experiment
    from fedlegend.methods import METHODS

    for name in sorted(METHODS):
        exp = build_experiment(tiny_cfg(**{"method.name": name, "method.fedadapter.trial_rounds": 2}))
        state, est = exp.initial_state, __import__("fedlegend.methods.base", fromlist=["Estimator"]).Estimator()
        for h in (1, 2):
            state = run_round(exp, h, state, est).state
        tree = {"method": exp.method.state_dict(), "state": state, "estimates": est.estimates}
        back = round_trip(tree, tmp_path / name)
        assert same(back, tree), name
        exp.method.load_state_dict(back["method"])           # the method takes it back


# ------------------------------------------------------------------ the run folder's checkpoint
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint folder of a tiny legend config (no training: a hand-made snapshot)."""
    from fedlegend.config import build_config

    cfg = build_config({}, {"fleet.devices": 2, "run.rounds": 3})
    snap = Snapshot(1, 12.5, {"m.lora_A": torch.randn(2, 4)}, {0: Estimate(1.0, 0.1, 0.01)},
                    {"ranks": {0: 8, 1: 8}, "seen": {1, 2}}, [{"round": 1, "accuracy": None, "devices": []}])
    d = tmp_path_factory.mktemp("ck") / rundir.CHECKPOINT
    rundir.save_checkpoint(d, cfg, snap, 3.0)
    return cfg, snap, d


def test_checkpoint_folder_round_trips(saved, tmp_path):
    cfg, snap, d = saved
    back, wall = rundir.load_checkpoint(d, cfg)
    assert wall == 3.0 and same(vars(back), vars(snap))
    rundir.save_checkpoint(d.parent / "again", cfg, back, 4.0)                 # a second save replaces the first
    rundir.save_checkpoint(d.parent / "again", cfg, back, 5.0)
    assert len(list((d.parent / "again").glob("tensors-*"))) == 1 and len(list((d.parent / "again").iterdir())) == 2


def copy_of(d: Path, tmp_path: Path) -> Path:
    import shutil
    return Path(shutil.copytree(d, tmp_path / rundir.CHECKPOINT))


def edit_manifest(d: Path, fn) -> None:
    m = json.loads((d / "checkpoint.json").read_text())
    fn(m)
    (d / "checkpoint.json").write_text(json.dumps(m))


@pytest.mark.parametrize("damage, why", [
    (lambda d: (d / "checkpoint.json").write_text('{"kind": "fedlegend-checkpoint", "vers'), "checkpoint.json: not a readable"),
    (lambda d: next(d.glob("tensors-*")).write_bytes(next(d.glob("tensors-*")).read_bytes()[:-9]), "sha256"),
    (lambda d: next(d.glob("tensors-*")).unlink(), "tensor file cannot be read"),
    (lambda d: edit_manifest(d, lambda m: m.update(version=2)), "checkpoint format 2, this fedlegend reads 3"),
    (lambda d: edit_manifest(d, lambda m: m.update(kind="other")), "not a fedlegend checkpoint"),
    (lambda d: edit_manifest(d, lambda m: m.update(tensors="../../etc.safetensors")), "bad tensor file name"),
    (lambda d: edit_manifest(d, lambda m: m["tree"]["snapshot"]["state"].update({"x": {"$tensor": "gone"}})),
     "'gone' is missing"),
    (lambda d: edit_manifest(d, lambda m: m["tree"]["snapshot"].pop("clock")), "no round-loop snapshot"),
])
def test_bad_checkpoint_one_clear_line(saved, tmp_path, damage, why):
    cfg, _, d = saved
    d = copy_of(d, tmp_path)
    damage(d)
    with pytest.raises(CheckpointError) as err:
        rundir.load_checkpoint(d, cfg)
    msg = str(err.value)
    assert why in msg and "\n" not in msg and str(d) in msg and rundir.FRESH_FLAG in msg


def test_other_config_none_and_legacy_pickle_never_loaded(saved, tmp_path, monkeypatch):
    cfg, _, d = saved
    other = cfg.model_copy(deep=True)
    other.train.lr = cfg.train.lr / 2
    assert rundir.load_checkpoint(d, other) is None                   # another run: start afresh
    assert rundir.load_checkpoint(tmp_path / rundir.CHECKPOINT, cfg) is None   # none at all
    (tmp_path / "checkpoint.pt").write_bytes(b"\x80\x04 not really a pickle")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt: a pickle checkpoint .* --fresh-on-bad-checkpoint"):
        rundir.load_checkpoint(tmp_path / rundir.CHECKPOINT, cfg)
