"""ServerApp and ClientApp objects for Flower's Deployment Runtime (`flwr run`).

`deploy/flower-app/pyproject.toml` points Flower at `server_app` and `client_app` here.
The ServerApp runs a whole experiment through rundir.run_experiment, so a deployed run
writes the same records.jsonl, summary.json, plot and adapter/ as `fedlegend run`.
Run config keys (pyproject [tool.flwr.app.config], or `flwr run --run-config`):
  config      a fedlegend TOML file on the SuperLink's machine ("" = defaults)
  out         the output folder on the SuperLink's machine
  round-timeout-s  seconds to wait for a round's replies before counting a device as dropped
  rejoin-wait-s    between rounds, seconds to wait (once per absence) for a device whose node left to
                   come back (a restarting SuperNode) before planning the round without it; 0 = never
  status      "measured" (default: the devices' own timing, see timing.py) or "fleet"
              (the fleet's cost model, virtual seconds, as in simulation)
  resume      true (default): continue from `out`'s checkpoint/ if it is of the same run
              (a checkpoint is saved after every round and removed when the run ends)
  fresh-on-bad-checkpoint  true: a corrupt or foreign checkpoint is reported and the run starts
              afresh (default false: the ServerApp stops with the checkpoint's error)
Each SuperNode plays the device named by its node config and trains on the data it names there
(device_data.py): --node-config 'device-id=N data-file="/data/mine.jsonl"'. The ServerApp first
asks every node for its partition report (sample count, label histogram), then builds the
method's context from the reports; its own config's data.* is its test set (the test split of
that dataset or file, on the server's machine); devices are sent no data path.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from logging import INFO, WARNING

from ...config import Config, load_config
from ...experiment import Experiment, PartitionFacts, build_server, load_model_source, load_split
from .. import Engine
from .client import make_client_app
from .flwr_compat import log
from .roster import Roster
from .strategy import MethodStrategy, query_nodes, wait_for_nodes, without_data_paths

client_app = make_client_app()
server_app = ServerApp()


def discover(grid: Grid, cfg: Config, node_wait_s: float = 120.0,
             query_timeout_s: float = 600.0) -> tuple[Experiment, Roster, list[dict]]:
    """The deployed server side: its test set and model, and the method's context from the devices'
    partition reports. Waits (up to node_wait_s) for the fleet's nodes and asks each for its device
    id and report; a device without a report yet plans with zero samples until one arrives."""
    from ...config import dump_config

    source = load_model_source(cfg)
    split = load_split(cfg, source)   # the server's own data: its test split is the test set
    n, labels = cfg.fleet.devices, split.label_names
    roster = Roster()
    events = query_nodes(grid, roster, wait_for_nodes(grid, n, node_wait_s), n,
                         dump_config(without_data_paths(cfg)), labels, query_timeout_s)
    for e in events:   # e.g. a node whose file is unusable: its message names the file, line and field
        log(WARNING, "fedlegend: %s: %s", e["kind"], e["detail"])
    missing = [d for d in range(n) if d not in roster.reports]
    if missing:
        log(WARNING, "fedlegend: no partition report from devices %s yet; they plan with 0 samples until one arrives",
            missing)
        events += [{"device": d, "kind": "no-report", "detail": "no partition report before round 1"} for d in missing]
    facts = [roster.reports.get(d, PartitionFacts(0, (0,) * len(labels))) for d in range(n)]
    log(INFO, "fedlegend: partition reports (samples) %s", [f.samples for f in facts])
    # FLOP budgets' typical sizes from the server's own test set: the devices' texts never leave them
    return build_server(cfg, source, facts, split.test, labels, split.test), roster, events


def run_on_grid(grid: Grid, round_timeout_s: float, status: str = "measured", rejoin_wait_s: float = 30.0,
                node_wait_s: float = 120.0):
    """An engine for rundir.run_experiment: the rounds over `grid`'s SuperNodes, on the devices' own
    data (its `build` asks them for their reports); it resumes from a snapshot (the run folder's
    checkpoint) and hands one out after every round."""
    found: dict = {}

    def build(cfg: Config) -> Experiment:
        found["exp"], found["roster"], found["events"] = discover(grid, cfg, node_wait_s, round_timeout_s)
        return found["exp"]

    def engine(exp, on_record=None, progress=False, resume=None, on_snapshot=None):
        strategy = MethodStrategy(exp, None, status=status, resume=resume, on_snapshot=on_snapshot,
                                  send_data_paths=False, roster=found.get("roster"))
        strategy._pending_events = list(found.get("events", []))
        strategy.rejoin_wait_s = rejoin_wait_s
        for rec in strategy.records:   # the rounds before the checkpoint, replayed as run_local does
            if on_record:
                on_record(rec)
        strategy.on_record = on_record
        if strategy.offset < exp.cfg.run.rounds:
            strategy.run(grid, round_timeout_s)
        return strategy.state, strategy.records
    return Engine("flower-grid", engine, supports_resume=True, build=build)


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    from ...rundir import run_experiment

    rc = context.run_config
    cfg = load_config(str(rc["config"]) if rc.get("config") else None, {"run.engine": "flower"})
    engine = run_on_grid(grid, float(rc.get("round-timeout-s", 600.0)), str(rc.get("status", "measured")),
                         float(rc.get("rejoin-wait-s", 30.0)))
    run_experiment(cfg, str(rc.get("out", "runs/flower-deploy")), progress=False, engine=engine,
                   resume=_flag(rc.get("resume", True)),
                   fresh_on_bad_checkpoint=_flag(rc.get("fresh-on-bad-checkpoint", False)))


def _flag(value) -> bool:
    """A run-config boolean (TOML true/false, or "true"/"false" from --run-config strings)."""
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes")
