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
Each SuperNode plays the device named by its node config: --node-config 'device-id=N'.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from ...config import load_config
from .. import Engine
from .client import make_client_app
from .strategy import MethodStrategy

client_app = make_client_app()
server_app = ServerApp()


def run_on_grid(grid: Grid, round_timeout_s: float, status: str = "measured", rejoin_wait_s: float = 30.0):
    """An engine for rundir.run_experiment: the rounds over `grid`'s SuperNodes; it resumes from a
    snapshot (the run folder's checkpoint) and hands one out after every round."""
    def engine(exp, on_record=None, progress=False, resume=None, on_snapshot=None):
        strategy = MethodStrategy(exp, None, status=status, resume=resume, on_snapshot=on_snapshot)
        strategy.rejoin_wait_s = rejoin_wait_s
        for rec in strategy.records:   # the rounds before the checkpoint, replayed as run_local does
            if on_record:
                on_record(rec)
        strategy.on_record = on_record
        if strategy.offset < exp.cfg.run.rounds:
            strategy.run(grid, round_timeout_s)
        return strategy.state, strategy.records
    return Engine("flower-grid", engine, supports_resume=True)


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
