"""Flower's Deployment Runtime on localhost: SuperLink + 3 SuperNodes, `flwr run`, 2 rounds.

Opt-in (about 3 minutes per variant on 2 cores: each message starts a ClientApp process that loads
the model): FEDLEGEND_DEPLOY_TEST=1 python -m pytest tests/test_flower_deploy.py
"""

import json
import os

import pytest

from fedlegend.deploy import LocalFederation, free_port

pytestmark = pytest.mark.skipif(os.environ.get("FEDLEGEND_DEPLOY_TEST") != "1",
                                reason="slow: set FEDLEGEND_DEPLOY_TEST=1 to start a local Flower federation")

TINY = "[fleet]\ndevices = 3\n[run]\nrounds = 2\neval_every = 1\n[train]\nlocal_steps = 1\nbatch_size = 4\n" \
       "[data]\neval_subset = 32\n"


@pytest.mark.parametrize("tls", [False, True], ids=["insecure", "tls"])
def test_slow_deployed_federation_runs_two_rounds(tmp_path, tls):
    from fedlegend.certs import write_certs

    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TINY)
    out = tmp_path / "out"
    certs = tmp_path / "certs" if tls else None
    if certs:
        write_certs(certs)
    fed = LocalFederation(tmp_path, free_port(), certs)
    try:
        fed.start(devices=3)
        assert len(fed.pids) == 4 and all(p.poll() is None for p in fed.procs.values())
        res = fed.run(cfg, out, timeout=600)
        log = (tmp_path / "flwr-run.log").read_text(errors="replace")
        assert res.returncode == 0, log[-3000:]
    finally:
        fed.stop()
    assert all(p.poll() is not None for p in fed.procs.values())
    recs = [json.loads(l) for l in (out / "records.jsonl").read_text().splitlines()]
    assert [r["round"] for r in recs] == [1, 2]
    assert all(r["events"] == [] and len(r["devices"]) == 3 for r in recs)
    assert recs[-1]["accuracy"] is not None and recs[-1]["virtual_time_s"] > recs[0]["virtual_time_s"] > 0
    for f in ("summary.json", "accuracy_traffic.png", "adapter/adapter_model.safetensors"):
        assert (out / f).exists(), f
