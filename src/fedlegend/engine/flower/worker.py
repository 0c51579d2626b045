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

Faults (the worker outlives each of them and goes on with the next task; each is logged with
its cause):
- a ClientApp that raises (or cannot be loaded) is answered with an error reply, as
  `flwr-clientapp` does, and its task is finished as FAILED;
- a reply that cannot be pushed (the Runtime API's calls retry transient HTTP errors for up
  to `retry_s`, never forever) is replaced by an error reply naming the cause, and the task
  is finished as FAILED: the server sees the device as `failed` at once. If the error reply
  cannot be pushed either (the SuperNode is gone or restarted and no longer knows the task's
  token), the task is not finished by the worker: a FAILED task without a reply would leave
  Flower 1.41's SuperNode waiting for that reply forever, whereas a task whose heartbeats
  stop is expired by the SuperNode (after 60 s), which answers the server with
  CLIENT_APP_CRASHED, or hands the task out again if it never started;
- a failing AcquireTask (SuperNode not up yet, or restarting) is retried with a capped
  back-off; heartbeat failures are logged when they start, at most once a minute while they
  last, and when they stop.
Unlike Flower's own Runtime client, the worker never signals itself on an HTTP 401 (a task
token the restarted SuperNode no longer knows): it gives the task up and serves on.
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
from logging import ERROR, INFO, WARNING

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import httpx  # noqa: E402
from flwr.app import Error, Message  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from . import flwr_compat as fc  # noqa: E402  # module attributes: tests replace them with fakes
from .flwr_compat import (AcquireTaskRequest, ErrorCode, LoadClientAppError, RuntimeTokenHttpInterceptor,  # noqa: E402
                          RuntimeVersionHttpInterceptor, SendTaskHeartbeatRequest, SubStatus, TaskType, log,
                          validate_and_resolve_root_certificates)

RETRY_S = 30.0            # how long one Runtime API call retries transient errors (connection refused, 502-504)
RETRYABLE_STATUS = {502, 503, 504}
LOG_EVERY_S = 60.0        # at most one log line a minute for a failure that keeps repeating
ABANDONED = "abandoned"   # run_task's outcome when nothing could be reported (the SuperNode's expiry answers)


def retry_invoker(max_time_s: float = RETRY_S) -> fc.RetryInvoker | None:
    """Bounded retries of transient HTTP errors; any other error (e.g. 401: the SuperNode no longer
    knows the task's token) is raised at once. Flower's own invoker retries transport errors
    forever and answers a 401 by sending SIGINT to its own process, which would stop the worker."""
    if max_time_s <= 0:
        return None

    def giveup(exc: Exception) -> bool:
        return isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code not in RETRYABLE_STATUS

    return fc.RetryInvoker(wait_gen_factory=lambda: fc.exponential(max_delay=5), max_time=max_time_s, max_tries=None,
                           recoverable_exceptions=(httpx.TransportError, httpx.HTTPStatusError), should_giveup=giveup)


def _client(address: str, insecure: bool, certificates: bytes | None, component: str,
            token: str | None = None, retry_s: float = RETRY_S):
    interceptors = [RuntimeVersionHttpInterceptor(component_name=component)]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return fc.RuntimeHttpClient.from_server_address(server_address=address, insecure=insecure,
                                                    root_certificates=certificates, interceptors=interceptors,
                                                    retry_invoker=retry_invoker(retry_s))


def _cause(ex: BaseException) -> str:
    return f"{type(ex).__name__}: {ex}"


class _RateLimited:
    """Logs a repeating failure when it starts, then at most every `every_s` (with the count), and when it ends."""

    def __init__(self, what: str, every_s: float = LOG_EVERY_S) -> None:
        self.what, self.every_s = what, every_s
        self.failures = 0
        self.logged = 0
        self._last = -float("inf")

    def failed(self, ex: BaseException | str) -> None:
        self.failures += 1
        now = time.monotonic()
        if self.failures == 1 or now - self._last >= self.every_s:
            cause = ex if isinstance(ex, str) else _cause(ex)
            log(WARNING, "fedlegend worker: %s failed (%d in a row): %s", self.what, self.failures, cause)
            self._last = now
            self.logged += 1

    def ok(self) -> None:
        if self.failures:
            log(INFO, "fedlegend worker: %s works again after %d failures", self.what, self.failures)
            self.logged += 1
        self.failures = 0
        self._last = -float("inf")


