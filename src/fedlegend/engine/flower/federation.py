"""A Flower federation on localhost: one SuperLink, one SuperNode per device, `flwr run`.

For trying the Deployment Runtime on one machine (scripts/flower-local.py, tests). Each
component runs in its own session, so stop() ends it and the processes it spawned
(SuperExec, ClientApp, ServerApp) by its process group, never by name.

isolation="process" (the default here): each SuperNode runs `--isolation process` next to
one long-lived fedlegend worker (worker.py) that runs its ClientApp tasks,
so the model is loaded once per device, not once per message. isolation="subprocess":
Flower's default, a fresh `flwr-clientapp` process per message.

Each SuperNode names its own data in its node config (`node_data`, device -> keys of
device_data.py: data-file, or dataset + partition + num-partitions for a demo partition);
`demo_partitions` and `write_device_files` make them for a localhost run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# this file is <repo>/src/fedlegend/engine/flower/federation.py
APP_DIR = Path(__file__).resolve().parents[4] / "deploy" / "flower-app"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with code {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def flwr_env(workdir: Path) -> dict[str, str]:
    """Flower's config home inside workdir (not ~/.flwr), offline and without telemetry."""
    return {**os.environ, "FLWR_HOME": str(workdir / "flwr-home"), "FLWR_TELEMETRY_ENABLED": "0",
            "HF_HUB_OFFLINE": "1"}


def tls_args(certs: Path | None, server: bool) -> list[str]:
    if certs is None:
        return ["--insecure"]
    if server:
        return ["--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.pem"),
                "--ssl-keyfile", str(certs / "server.key")]
    return ["--root-certificates", str(certs / "ca.crt")]


def write_flwr_config(workdir: Path, port: int, certs: Path | None) -> Path:
    """The Flower Configuration `flwr run` reads: one SuperLink connection named 'local'."""
    home = workdir / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    security = "insecure = true" if certs is None else f'root-certificates = "{certs / "ca.crt"}"'
    path = home / "config.toml"
    path.write_text(f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{port}"\n{security}\n')
    return path


ISOLATIONS = ("process", "subprocess")


def node_config_arg(dev: int, data: dict | None = None) -> str:
    """`--node-config` of device `dev`'s SuperNode: its device id and the keys naming its data."""
    values = {"device-id": dev, **(data or {})}
    # TOML values: strings quoted (JSON's escapes are TOML's), integers bare
    return " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else int(v)}" for k, v in values.items())


def demo_partitions(dataset: str, devices: int, seed: int = 0) -> dict[int, dict]:
    """Node data for a localhost demo: device i plays seeded partition i of registered `dataset`'s training split."""
    return {d: {"dataset": dataset, "partition": d, "num-partitions": devices, "partition-seed": seed}
            for d in range(devices)}


def write_device_files(config: Path, devices: int, folder: Path) -> dict[int, dict]:
    """Node data for a localhost run from `config`'s own data: its training split's seeded partitions (as a
    simulation cuts them), written as one JSONL file per device (folder/device-I.jsonl); the server keeps
    the test split. Labels are written by name, so each file maps onto the server's labels."""
    from ...config import load_config
    from ...data import split_train_test
    from ...datasets import resolve_dataset
    from ...experiment import Encoded, device_partitions

    import numpy as np

    cfg = load_config(config)
    ds = resolve_dataset(cfg.data.name, cfg.data.path, cfg.data.text_column, cfg.data.label_column)
    train_idx, _ = split_train_test(ds, cfg.data.test_size)
    labels = np.asarray([ds.labels[i] for i in train_idx], dtype=np.int64)
    parts = device_partitions(cfg, Encoded([[]] * len(labels), labels), devices)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for d, part in enumerate(parts):
        path = folder / f"device-{d}.jsonl"
        rows = ({"text": ds.texts[train_idx[i]], "label": ds.label_names[ds.labels[train_idx[i]]]} for i in part)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out[d] = {"data-file": str(path.resolve())}
    return out


