"""A Flower federation on localhost: one SuperLink, one SuperNode per device, `flwr run`.

For trying the Deployment Runtime on one machine (scripts/flower-local.py, tests). Each
component runs in its own session, so stop() ends it and the processes it spawned
(SuperExec, ClientApp, ServerApp) by its process group, never by name.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

APP_DIR = Path(__file__).resolve().parents[2] / "deploy" / "flower-app"


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


@dataclass
class LocalFederation:
    workdir: Path
    port: int
    certs: Path | None = None
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.procs.items()}

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "wb")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=flwr_env(self.workdir),
                                cwd=self.workdir, start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def start(self, devices: int, timeout: float = 60.0) -> "LocalFederation":
        sl = self._start("superlink", ["flower-superlink", *tls_args(self.certs, True), "--port", str(self.port),
                                       "--disable-runtime-dependency-installation"])
        wait_for_port(self.port, timeout, sl)
        for dev in range(devices):
            node_port = free_port()
            sn = self._start(f"supernode{dev}", ["flower-supernode", *tls_args(self.certs, False),
                                                 "--superlink", f"127.0.0.1:{self.port}", "--port", str(node_port),
                                                 "--node-config", f"device-id={dev}"])
            wait_for_port(node_port, timeout, sn)
        write_flwr_config(self.workdir, self.port, self.certs)
        return self

    def run(self, config: Path, out: Path, timeout: float = 900.0, app_dir: Path = APP_DIR) -> subprocess.CompletedProcess:
        """`flwr run` of the fedlegend app with `config`, streaming its log into workdir/flwr-run.log."""
        run_config = f"config='{config}' out='{out}'"
        with open(self.workdir / "flwr-run.log", "wb") as log:
            return subprocess.run(["flwr", "run", str(app_dir), "local", "--run-config", run_config, "--stream"],
                                  stdout=log, stderr=subprocess.STDOUT, env=flwr_env(self.workdir),
                                  timeout=timeout, check=False)

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM each component's process group (SuperNodes first), then SIGKILL what is left."""
        for name in reversed(list(self.procs)):
            _signal_group(self.procs[name], signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in self.procs.values():
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
