"""Flower's Grid in one process, without Ray or sockets: for tests and measurements of the message
protocol (SecAgg+ included) at the cost of the training alone.

Each message goes, as a copy (what serialisation gives a real node), to the ClientApp (mods included)
with its node's own persistent Context, as a SuperNode runs it; a ClientApp that raises answers with
an error message, as a SuperNode's does. Nodes 100 + d play devices d = 0..n-1 through their
simulation partition id, as under Flower's simulation engine.
"""

from __future__ import annotations

import copy
import itertools

from flwr.app import Context, Error, Message, RecordDict

from .client import make_client_app
from .flwr_compat import ErrorCode


class InProcessGrid:
    def __init__(self, devices: int) -> None:
        self.app = make_client_app()
        self.contexts = {100 + d: Context(run_id=1, node_id=100 + d,
                                          node_config={"partition-id": d, "num-partitions": devices},
                                          state=RecordDict(), run_config={}) for d in range(devices)}
        self.ids = itertools.count()
        self.replies: dict[str, Message] = {}
        self.sent: list[Message] = []

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            mid = f"m{next(self.ids)}"
            m.metadata.__dict__["_message_id"] = mid
            self.sent.append(m)
            # a copy: the workflow sends one record object to many nodes, and secaggplus_mod pops keys from it
            delivered = Message(content=copy.deepcopy(m.content), metadata=copy.deepcopy(m.metadata))
            try:
                reply = self.app(delivered, self.contexts[m.metadata.dst_node_id])
            except Exception as err:   # noqa: BLE001 - a SuperNode turns any ClientApp exception into an error reply
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(err)), reply_to=delivered)
            reply.metadata.__dict__["_src_node_id"] = m.metadata.dst_node_id   # a SuperNode stamps its node id
            reply.metadata.__dict__["_reply_to_message_id"] = mid
            self.replies[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def run_in_process(exp, on_record=None, on_snapshot=None, timeout: float = 600.0):
    """All rounds of `exp` through the Flower strategy over an InProcessGrid; returns (strategy, grid)."""
    from .strategy import MethodStrategy

    strategy = MethodStrategy(exp, on_record, poll_s=0.0, on_snapshot=on_snapshot)
    grid = InProcessGrid(len(exp.fleet))
    strategy.run(grid, timeout=timeout)
    return strategy, grid
