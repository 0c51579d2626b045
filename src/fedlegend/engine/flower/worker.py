"""A long-lived ClientApp executor for a SuperNode started with `--isolation process`.

Flower 1.41's SuperNode, in its default `--isolation subprocess`, starts a SuperExec that
launches a fresh `flwr-clientapp` process for every message; that process imports torch,
transformers and peft and builds the experiment (base model, tokenized data) again each
time: about 12 s of a 2-core machine per message, before any training. With
`flower-supernode --isolation process`, the SuperNode launches nothing and waits for an
executor to claim its tasks over its Runtime API; this module is such an executor. It
claims CLIENT_APP tasks one at a time and runs each in its own process, with Flower's own
steps (pull the message, context and FAB; install the FAB; load the ClientApp named in
the FAB; call it; push the reply and the task's status), so imported modules and
fedlegend's per-process model holder (`engine.flower.client._DEVICE_SIDE`) outlive a message.

    python -m fedlegend.engine.flower.worker --runtime-api-address 127.0.0.1:9094 --insecure

It serves one SuperNode (the `--port` of that SuperNode's Runtime API). Its building blocks
are Flower 1.41 internals (flwr.supernode.runtime.run_clientapp), imported through flwr_compat.py.
A task that raises is answered with an error reply, as `flwr-clientapp` does; the worker
goes on with the next task.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import socket
import sys
import threading
import time
from logging import ERROR, INFO

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from flwr.app import Error, Message  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from .flwr_compat import (AcquireTaskRequest, ErrorCode, LoadClientAppError, RuntimeHttpClient,  # noqa: E402
                          RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor, SendTaskHeartbeatRequest,
                          SubStatus, TaskType, get_load_client_app_fn, install_from_fab, log,
                          make_simple_http_retry_invoker, pull_task_input, push_message, push_task_output,
                          validate_and_resolve_root_certificates)


def _client(address: str, insecure: bool, certificates: bytes | None, component: str,
            token: str | None = None) -> RuntimeHttpClient:
    interceptors = [RuntimeVersionHttpInterceptor(component_name=component)]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(server_address=address, insecure=insecure,
                                                 root_certificates=certificates, interceptors=interceptors,
                                                 retry_invoker=make_simple_http_retry_invoker())


class _Heartbeat:
    """Keeps a task alive on the SuperNode while it runs (flwr-clientapp's heartbeat, minus its SIGINT)."""

    def __init__(self, client: RuntimeHttpClient, every_s: float = 5.0) -> None:
        self._stop = threading.Event()

        def beat() -> None:
            while not self._stop.wait(every_s):
                try:
                    client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
                except Exception:  # pylint: disable=broad-exception-caught  # next beat retries
                    pass

        self._thread = threading.Thread(target=beat, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)


def run_task(address: str, insecure: bool, certificates: bytes | None, token: str) -> str:
    """One CLIENT_APP task, in this process: pull, run the ClientApp, push. Returns its sub-status."""
    client = _client(address, insecure, certificates, "flwr-clientapp", token)
    beat = _Heartbeat(client)
    message = context = reply = None
    status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    try:
        message, context, run, fab = pull_task_input(client)
        install_from_fab(fab.content, skip_prompt=True)
        load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
        app: ClientApp = load(run.fab_id, run.fab_version, fab.hash_str)  # cached module after the first task
        reply = app(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
    except Exception as ex:  # pylint: disable=broad-exception-caught  # answered as flwr-clientapp would
        log(ERROR, "ClientApp raised an exception", exc_info=ex)
        code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(ex, LoadClientAppError) \
            else ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        details = f"{type(ex)}:<'{ex}'>"
        if message is not None:
            reply = Message(Error(code=code, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        except Exception as ex:  # pylint: disable=broad-exception-caught
            log(ERROR, "Failed to push the reply", exc_info=ex)
            status, details = SubStatus.FAILED, f"push failed: {ex}"
        push_task_output(client=client, context=context, sub_status=status, details=details)
        beat.stop()
        client.close()
    return status


def _wait_for_listener(address: str, stop: threading.Event, every_s: float = 0.2) -> None:
    host, _, port = address.rpartition(":")
    while not stop.is_set():
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=1.0).close()
            return
        except OSError:
            stop.wait(every_s)


def serve(address: str, insecure: bool = True, certificates: bytes | None = None, poll_s: float = 0.2,
          stop: threading.Event | None = None) -> None:
    """Claim and run this SuperNode's CLIENT_APP tasks until `stop` is set (or the process is signalled)."""
    stop = stop or threading.Event()
    _wait_for_listener(address, stop)  # Flower's client would back off exponentially while the SuperNode starts
    client = _client(address, insecure, certificates, "SuperExec")
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
    log(INFO, "fedlegend worker: serving ClientApp tasks of the SuperNode at %s (pid %d)", address, os.getpid())
    tasks = 0
    try:
        while not stop.is_set():
            try:
                res = client.AcquireTask(request)
            except Exception as ex:  # pylint: disable=broad-exception-caught  # SuperNode not up yet / restarting
                log(INFO, "fedlegend worker: Runtime API not reachable (%s); retrying", type(ex).__name__)
                stop.wait(1.0)
                continue
            if res.HasField("task") and res.token:
                t0 = time.perf_counter()
                status = run_task(address, insecure, certificates, res.token)
                tasks += 1
                log(INFO, "fedlegend worker: task %d (%s) %s in %.2f s", res.task.task_id, res.task.type, status,
                    time.perf_counter() - t0)
            else:
                stop.wait(poll_s)
    finally:
        client.close()
        log(INFO, "fedlegend worker: stopped after %d tasks", tasks)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Long-lived ClientApp executor for `flower-supernode --isolation process`")
    p.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, HOST:PORT (its --port)")
    p.add_argument("--insecure", action="store_true", help="plain HTTP to the Runtime API (the SuperNode's default)")
    p.add_argument("--root-certificates", help="CA of the Runtime API's certificate, if it serves TLS")
    p.add_argument("--poll-s", type=float, default=0.2, help="seconds between polls when no task is waiting")
    p.add_argument("--preload", action="append", default=[], metavar="MODULE",
                   help="import MODULE before serving (e.g. fedlegend.engine.flower.app), so the first task starts warm")
    a = p.parse_args(argv)
    for module in a.preload:
        importlib.import_module(module)
    certificates = validate_and_resolve_root_certificates(a.root_certificates, a.insecure)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    serve(a.runtime_api_address, a.insecure, certificates, a.poll_s, stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
