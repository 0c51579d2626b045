"""The Flower engine: the same rounds as engine/local.py, as Flower 1.41 messages.

Server (ServerApp + MethodStrategy) plans each round with the local engine's `plan_round`,
sends every device its own plan and adapter slice, and closes the round with
`finish_round`; the client (ClientApp) runs the local engine's `run_device`. Modules:
  wire.py         the messages' records: encode / decode / validate (pure)
  timing.py       measured status: devices' times from real clocks (ForwardTimer, TimedGrid)
  client.py       the ClientApp (one device per node, one built experiment per process)
  roster.py       which node plays which device; which device a reply belongs to
  strategy.py     MethodStrategy, the server side of a round
  simulation.py   Flower's simulation engine (Ray): run_flower, as engine.local.run_local
  app.py          server_app / client_app for the Deployment Runtime (`flwr run`)
  worker.py       long-lived ClientApp executor of a SuperNode (`python -m fedlegend.engine.flower.worker`)
  federation.py   a SuperLink and SuperNodes on localhost (LocalFederation)
  certs.py        TLS certificates and SuperNode keys (`fedlegend certs`)
  flwr_compat.py  every non-public Flower symbol, and the check of Flower's version

The names below are importable from this package (`from fedlegend.engine.flower import
run_flower`); each submodule is imported on first use, so that federation.py and certs.py
(command-line helpers) load neither torch nor Flower.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "wire": ("DEVICE_ID_KEY", "PARTITION_ID_KEY", "TIME_KEYS", "REPORT_KEYS", "STATUS_MODES", "STAMP_KEYS",
             "MalformedMessage", "state_to_record", "record_to_state", "config_hash", "config_from_toml",
             "assignment_to_content", "content_to_assignment", "result_to_content", "content_to_result",
             "worker_of", "reply_to_device_id", "content_labels", "query_content", "content_to_query",
             "report_to_content", "reply_to_report"),
    "timing": ("ForwardTimer", "measured_round_time", "measured_stamps", "TimedGrid"),
    "client": ("device_id_of", "source_of", "handle_train", "handle_query", "make_client_app"),
    "roster": ("Roster", "build_roster", "collect_replies"),
    "strategy": ("MethodStrategy", "without_data_paths", "wait_for_nodes", "query_nodes"),
    "app": ("discover", "run_on_grid"),
    "simulation": ("make_server_app", "simulate", "run_flower"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