class _Heartbeat:
    """Keeps a task alive on the SuperNode while it runs (flwr-clientapp's heartbeat, without its SIGINT).

    One attempt per beat (its own client, no retries: the next beat is the retry); failures are
    logged, rate-limited."""

    def __init__(self, client, every_s: float = 5.0, log_every_s: float = LOG_EVERY_S) -> None:
        self._stop = threading.Event()
        self.failures = _RateLimited("task heartbeat", log_every_s)

        def beat() -> None:
            while not self._stop.wait(every_s):
                try:
                    res = client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
                except Exception as ex:  # pylint: disable=broad-exception-caught  # logged; the next beat retries
                    self.failures.failed(ex)
                    continue
                if getattr(res, "success", True):
                    self.failures.ok()
                else:
                    self.failures.failed("the SuperNode no longer knows this task (expired or finished)")

        self._thread = threading.Thread(target=beat, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)


def _push(client, reply: Message, context, what: str) -> bool:
    try:
        fc.push_message(client, reply, context)
    except Exception as ex:  # pylint: disable=broad-exception-caught  # logged with its cause; the caller falls back
        log(ERROR, "fedlegend worker: pushing the %s failed: %s", what, _cause(ex), exc_info=ex)
        return False
    md = reply.metadata
    log(INFO, "fedlegend worker: pushed the %s to a %s message (round %s)", what, md.message_type, md.group_id or "-")
    return True


def run_task(address: str, insecure: bool, certificates: bytes | None, token: str, retry_s: float = RETRY_S,
             heartbeat_s: float = 5.0) -> str:
    """One CLIENT_APP task, in this process: pull, run the ClientApp, push. Returns its sub-status.

    Never raises for a failure of the task (the ClientApp's, or the Runtime API's); see the
    module docstring for what is reported where. Returns SubStatus.COMPLETED or FAILED, or
    ABANDONED when nothing could be reported and the SuperNode's task expiry answers for it."""
    client = _client(address, insecure, certificates, "flwr-clientapp", token, retry_s)
    beat_client = _client(address, insecure, certificates, "flwr-clientapp", token, retry_s=0)
    beat = _Heartbeat(beat_client, heartbeat_s)
    message = context = reply = None
    status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    try:
        try:
            message, context, run, fab = fc.pull_task_input(client)
            fc.install_from_fab(fab.content, skip_prompt=True)
            load = fc.get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
            app: ClientApp = load(run.fab_id, run.fab_version, fab.hash_str)  # cached module after the first task
            reply = app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as ex:  # pylint: disable=broad-exception-caught  # answered as flwr-clientapp would
            where = "pulling the task" if message is None else "the ClientApp"
            log(ERROR, "fedlegend worker: %s raised %s", where, _cause(ex), exc_info=ex)
            code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(ex, LoadClientAppError) \
                else ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            details = f"{type(ex)}:<'{ex}'>"
            if message is not None:
                reply = Message(Error(code=code, reason=details), reply_to=message)
        replied = False
        if reply is not None and context is not None:
            replied = _push(client, reply, context, "reply" if status == SubStatus.COMPLETED else "error reply")
            if not replied and status == SubStatus.COMPLETED:
                status, details = SubStatus.FAILED, "the worker could not push its reply"
                error = Message(Error(code=ErrorCode.UNKNOWN, reason=f"fedlegend worker: {details}"), reply_to=message)
                replied = _push(client, error, context, "error reply (instead of the reply)")
        if not replied:  # finishing it FAILED without a reply would leave the SuperNode waiting for one forever
            log(ERROR, "fedlegend worker: no reply reached the SuperNode; the task is left to its heartbeat expiry "
                "(the SuperNode then answers the server CLIENT_APP_CRASHED, or hands the task out again)")
            return ABANDONED
        try:
            fc.push_task_output(client=client, context=context, sub_status=status, details=details)
        except Exception as ex:  # pylint: disable=broad-exception-caught  # the SuperNode's expiry finishes it
            log(ERROR, "fedlegend worker: pushing the task's status (%s) failed: %s", status, _cause(ex), exc_info=ex)
        return status
    finally:
        beat.stop()
        for c in (client, beat_client):
            try:
                c.close()
            except Exception as ex:  # pylint: disable=broad-exception-caught
                log(WARNING, "fedlegend worker: closing a Runtime API client failed: %s", _cause(ex))


def _wait_for_listener(address: str, stop: threading.Event, every_s: float = 0.2) -> None:
    host, _, port = address.rpartition(":")
    while not stop.is_set():
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=1.0).close()
            return
        except OSError:
            stop.wait(every_s)


