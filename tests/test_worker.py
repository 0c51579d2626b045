"""The long-lived ClientApp worker (engine/flower/worker.py) under faults, with fakes for Flower's Runtime API.

The flwr_compat functions the worker calls (pull_task_input, push_message, push_task_output,
install_from_fab, get_load_client_app_fn) and its RuntimeHttpClient are replaced by fakes, so
no SuperNode runs: a reply push that raises, a ClientApp that raises, an AcquireTask that fails,
heartbeats that fail. In each case the worker logs the cause, reports what Flower's API lets it
report, and serves the next task.
"""

import logging
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedlegend.engine.flower import flwr_compat as fc
from fedlegend.engine.flower import worker
from fedlegend.engine.flower.flwr_compat import ErrorCode, SubStatus, TaskIdentity


class FakeRuntime:
    """Stands in for RuntimeHttpClient: every client the worker builds is this one object."""

    def __init__(self, acquire=()):
        self.acquire = list(acquire)   # per AcquireTask call: a response, or an exception to raise
        self.heartbeats = 0
        self.closed = 0
        self.built: list[dict] = []

    def from_server_address(self, **kw):
        self.built.append(kw)
        return self

    def AcquireTask(self, request):  # noqa: N802  (Flower's method name)
        if not self.acquire:
            return task_response(None)
        item = self.acquire.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    def SendTaskHeartbeat(self, request):  # noqa: N802
        self.heartbeats += 1
        return SimpleNamespace(success=True)

    def close(self):
        self.closed += 1


def task_response(task_id):
    """An AcquireTaskResponse-like object: a task and its token, or nothing waiting."""
    if task_id is None:
        return SimpleNamespace(HasField=lambda name: False, token="", task=None)
    return SimpleNamespace(HasField=lambda name: name == "task", token=f"token-{task_id}",
                           task=SimpleNamespace(task_id=task_id, type="clientapp"))


def train_message(rnd: int) -> Message:
    msg = Message(RecordDict({"plan": ConfigRecord({"round": rnd})}), dst_node_id=7, message_type=MessageType.TRAIN,
                  group_id=str(rnd))
    msg.metadata.__dict__["_message_id"] = msg.object_id
    return msg


class Harness:
    """Fake task inputs (one train message per task, rounds 1, 2, ...), a fake ClientApp, and what got pushed."""

    def __init__(self, monkeypatch, acquire=(), push_fails=(), app_raises=()):
        monkeypatch.setattr(TaskIdentity, "_run_id", 1)
        monkeypatch.setattr(TaskIdentity, "_node_id", 7)
        monkeypatch.setattr(TaskIdentity, "_task_id", 1)
        self.runtime = FakeRuntime(acquire)
        self.pulled = 0
        self.push_fails = set(push_fails)   # indices (0-based) of push_message calls that raise
        self.app_raises = set(app_raises)   # rounds whose ClientApp raises
        self.push_calls = 0
        self.pushed: list[Message] = []
        self.outputs: list[tuple[str, str]] = []
        monkeypatch.setattr(fc, "RuntimeHttpClient", self.runtime)
        monkeypatch.setattr(fc, "pull_task_input", self.pull_task_input)
        monkeypatch.setattr(fc, "push_message", self.push_message)
        monkeypatch.setattr(fc, "push_task_output", self.push_task_output)
        monkeypatch.setattr(fc, "install_from_fab", lambda content, skip_prompt: None)
        monkeypatch.setattr(fc, "get_load_client_app_fn", lambda **kw: lambda *a: self.app)
        monkeypatch.setattr(worker, "_wait_for_listener", lambda address, stop: None)

    def pull_task_input(self, client):
        self.pulled += 1
        run = SimpleNamespace(fab_id="fedlegend", fab_version="1", run_id=1)
        return train_message(self.pulled), SimpleNamespace(node_id=7, run_id=1), run, \
            SimpleNamespace(content=b"", hash_str="h")

    def app(self, message, context):
        rnd = int(message.metadata.group_id)
        if rnd in self.app_raises:
            raise ValueError(f"boom in round {rnd}")
        return Message(RecordDict({"reply": ConfigRecord({"round": rnd})}), reply_to=message)

    def push_message(self, client, message, context):
        i = self.push_calls
        self.push_calls += 1
        if i in self.push_fails:
            raise httpx.ConnectError(f"connection refused (push {i})")
        self.pushed.append(message)

    def push_task_output(self, client, context, sub_status, details):
        self.outputs.append((sub_status, details))

    def serve(self, tasks: int, timeout_s: float = 10.0) -> dict:
        stop = threading.Event()
        timer = threading.Timer(timeout_s, stop.set)  # a safety net: the test never hangs
        timer.start()
        try:
            return worker.serve("127.0.0.1:1", stop=stop, poll_s=0.01, max_tasks=tasks, max_backoff_s=0.05)
        finally:
            timer.cancel()


