"""Flower's Deployment Runtime on localhost: a SuperLink and 3 SuperNodes, `flwr run`, 2 rounds of LEGEND.

test_deployed_federation (default suite, about a minute on 2 idle cores): TLS, SuperNode
authentication (registered keys; an unregistered key is refused), measured status, a tiny
random BERT, so that what is measured is the federation, not the model. Each SuperNode trains on
its own file (one CSV, two JSONL; different sizes and label mixes, cut from the packaged Rotten
Tomatoes training split); the server evaluates on that dataset's test split and never sees a path.
Every component runs under a known PID and is stopped at the end, also when the test fails.

test_slow_deployed_secagg_matches_plain (slow, about 1.5 minutes): the same federation runs one tiny config
plain and under SecAgg+ (privacy.secure_aggregation); same plans, global adapters within 1e-4.

Opt-in (FEDLEGEND_DEPLOY_TEST=1): the same federation without TLS, on the real default model
and data with the fleet model's status and one SuperNode restarted between the rounds (the
device comes back under a new node id and keeps its estimates).

Opt-in (FEDLEGEND_SOAK_TEST=1, several minutes): bench/flower_soak.py's soak, SuperNodes killed
(SIGTERM or SIGKILL) and restarted at random (seeded) while 10 rounds run; every round completes,
restarted devices rejoin and train again with their workers unchanged, no arrived update is lost.
"""

import json
import os
import signal
import time

import pytest

from fedlegend.engine.flower.federation import LocalFederation, demo_partitions, free_port, write_device_files

WORDS = {1: "good great fine lovely superb moving clever charming".split(),
         0: "bad awful dull boring clumsy tedious weak messy".split()}


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    """A 4-layer random BERT (hidden 32) with MiniLM's tokenizer, and 400 two-class snippets."""
    import random

    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from fedlegend.assets import resolve_model

    root = tmp_path_factory.mktemp("tiny")
    model_dir = root / "tiny-bert"
    tok = AutoTokenizer.from_pretrained(resolve_model("minilm-l6").path)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rng = random.Random(0)
    rows = [{"text": "the film is " + " and ".join(rng.sample(WORDS[y], 3)), "label": y}
            for y in (0, 1) for _ in range(200)]
    rng.shuffle(rows)
    data = root / "snippets.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model_dir, data


def tiny_toml(model_dir, data) -> str:
    return (f'[model]\nname = "local"\npath = "{model_dir}"\n[data]\nname = "file"\npath = "{data}"\n'
            "test_size = 40\nmax_length = 16\n[fleet]\ndevices = 3\n[run]\nrounds = 2\neval_every = 1\n"
            "[train]\nlocal_steps = 2\nbatch_size = 4\nlr = 0.01\n")


def gone(pid: int) -> bool:
    """True when neither the process nor any process of its group (its children) is left."""
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


def read_records(out):
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


def lora_b_norms(out) -> list[float]:
    from safetensors.torch import load_file

    state = load_file(out / "adapter" / "adapter_model.safetensors")
    return [float(t.norm()) for k, t in state.items() if "lora_B" in k]


SIZES = (24, 36, 52)   # examples in each device's own file


def write_own_files(folder, sizes=SIZES):
    """Device i's file: the next sizes[i] examples of Rotten Tomatoes' training split (never its test split),
    labels by name; device 0 a CSV holding one label only, the others JSONL. Returns node data and histograms."""
    import pandas as pd

    from fedlegend.data import split_train_test
    from fedlegend.datasets import resolve_dataset

    ds = resolve_dataset("rotten-tomatoes")
    train, _ = split_train_test(ds, 40)
    only_rotten = [i for i in train if ds.labels[i] == 0]
    node_data, hists, start = {}, [], 0
    for dev, n in enumerate(sizes):
        idx = only_rotten[:n] if dev == 0 else train[len(only_rotten) + start:len(only_rotten) + start + n]
        start += n
        rows = pd.DataFrame({"text": [ds.texts[i] for i in idx], "label": [ds.label_names[ds.labels[i]] for i in idx]})
        path = folder / (f"device-{dev}.csv" if dev == 0 else f"device-{dev}.jsonl")
        rows.to_csv(path, index=False) if dev == 0 else rows.to_json(path, orient="records", lines=True)
        node_data[dev] = {"data-file": str(path)}
        hists.append([int((rows["label"] == name).sum()) for name in ds.label_names])
    return node_data, hists