def serve(address: str, insecure: bool = True, certificates: bytes | None = None, poll_s: float = 0.2,
          stop: threading.Event | None = None, retry_s: float = RETRY_S, max_backoff_s: float = 5.0,
          max_tasks: int | None = None) -> dict[str, int]:
    """Claim and run this SuperNode's CLIENT_APP tasks until `stop` is set (or the process is signalled).

    Survives every failure of a task or of the Runtime API (logged, see the module docstring);
    returns the number of tasks by outcome, and of failed AcquireTask calls (`acquire-failures`)."""
    stop = stop or threading.Event()
    _wait_for_listener(address, stop)  # Flower's client would back off exponentially while the SuperNode starts
    client = _client(address, insecure, certificates, "SuperExec", retry_s=0)  # the loop below is the retry
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
    log(INFO, "fedlegend worker: serving ClientApp tasks of the SuperNode at %s (pid %d)", address, os.getpid())
    counts: dict[str, int] = {}
    acquire = _RateLimited(f"AcquireTask at {address}")
    backoff, acquire_failures = 0.0, 0
    try:
        while not stop.is_set() and (max_tasks is None or sum(counts.values()) < max_tasks):
            try:
                res = client.AcquireTask(request)
            except Exception as ex:  # pylint: disable=broad-exception-caught  # SuperNode not up yet / restarting
                acquire.failed(ex)
                acquire_failures += 1
                backoff = min(max_backoff_s, max(poll_s, 2 * backoff))
                stop.wait(backoff)
                continue
            acquire.ok()
            backoff = 0.0
            if not (res.HasField("task") and res.token):
                stop.wait(poll_s)
                continue
            t0 = time.perf_counter()
            try:
                status = run_task(address, insecure, certificates, res.token, retry_s)
            except Exception as ex:  # pylint: disable=broad-exception-caught  # a bug here must not end the worker
                log(ERROR, "fedlegend worker: task %d crashed the task runner: %s", res.task.task_id, _cause(ex),
                    exc_info=ex)
                status = "crashed"
            counts[status] = counts.get(status, 0) + 1
            log(INFO, "fedlegend worker: task %d (%s) %s in %.2f s", res.task.task_id, res.task.type, status,
                time.perf_counter() - t0)
    finally:
        try:
            client.close()
        except Exception as ex:  # pylint: disable=broad-exception-caught
            log(WARNING, "fedlegend worker: closing the Runtime API client failed: %s", _cause(ex))
        log(INFO, "fedlegend worker: stopped after %d tasks (%s)", sum(counts.values()),
            ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none")
    return {**counts, "acquire-failures": acquire_failures}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Long-lived ClientApp executor for `flower-supernode --isolation process`")
    p.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, HOST:PORT (its --port)")
    p.add_argument("--insecure", action="store_true", help="plain HTTP to the Runtime API (the SuperNode's default)")
    p.add_argument("--root-certificates", help="CA of the Runtime API's certificate, if it serves TLS")
    p.add_argument("--poll-s", type=float, default=0.2, help="seconds between polls when no task is waiting")
    p.add_argument("--retry-s", type=float, default=RETRY_S,
                   help="seconds a task's Runtime API call retries transient errors before the worker gives up on it")
    p.add_argument("--preload", action="append", default=[], metavar="MODULE",
                   help="import MODULE before serving (e.g. fedlegend.engine.flower.app), so the first task starts warm")
    p.add_argument("--check-data", metavar="FILE",
                   help="this device's data file (its node config's data-file): checked before serving; a file that "
                        "cannot be used stops the worker with the file, line and field")
    p.add_argument("--text-column", default="text", help="with --check-data: the text column (node config text-column)")
    p.add_argument("--label-column", default="label",
                   help="with --check-data: the label column (node config label-column)")
    a = p.parse_args(argv)
    if a.check_data:
        from ...device_data import DataSource, check_source
        from ...errors import UserError

        try:
            check_source(DataSource(path=a.check_data), a.text_column, a.label_column)
        except UserError as err:
            print(f"fedlegend worker: error: {err}", file=sys.stderr)
            return 2
        log(INFO, "fedlegend worker: data file %s checked", a.check_data)
    for module in a.preload:
        importlib.import_module(module)
    certificates = validate_and_resolve_root_certificates(a.root_certificates, a.insecure)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    serve(a.runtime_api_address, a.insecure, certificates, a.poll_s, stop, a.retry_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