@pytest.fixture
def flwr_log(caplog):
    caplog.set_level(logging.INFO, logger="flwr")
    return caplog


def test_failed_reply_push_is_logged_reported_as_failed_and_the_next_task_served(monkeypatch, flwr_log):
    h = Harness(monkeypatch, acquire=[task_response(1), task_response(2)], push_fails={0})
    counts = h.serve(tasks=2)
    assert counts == {SubStatus.FAILED: 1, SubStatus.COMPLETED: 1, "acquire-failures": 0}
    # task 1: its reply could not be pushed -> an error reply instead, and the task finished FAILED
    first, second = h.pushed
    assert first.has_error() and first.error.code == ErrorCode.UNKNOWN and "could not push" in first.error.reason
    assert first.metadata.group_id == "1"
    assert not second.has_error() and second.metadata.group_id == "2"   # task 2 served normally
    assert [s for s, _ in h.outputs] == [SubStatus.FAILED, SubStatus.COMPLETED]
    assert "connection refused (push 0)" in flwr_log.text               # the cause is logged, not swallowed
    assert "pushing the reply failed" in flwr_log.text


def test_reply_that_cannot_be_pushed_at_all_is_left_to_the_supernodes_expiry(monkeypatch, flwr_log):
    """Neither the reply nor the error reply gets through (the SuperNode is gone): no FAILED status is pushed
    (Flower's SuperNode would wait forever for a reply), the worker goes on."""
    h = Harness(monkeypatch, acquire=[task_response(1), task_response(2)], push_fails={0, 1})
    counts = h.serve(tasks=2)
    assert counts == {worker.ABANDONED: 1, SubStatus.COMPLETED: 1, "acquire-failures": 0}
    assert [m.metadata.group_id for m in h.pushed] == ["2"] and h.outputs == [(SubStatus.COMPLETED, "")]
    assert "no reply reached the SuperNode" in flwr_log.text


def test_clientapp_that_raises_is_answered_with_an_error_reply(monkeypatch, flwr_log):
    h = Harness(monkeypatch, acquire=[task_response(1), task_response(2)], app_raises={1})
    counts = h.serve(tasks=2)
    assert counts == {SubStatus.FAILED: 1, SubStatus.COMPLETED: 1, "acquire-failures": 0}
    err, ok = h.pushed
    assert err.has_error() and err.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "boom in round 1" in err.error.reason and err.metadata.group_id == "1"
    assert not ok.has_error()
    assert h.outputs[0][0] == SubStatus.FAILED and "boom in round 1" in h.outputs[0][1]
    assert "the ClientApp raised ValueError: boom in round 1" in flwr_log.text


def test_failing_pull_is_left_to_expiry_and_the_worker_serves_on(monkeypatch, flwr_log):
    h = Harness(monkeypatch, acquire=[task_response(1), task_response(2)])
    real = h.pull_task_input
    calls = []

    def pull(client):
        calls.append(1)
        if len(calls) == 1:
            raise httpx.HTTPStatusError("401", request=httpx.Request("POST", "http://x"),
                                        response=httpx.Response(401))
        return real(client)

    monkeypatch.setattr(fc, "pull_task_input", pull)
    counts = h.serve(tasks=2)
    assert counts == {worker.ABANDONED: 1, SubStatus.COMPLETED: 1, "acquire-failures": 0}
    assert h.outputs == [(SubStatus.COMPLETED, "")] and "pulling the task raised HTTPStatusError" in flwr_log.text


