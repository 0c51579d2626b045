"""The Flower engine on Flower's simulation engine (Ray): `fedlegend run --engine flower`."""

from __future__ import annotations

import os
from typing import Callable

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from ...experiment import Experiment
from ...spec import AdapterState
from ..local import Snapshot
from .client import make_client_app
from .strategy import MethodStrategy


def make_server_app(strategy: MethodStrategy, round_timeout_s: float = 3600.0) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy.run(grid, round_timeout_s)

    return app


def simulate(strategy: MethodStrategy, cpus_per_client: float = 1.0, round_timeout_s: float = 3600.0) -> None:
    """Run `strategy` on Flower's simulation engine (Ray), one SuperNode per device."""
    from flwr.simulation import run_simulation

    if strategy.status != "fleet":
        raise ValueError("Flower's simulation runs on the virtual clock: its devices report the fleet model's "
                         "times (status 'fleet'), never the host's clock")
    # Flower's telemetry phones home by default; an offline research harness should not
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    backend = {"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
               "init_args": {"include_dashboard": False}}
    run_simulation(make_server_app(strategy, round_timeout_s), make_client_app(),
                   num_supernodes=len(strategy.exp.fleet), backend_config=backend)
    if len(strategy.records) != strategy.exp.cfg.run.rounds:
        raise RuntimeError(f"the Flower run stopped after {len(strategy.records)} of {strategy.exp.cfg.run.rounds} "
                           "rounds; see Flower's log above")


def run_flower(exp: Experiment, on_record: Callable[[dict], None] | None = None, progress: bool = True,
               cpus_per_client: float = 1.0, round_timeout_s: float = 3600.0, resume: Snapshot | None = None,
               on_snapshot: Callable[[Snapshot], None] | None = None) -> tuple[AdapterState, list[dict]]:
    """All rounds on Flower's simulation engine; returns the final global adapter and the records,
    like engine.local.run_local (also its `resume` and `on_snapshot`: a resumed run replays the
    snapshot's records through `on_record`, then runs the remaining rounds)."""
    from tqdm.auto import tqdm

    strategy = MethodStrategy(exp, None, resume=resume, on_snapshot=on_snapshot)
    for rec in strategy.records:
        if on_record:
            on_record(rec)
    bar = tqdm(total=exp.cfg.run.rounds, desc=f"{exp.method.info.name} (flower)", unit="round", disable=not progress,
               initial=strategy.offset)

    def emit(rec: dict) -> None:
        bar.update(1)
        if rec["accuracy"] is not None:
            bar.set_postfix(acc=f"{rec['accuracy']:.3f}", vtime=f"{rec['virtual_time_s']:.0f}s")
        if on_record:
            on_record(rec)

    strategy.on_record = emit
    try:
        if strategy.offset < exp.cfg.run.rounds:
            simulate(strategy, cpus_per_client, round_timeout_s)
    finally:
        bar.close()
    return strategy.state, strategy.records