def test_deployed_federation(tmp_path, tiny_assets):
    """TLS + SuperNode auth + measured status, each device on its own file: the run completes on the devices'
    reported sample counts (their local steps follow them), plans differ per device, the adapter changes."""
    from fedlegend.engine.flower.certs import write_certs

    t0 = time.perf_counter()
    cfg = tmp_path / "tiny.toml"
    # the server's data: the packaged dataset, whose test split is its test set (no device file is named here)
    cfg.write_text(tiny_toml(*tiny_assets).replace('name = "file"\npath', 'name = "rotten-tomatoes"\n# path')
                   .replace("local_steps = 2", "local_steps = 0\nlocal_epochs = 0.5"))
    (tmp_path / "own").mkdir()
    node_data, hists = write_own_files(tmp_path / "own")
    out = tmp_path / "out"
    certs = tmp_path / "certs"
    write_certs(certs, supernodes=4)  # supernode-3 stays unregistered
    fed = LocalFederation(tmp_path, free_port(), certs, auth=True, node_data=node_data)
    pids: dict[str, int] = {}
    try:
        fed.start(devices=3)
        pids = dict(fed.pids)
        assert set(pids) == {"superlink", *(f"{k}{i}" for k in ("supernode", "worker") for i in range(3))}
        assert all(p.poll() is None for p in fed.procs.values()) and sorted(fed.node_ids) == [0, 1, 2]
        t_up = time.perf_counter()
        res = fed.run(cfg, out, timeout=300, status="measured")
        t_run = time.perf_counter()
        assert res.returncode == 0, (tmp_path / "flwr-run.log").read_text(errors="replace")[-3000:]
        # a SuperNode whose key was never registered is turned away
        intruder = fed._start("intruder", ["flower-supernode", "--root-certificates", str(certs / "ca.crt"),
                                           "--auth-supernode-private-key", str(certs / "supernode-3.key"),
                                           "--superlink", f"127.0.0.1:{fed.port}", "--port", str(free_port()),
                                           "--isolation", "process", "--node-config", "device-id=0",
                                           "--max-retries", "0"])
        pids["intruder"] = intruder.pid
        assert intruder.wait(timeout=60) != 0
        assert "Failed to initialize the connection" in (tmp_path / "intruder.log").read_text(errors="replace")
    finally:
        fed.stop()
    assert pids and all(gone(pid) for pid in pids.values()), {n: p for n, p in pids.items() if not gone(p)}
    recs = read_records(out)
    assert [r["round"] for r in recs] == [1, 2]
    assert all(r["events"] == [] and sorted(d["id"] for d in r["devices"]) == [0, 1, 2] for r in recs)
    parts = json.loads((out / "partitions.json").read_text())     # what the devices reported, nothing else
    assert parts["sizes"] == list(SIZES) and parts["label_histograms"] == hists and hists[0][1] == 0
    steps = [-(-n // 8) for n in SIZES]                              # half an epoch of batches of 4
    assert all({d["id"]: d["samples"] for d in r["devices"]} == {i: 4 * s for i, s in enumerate(steps)} for r in recs)
    assert str(tmp_path / "own") not in (tmp_path / "superlink.log").read_text(errors="replace")
    plans = {d["id"]: (tuple(d["layers"]), tuple(d["ranks"])) for d in recs[1]["devices"]}
    assert len(set(plans.values())) > 1, plans                       # LEGEND planned each device its own way
    rows = [d for r in recs for d in r["devices"]]
    assert all(d["compute_s"] > 0 and d["comm_s"] > 0 for d in rows)  # measured: forward/backward and transfers
    assert recs[-1]["accuracy"] is not None and recs[-1]["virtual_time_s"] > recs[0]["virtual_time_s"] > 0
    assert max(lora_b_norms(out)) > 0                                 # LoRA B starts at zero: the adapter moved
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "legend" and (out / "accuracy_traffic.png").exists()
    for i in range(3):  # one long-lived worker per SuperNode ran its query and both rounds
        assert (tmp_path / f"worker{i}.log").read_text(errors="replace").count("completed in") == 3
    print(f"\nfederation up {t_up - t0:.1f} s, flwr run {t_run - t_up:.1f} s, total {time.perf_counter() - t0:.1f} s")


def adapter_tensors(out) -> dict:
    from safetensors.torch import load_file

    return {f"{f.name}:{k}": t for f in sorted((out / "adapter").glob("*.safetensors")) for k, t in load_file(f).items()}


@pytest.mark.slow
def test_slow_deployed_secagg_matches_plain(tmp_path, tiny_assets):
    """The same TLS + authenticated 3-SuperNode federation, one tiny config run twice (fleet status, so plans
    are deterministic): plain, then under SecAgg+ (privacy.secure_aggregation: secaggplus_mod on the ClientApp
    the SuperNodes' workers run, SecAggPlusWorkflow on the deployed ServerApp). Same plans, the secagg record,
    and the global adapter within the in-process test's tolerance."""
    from fedlegend.engine.flower.certs import write_certs
    from fedlegend.engine.flower.secagg import error_bound

    t0 = time.perf_counter()
    plain_cfg, secure_cfg = tmp_path / "plain.toml", tmp_path / "secure.toml"
    toml = tiny_toml(*tiny_assets).replace('name = "file"\npath', 'name = "rotten-tomatoes"\n# path')
    plain_cfg.write_text(toml)
    secure_cfg.write_text(toml + "[privacy]\nsecure_aggregation = true\n")
    (tmp_path / "own").mkdir()
    node_data, _ = write_own_files(tmp_path / "own")
    certs = tmp_path / "certs"
    write_certs(certs, supernodes=3)
    fed = LocalFederation(tmp_path, free_port(), certs, auth=True, node_data=node_data)
    pids: dict[str, int] = {}
    outs = {"plain": tmp_path / "plain", "secure": tmp_path / "secure"}
    try:
        fed.start(devices=3)
        pids = dict(fed.pids)
        for name, cfg in (("plain", plain_cfg), ("secure", secure_cfg)):
            res = fed.run(cfg, outs[name], timeout=300, status="fleet")
            assert res.returncode == 0, (name, (tmp_path / "flwr-run.log").read_text(errors="replace")[-3000:])
    finally:
        fed.stop()
    assert pids and all(gone(pid) for pid in pids.values())
    plain, secure = read_records(outs["plain"]), read_records(outs["secure"])
    assert [r["round"] for r in plain] == [r["round"] for r in secure] == [1, 2]
    for p, s in zip(plain, secure):
        assert s["events"] == [] and sorted(d["id"] for d in s["devices"]) == [0, 1, 2]
        assert [(d["id"], d["layers"], d["ranks"]) for d in s["devices"]] == \
               [(d["id"], d["layers"], d["ranks"]) for d in p["devices"]]
        assert "secagg" not in p and s["secagg"]["masked_bytes_up"] > s["secagg"]["plain_bytes_up"] == p["bytes_up"]
        assert s["secagg"]["devices"] == 3 and s["secagg"]["max_error"] == error_bound(3, 8.0)   # secagg_range 8
    a, b = adapter_tensors(outs["plain"]), adapter_tensors(outs["secure"])
    assert a and set(a) == set(b)
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert worst < 1e-4, worst
    assert max(lora_b_norms(outs["secure"])) > 0
    for i in range(3):  # each SuperNode's worker: query + 2 rounds plain, then query + 2 rounds x 4 SecAgg+ stages
        assert (tmp_path / f"worker{i}.log").read_text(errors="replace").count("completed in") == 3 + 1 + 2 * 4
    print(f"\nplain vs secagg on the deployed federation: max |diff| {worst:.2e}, "
          f"total {time.perf_counter() - t0:.1f} s")


@pytest.mark.skipif(os.environ.get("FEDLEGEND_DEPLOY_TEST") != "1",
                    reason="slow (about 2 minutes): set FEDLEGEND_DEPLOY_TEST=1")
def test_slow_deployed_federation_restart(tmp_path):
    """Insecure, default model and data, fleet status; SuperNode 1 restarts after round 1."""
    cfg = tmp_path / "tiny.toml"
    cfg.write_text("[fleet]\ndevices = 3\n[run]\nrounds = 3\neval_every = 1\n[train]\nlocal_steps = 1\n"
                   "batch_size = 4\n[data]\neval_subset = 32\n")
    out = tmp_path / "out"
    fed = LocalFederation(tmp_path, free_port(), node_data=demo_partitions("rotten-tomatoes", 3, seed=0))
    pids: dict[str, int] = {}
    try:
        fed.start(devices=3)
        pids = dict(fed.pids)
        import subprocess
        import threading

        result = {}
        runner = threading.Thread(target=lambda: result.update(res=fed.run(cfg, out, timeout=600, status="fleet")))
        runner.start()
        deadline = time.monotonic() + 400
        while not ((out / "records.jsonl").exists() and read_records(out)) and time.monotonic() < deadline:
            time.sleep(0.5)
        fed.stop_node(1)            # graceful: the SuperNode deactivates itself on the SuperLink
        fed.start_node(1)           # the server waits (rejoin-wait-s, 30 s by default) for device 1 between rounds
        pids.update(fed.pids)
        runner.join(timeout=600)
        res: subprocess.CompletedProcess = result["res"]
        assert res.returncode == 0, (tmp_path / "flwr-run.log").read_text(errors="replace")[-3000:]
    finally:
        fed.stop()
    assert all(gone(pid) for pid in pids.values())
    recs = read_records(out)
    assert [r["round"] for r in recs] == [1, 2, 3]
    kinds = [(e["kind"], e["device"]) for r in recs for e in r["events"]]
    assert ("node-left", 1) in kinds and ("rejoined", 1) in kinds, kinds
    assert sorted(d["id"] for d in recs[-1]["devices"]) == [0, 1, 2]   # device 1 trains again after its restart
    assert max(lora_b_norms(out)) > 0


@pytest.mark.skipif(os.environ.get("FEDLEGEND_SOAK_TEST") != "1",
                    reason="slow (about 10-15 minutes): set FEDLEGEND_SOAK_TEST=1")
def test_slow_soak_supernodes_killed_and_restarted(tmp_path, tiny_assets):
    """10 rounds on the tiny model (many local steps, so that rounds last long enough for restarts to overlap
    them) while SuperNodes are killed and restarted at random: bench/flower_soak.py's run_soak."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("flower_soak", Path(__file__).resolve().parents[1] / "bench" /
                                                  "flower_soak.py")
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    toml = tiny_toml(*tiny_assets).replace("rounds = 2", "rounds = 10").replace("local_steps = 2", "local_steps = 400")
    fig = soak.run_soak(tmp_path, toml, devices=3, rounds=10, seed=1, gap_s=(10.0, 25.0), kill_p=0.3,
                        max_restarts=6, round_timeout_s=90.0, rejoin_wait_s=45.0, timeout_s=900.0)
    print(json.dumps({k: v for k, v in fig.items() if k not in ("accepted_per_round",)}, indent=1))
    assert fig["flwr_run_rc"] == 0 and fig["rounds_completed"] == 10, fig
    assert fig["restarts"] >= 2 and fig["restarts_survived"] == fig["restarts"], fig["restart_log"]
    assert all(fig["workers_alive_same_pid"].values())          # each worker outlived its SuperNode's restarts
    assert fig["updates_lost"] == 0 and fig["updates_arrived"] <= fig["updates_accepted"], fig["lost"]
    assert all(r["rejoined_in_round"] is not None for r in fig["restart_log"])   # a 'rejoined' event after each


def test_gone_sees_process_groups():
    import subprocess

    proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
    assert not gone(proc.pid)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait()
    assert gone(proc.pid)


def test_refresh_waits_for_a_device_whose_node_left_once_per_absence(monkeypatch):
    """The restart race: between rounds the server waits (bounded) until a restarted node is back and named
    its device, so the device is in the next round; a device gone for good is waited for once, not every round."""
    from fedlegend.engine.flower import strategy as st
    from fedlegend.engine.flower.roster import Roster

    clock = [0.0]
    monkeypatch.setattr(st.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(st.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))

    class Grid:
        def __init__(self):
            self.schedule = []   # (from time, node ids)

        def get_node_ids(self):
            return next(nodes for t, nodes in reversed(self.schedule) if clock[0] >= t)

    s = st.MethodStrategy.__new__(st.MethodStrategy)
    s.roster, s._pending_events, s.rejoin_wait_s = Roster(), [], 30.0
    plays = {10: 0, 11: 1, 12: 2, 21: 1, 22: 2}   # node -> device (21, 22: restarted nodes of devices 1, 2)

    def query(grid, nodes):   # every node names its device at once (MethodStrategy._query asks over the grid)
        events = []
        for n in nodes:
            s.roster._assign(n, plays[n], events)
        return events

    s._query = query
    grid = Grid()
    grid.schedule = [(0.0, [10, 11, 12])]
    s.refresh(grid)
    assert s.roster.node_device == {10: 0, 11: 1, 12: 2} and clock[0] == 0.0
    grid.schedule = [(0.0, [10, 12]), (7.0, [10, 12, 21])]     # node 11 left; its device comes back at t = 7 s
    s.refresh(grid)
    assert s.roster.node_of(1) == 21 and 7.0 <= clock[0] < 8.0     # waited until it was back, no longer
    assert any(e["kind"] == "rejoined" and e["device"] == 1 for e in s._pending_events)
    t = clock[0]
    grid.schedule = [(0.0, [10, 21])]                            # node 12 left for good
    s.refresh(grid)
    assert s.roster.node_of(2) is None and clock[0] - t == pytest.approx(30.0, abs=0.6)   # one bounded wait
    t = clock[0]
    s.refresh(grid)
    assert clock[0] == t                                          # ... and not again in the next rounds
    grid.schedule = [(0.0, [10, 21, 22])]                         # it does come back later: taken in at once
    s.refresh(grid)
    assert s.roster.node_of(2) == 22 and clock[0] == t
    s.rejoin_wait_s = 0.0                                         # 0: never waits
    grid.schedule = [(0.0, [10, 22])]
    s.refresh(grid)
    assert clock[0] == t and s.roster.node_of(1) is None
