"""Every non-public Flower symbol fedlegend uses, imported here and nowhere else.

fedlegend's Flower engine is written against Flower 1.41.0. Its public API (flwr.app,
flwr.clientapp.ClientApp, flwr.serverapp, flwr.serverapp.strategy.Strategy,
flwr.simulation.run_simulation) is imported directly where it is used; what is below is
Flower's internals (error codes, the SuperNode's Runtime API client and task steps, the
CLI's FAB installer and Control API client, protobuf messages), which can change in any
release. So this module checks the installed version first and refuses any other one, and
a Flower upgrade starts here: bump SUPPORTED_FLWR and fix what no longer imports or behaves.
"""

from __future__ import annotations

import flwr

SUPPORTED_FLWR = "1.41.0"


def check_flwr_version(installed: str) -> None:
    """ImportError unless `installed` is the Flower version this module's imports are written for."""
    if installed != SUPPORTED_FLWR:
        raise ImportError(f"fedlegend's Flower engine needs flwr {SUPPORTED_FLWR} (it uses Flower internals, see "
                          f"{__name__}), but flwr {installed} is installed; fix: "
                          f"pip install 'flwr[simulation]=={SUPPORTED_FLWR}'")


check_flwr_version(flwr.__version__)

# pylint: disable=wrong-import-position,no-name-in-module,unused-import
from flwr.cli.install import install_from_fab  # noqa: E402
from flwr.cli.supernode.register import try_load_public_key  # noqa: E402
from flwr.cli.typing import SuperLinkConnection  # noqa: E402
from flwr.cli.utils import init_http_client_from_connection  # noqa: E402
from flwr.clientapp.client_app import LoadClientAppError  # noqa: E402
from flwr.clientapp.utils import get_load_client_app_fn  # noqa: E402
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS as SECAGG_CONFIGS  # noqa: E402
from flwr.common.secure_aggregation.secaggplus_constants import Key as SecAggKey, Stage as SecAggStage  # noqa: E402
from flwr.common.serde import recorddict_to_proto  # noqa: E402
from flwr.client.mod import secaggplus_mod  # noqa: E402
from flwr.common import (Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters,  # noqa: E402
                         parameters_to_ndarrays)
from flwr.server import LegacyContext  # noqa: E402
from flwr.server.workflow import SecAggPlusWorkflow  # noqa: E402
from flwr.compat.common.recorddict_compat import fitres_to_recorddict  # noqa: E402
from flwr.common.constant import ErrorCode, SubStatus  # noqa: E402
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD  # noqa: E402
from flwr.server.workflow.constant import Key as WorkflowKey  # noqa: E402
from flwr.proto.control_pb2 import RegisterNodeRequest  # noqa: E402
from flwr.proto.runtime_pb2 import AcquireTaskRequest, SendTaskHeartbeatRequest  # noqa: E402
from flwr.supercore import log  # noqa: E402
from flwr.supercore.constant import TaskType  # noqa: E402
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor  # noqa: E402
from flwr.supercore.retry import RetryInvoker, exponential, make_simple_http_retry_invoker  # noqa: E402
from flwr.supercore.runtime import RuntimeHttpClient  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402
from flwr.supercore.tls import validate_and_resolve_root_certificates  # noqa: E402
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output  # noqa: E402

__all__ = [
    "SUPPORTED_FLWR", "check_flwr_version",
    # flwr.cli: the FAB installer, SuperNode key loading and the Control API client (key registration)
    "install_from_fab", "try_load_public_key", "SuperLinkConnection", "init_http_client_from_connection",
    # flwr.clientapp internals: loading the ClientApp named in a FAB
    "LoadClientAppError", "get_load_client_app_fn",
    # SecAgg+ (engine/flower/secagg.py): the protocol's record and stage names, the legacy FitRes records the
    # client mod reads, the workflow's context records, and protobuf serialisation (bytes on the wire)
    "SECAGG_CONFIGS", "SecAggKey", "SecAggStage", "fitres_to_recorddict", "recorddict_to_proto",
    "MAIN_CONFIGS_RECORD", "MAIN_PARAMS_RECORD", "WorkflowKey",
    # ... and the legacy (pre-Message) API that Flower's SecAgg+ mod and workflow are written in
    "secaggplus_mod", "SecAggPlusWorkflow", "LegacyContext", "Code", "FitIns", "FitRes", "Parameters", "Status",
    "ndarrays_to_parameters", "parameters_to_ndarrays",
    # flwr.common.constant
    "ErrorCode", "SubStatus",
    # flwr.proto
    "RegisterNodeRequest", "AcquireTaskRequest", "SendTaskHeartbeatRequest",
    # flwr.supercore: logger, task types, the Runtime API's HTTP client, TLS, a message's run identity (tests)
    "log", "TaskType", "RuntimeTokenHttpInterceptor", "RuntimeVersionHttpInterceptor",
    "make_simple_http_retry_invoker", "RetryInvoker", "exponential", "RuntimeHttpClient", "TaskIdentity", "validate_and_resolve_root_certificates",
    # flwr.supernode: a ClientApp task's steps, as flwr-clientapp runs them
    "pull_task_input", "push_message", "push_task_output",
]