@dataclass
class LocalFederation:
    workdir: Path
    port: int
    certs: Path | None = None
    isolation: str = "process"
    auth: bool = False          # SuperNode authentication: keys supernode-I.key/.pub in `certs`
    threads_per_worker: int = 1
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    node_ports: dict[int, int] = field(default_factory=dict)
    node_ids: dict[int, int] = field(default_factory=dict)  # device -> node id the SuperLink registered (auth)
    node_data: dict[int, dict] = field(default_factory=dict)  # device -> its node config's data keys

    def __post_init__(self) -> None:
        if self.isolation not in ISOLATIONS:
            raise ValueError(f"isolation must be one of {ISOLATIONS}, not {self.isolation!r}")
        if self.auth and self.certs is None:
            raise ValueError("SuperNode authentication needs TLS: give the `fedlegend certs` folder")

    @property
    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.procs.items()}

    def _start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "ab")  # appended: a restarted node keeps its earlier log
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**flwr_env(self.workdir), **(env or {})},
                                cwd=self.workdir, start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def start(self, devices: int, timeout: float = 60.0) -> "LocalFederation":
        """The SuperLink, then all SuperNodes at once; returns when every one listens.

        Workers (process isolation) start first: they import the ClientApp while the SuperLink
        comes up and the keys are registered, and connect once their SuperNode listens."""
        auth = ["--enable-supernode-auth"] if self.auth else []
        sl = self._start("superlink", ["flower-superlink", *tls_args(self.certs, True), *auth, "--port", str(self.port),
                                       "--disable-runtime-dependency-installation"])
        write_flwr_config(self.workdir, self.port, self.certs)
        for dev in range(devices):
            self.start_worker(dev)
        wait_for_port(self.port, timeout, sl)
        if self.auth:
            self.register(range(devices), timeout)
        for dev in range(devices):
            self.start_node(dev, timeout, wait=False, worker=False)
        for dev in range(devices):
            wait_for_port(self.node_ports[dev], timeout, self.procs[f"supernode{dev}"])
        return self

    def register(self, devices, timeout: float = 60.0) -> dict[int, int]:
        """Register supernode-I.pub for each device I on the SuperLink (SuperNode authentication).

        What `flwr supernode register DIR/supernode-I.pub local` does, over the same Control API
        client, in this process: one Flower CLI start-up instead of one per key."""
        from .certs import supernode_key_paths
        from .flwr_compat import (RegisterNodeRequest, SuperLinkConnection, init_http_client_from_connection,
                                  try_load_public_key)

        conn = SuperLinkConnection("local", f"127.0.0.1:{self.port}", str(self.certs / "ca.crt"))
        with _env(FLWR_HOME=str(self.workdir / "flwr-home"), FLWR_TELEMETRY_ENABLED="0"):
            client = init_http_client_from_connection(conn)
            try:
                for dev in devices:
                    key = try_load_public_key(supernode_key_paths(self.certs, dev)[1])
                    res = client.RegisterNode(RegisterNodeRequest(public_key=key, name=f"device-{dev}"))
                    if not res.node_id:
                        raise RuntimeError(f"the SuperLink did not register SuperNode {dev}'s key")
                    self.node_ids[dev] = int(res.node_id)
            finally:
                client.close()
        return self.node_ids

    def start_node(self, dev: int, timeout: float = 60.0, wait: bool = True, worker: bool = True) -> None:
        """SuperNode `device-id=dev` (and its worker in process isolation); again after stop_node(dev)."""
        node_port = self.node_ports.setdefault(dev, free_port())
        sn = self._start(f"supernode{dev}", ["flower-supernode", *tls_args(self.certs, False),
                                             *self.auth_args(dev), "--superlink", f"127.0.0.1:{self.port}",
                                             "--port", str(node_port), "--isolation", self.isolation,
                                             "--node-config", node_config_arg(dev, self.node_data.get(dev))])
        if worker:
            self.start_worker(dev)
        if wait:
            wait_for_port(node_port, timeout, sn)

    def start_worker(self, dev: int) -> None:
        """In process isolation, the long-lived ClientApp worker of device `dev`'s SuperNode; it
        imports the ClientApp at once and serves the SuperNode as soon as it listens. One torch
        thread each: the devices share this machine's cores."""
        if self.isolation != "process":
            return
        node_port = self.node_ports.setdefault(dev, free_port())
        data = self.node_data.get(dev) or {}
        check = ["--check-data", data["data-file"]] if "data-file" in data else []
        check += [arg for key in ("text-column", "label-column") if key in data for arg in (f"--{key}", data[key])]
        self._start(f"worker{dev}", [sys.executable, "-m", "fedlegend.engine.flower.worker",
                                     "--runtime-api-address", f"127.0.0.1:{node_port}", "--insecure",
                                     "--preload", "fedlegend.engine.flower.app", *check],
                    {"OMP_NUM_THREADS": str(self.threads_per_worker)})

    def auth_args(self, dev: int) -> list[str]:
        from .certs import supernode_key_paths

        return ["--auth-supernode-private-key", str(supernode_key_paths(self.certs, dev)[0])] if self.auth else []

    def stop_node(self, dev: int, grace_s: float = 10.0) -> None:
        """Stop device `dev`'s SuperNode and worker (a device leaving the federation)."""
        for name in (f"worker{dev}", f"supernode{dev}"):
            if name in self.procs:
                _stop([self.procs.pop(name)], grace_s)

    def kill_supernode(self, dev: int, sig: int = signal.SIGTERM, grace_s: float = 10.0) -> None:
        """Stop only device `dev`'s SuperNode (its worker keeps running and reconnects once the
        SuperNode is started again with start_node(dev, worker=False)). SIGTERM: the SuperNode
        leaves gracefully; SIGKILL: a crash, noticed by the SuperLink only when heartbeats stop."""
        proc = self.procs.pop(f"supernode{dev}", None)
        if proc is None:
            return
        _signal_group(proc, sig)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait(timeout=5)

    def run_args(self, config: Path, out: Path, status: str = "measured", app_dir: Path = APP_DIR,
                 extra: dict[str, float | int | str] | None = None) -> list[str]:
        """The `flwr run` command line of the fedlegend app with `config` on this federation;
        `extra`: more run config keys (e.g. {"round-timeout-s": 90, "rejoin-wait-s": 30})."""
        run_config = f"config='{config}' out='{out}' status='{status}'"
        for key, value in (extra or {}).items():
            run_config += f" {key}={value!r}" if isinstance(value, str) else f" {key}={value}"
        return ["flwr", "run", str(app_dir), "local", "--run-config", run_config, "--stream"]

    def run(self, config: Path, out: Path, timeout: float = 900.0, app_dir: Path = APP_DIR,
            status: str = "measured", extra: dict[str, float | int | str] | None = None) -> subprocess.CompletedProcess:
        """`flwr run` of the fedlegend app with `config`, streaming its log into workdir/flwr-run.log."""
        with open(self.workdir / "flwr-run.log", "wb") as log:
            return subprocess.run(self.run_args(config, out, status, app_dir, extra), stdout=log,
                                  stderr=subprocess.STDOUT, env=flwr_env(self.workdir), timeout=timeout, check=False)

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM each component's process group (SuperNodes first), then SIGKILL what is left."""
        _stop(list(reversed(self.procs.values())), grace_s)


@contextlib.contextmanager
def _env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _stop(procs: list[subprocess.Popen], grace_s: float) -> None:
    for proc in procs:
        _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait(timeout=5)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the group we created with start_new_session: this component only
    except ProcessLookupError:
        pass