def test_status_push_that_raises_does_not_end_the_worker(monkeypatch, flwr_log):
    h = Harness(monkeypatch, acquire=[task_response(1), task_response(2)])

    def output(client, context, sub_status, details):
        h.outputs.append((sub_status, details))
        if len(h.outputs) == 1:
            raise RuntimeError("status push broke")

    monkeypatch.setattr(fc, "push_task_output", output)
    counts = h.serve(tasks=2)
    assert counts[SubStatus.COMPLETED] == 2 and len(h.pushed) == 2
    assert "status push broke" in flwr_log.text


def test_a_crashing_task_runner_does_not_end_the_serve_loop(monkeypatch, flwr_log):
    h = Harness(monkeypatch, acquire=[task_response(1), task_response(2)])
    real, calls = worker.run_task, []

    def run_task(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise KeyError("bug")
        return real(*a, **kw)

    monkeypatch.setattr(worker, "run_task", run_task)
    assert h.serve(tasks=2) == {"crashed": 1, SubStatus.COMPLETED: 1, "acquire-failures": 0}
    assert "crashed the task runner" in flwr_log.text


def test_acquire_task_failing_transiently_is_retried(monkeypatch, flwr_log):
    down = [httpx.ConnectError("connection refused"), httpx.ReadTimeout("timed out"), httpx.ConnectError("again")]
    h = Harness(monkeypatch, acquire=[*down, task_response(1)])
    counts = h.serve(tasks=1)
    assert counts == {SubStatus.COMPLETED: 1, "acquire-failures": 3}
    assert len(h.pushed) == 1 and h.outputs == [(SubStatus.COMPLETED, "")]
    lines = [r.getMessage() for r in flwr_log.records if "AcquireTask" in r.getMessage()]
    assert len(lines) == 2, lines     # rate-limited: when it starts failing and when it works again
    assert "ConnectError: connection refused" in lines[0] and "works again after 3 failures" in lines[1]


def test_heartbeat_failures_are_logged_rate_limited(flwr_log):
    class Client:
        fail = True
        calls = 0

        def SendTaskHeartbeat(self, request):  # noqa: N802
            Client.calls += 1
            if Client.fail:
                raise httpx.ConnectError("supernode down")
            return SimpleNamespace(success=True)

    beat = worker._Heartbeat(Client(), every_s=0.005, log_every_s=60.0)
    deadline = time.monotonic() + 5
    while beat.failures.failures < 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert beat.failures.failures >= 10 and beat.failures.logged == 1   # 10+ failures, one line
    Client.fail = False
    while beat.failures.failures and time.monotonic() < deadline:
        time.sleep(0.01)
    beat.stop()
    text = flwr_log.text
    assert text.count("task heartbeat failed") == 1 and "ConnectError: supernode down" in text
    assert "task heartbeat works again" in text


def test_heartbeat_that_the_supernode_refuses_is_logged_not_signalled(flwr_log):
    class Client:
        def SendTaskHeartbeat(self, request):  # noqa: N802
            return SimpleNamespace(success=False)   # Flower's own heartbeat would SIGINT its process here

    beat = worker._Heartbeat(Client(), every_s=0.005)
    time.sleep(0.1)
    beat.stop()
    assert "no longer knows this task" in flwr_log.text and beat.failures.logged == 1


def test_retry_invoker_retries_transient_errors_and_gives_up_on_401():
    invoker = worker.retry_invoker(max_time_s=10)
    invoker.wait_function = lambda s: None
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise httpx.ConnectError("refused")
        return "ok"

    assert invoker.invoke(flaky) == "ok" and len(calls) == 3

    def unauthorized():
        calls.append(1)
        raise httpx.HTTPStatusError("401", request=httpx.Request("POST", "http://x"), response=httpx.Response(401))

    calls.clear()
    with pytest.raises(httpx.HTTPStatusError):
        invoker.invoke(unauthorized)       # at once, and no SIGINT (Flower's invoker signals its own process)
    assert len(calls) == 1
    assert worker.retry_invoker(0) is None


def test_task_clients_use_the_bounded_invoker(monkeypatch):
    h = Harness(monkeypatch, acquire=[task_response(1)])
    h.serve(tasks=1)
    invokers = [kw["retry_invoker"] for kw in h.runtime.built]
    assert invokers[0] is None                          # AcquireTask: the serve loop is the retry
    assert any(i is not None and i.max_time == worker.RETRY_S for i in invokers)   # the task's calls
    assert h.runtime.closed == len(h.runtime.built)     # every client closed
