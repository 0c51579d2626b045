"""Command line: `fedlegend run` (one method), `fedlegend compare` (several, same fleet and seeds) and
`fedlegend pretest` (the paper's section 2 pre-tests, pretest.py).

A user error (errors.UserError: config, files, models, data; or an output that exists) prints
one line naming the file, line or field and the fix, exit status 2; `--debug` adds its
traceback. Any other exception is a programming error and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
import traceback

from .config import load_config
from .errors import UserError

# what the CLI reports as the user's to fix, without a traceback (FileExistsError: an output folder or key)
USER_ERRORS = (UserError, FileExistsError)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML file with any of the knobs (see configs/default.toml); on top of --preset")
    p.add_argument("--preset", help="a named setting, configs/NAME.toml, as the base (default, trec, vitaminc, "
                   "mmlu, math, paper); --config and flags override it")
    p.add_argument("--seed", type=int, help="fixes partitions, fleet, sampling and initialisation")
    p.add_argument("--devices", type=int, help="fleet size (the paper: 80)")
    p.add_argument("--rounds", type=int)
    p.add_argument("--local-steps", type=int, help="optimizer steps per device per round (0: use local epochs)")
    p.add_argument("--local-epochs", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--eval-every", type=int, help="evaluate the global model every N rounds")
    p.add_argument("--target", type=float, help="target accuracy for time-to-target (0-1)")
    p.add_argument("--alpha", type=float, help="Dirichlet alpha over labels")
    p.add_argument("--iid", action="store_true", help="IID partitions instead of Dirichlet")
    p.add_argument("--model", help="minilm-l6 (default), mpnet-base, smollm2-135m (a decoder), or local "
                   "(with --model-path)")
    p.add_argument("--model-path", help="a local Hugging Face model folder")
    p.add_argument("--model-kind", choices=["auto", "encoder", "decoder"],
                   help="with --model local: auto (default: config.json's architectures decide), encoder or decoder")
    p.add_argument("--data", help="rotten-tomatoes (default), trec, vitaminc, mmlu, math, or file (with --data-path)")
    p.add_argument("--data-path", help="a CSV or JSONL file: text and label columns (a second text column for "
                   "pairs), or prompt and answer columns")
    p.add_argument("--engine", choices=["local", "flower"], help="local loop (default) or Flower's simulation engine")
    p.add_argument("--device", help="auto (default: the first CUDA GPU when one is visible, else the CPU), cpu, "
                   "cuda or cuda:N")
    p.add_argument("--precision", choices=["fp32", "bf16"], help="fp32 (default) or bf16 autocast (pays on GPUs; changes the numbers)")
    p.add_argument("--eval-precision", choices=["fp32", "bf16"], help="evaluation only (default: --precision); bf16 "
                   "halves evaluation on AVX512-BF16 CPUs and GPUs, moves scores slightly")
    p.add_argument("--dp-epsilon", type=float, help="differential privacy: target epsilon over the run (user-level; "
                   "calibrates the noise; see docs/privacy.md)")
    p.add_argument("--dp-clip", type=float, help="DP: clip each device's whole update to this L2 norm (default 1.0)")
    p.add_argument("--dp-delta", type=float, help="DP: the delta of (epsilon, delta) (default 1e-5)")
    p.add_argument("--dp-noise", type=float, help="DP: a fixed noise multiplier (with --dp-epsilon: stop when spent)")
    p.add_argument("--dp-mode", choices=["central", "local"], help="DP: noise on the server (default) or on each device")
    p.add_argument("--secagg", action="store_true", help="secure aggregation: updates summed under Flower's SecAgg+ "
                   "(with --engine flower; privacy.secure_aggregation; docs/privacy.md)")
    p.add_argument("--batch-devices", nargs="?", const="true", type=_batch_devices, metavar="true|false|auto|N",
                   help="train the devices of a round that share a layout together (run.batch_devices; alone: true; "
                   "N: at most N a group; docs/batched.md)")
    p.add_argument("--workers", type=_workers, metavar="N|auto",
                   help="train a round's devices in N parallel processes (run.workers; auto: one per core)")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="rerun the frozen layers every step (cache.prefix_cache = false; docs/cache.md)")
    p.add_argument("--device-cache", action="store_true",
                   help="simulated devices keep their frozen layers' outputs across rounds "
                        "(fleet.device_activation_cache = true; docs/device_cache.md)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _batch_devices(text: str) -> bool | int | str:
    """--batch-devices VALUE: true / false / auto / an integer (the most devices a group)."""
    low = text.strip().lower()
    if low in ("true", "on", "yes"):
        return True
    if low in ("false", "off", "no"):
        return False
    if low == "auto" or low.isdigit():
        return "auto" if low == "auto" else int(low)
    raise argparse.ArgumentTypeError(f"{text!r}: use true, false, auto or a number of devices")


def _workers(text: str) -> int | str:
    """--workers VALUE: a number of processes >= 1, or auto."""
    low = text.strip().lower()
    if low == "auto" or (low.isdigit() and int(low) >= 1):
        return "auto" if low == "auto" else int(low)
    raise argparse.ArgumentTypeError(f"{text!r}: use a number of processes >= 1, or auto")


def _overrides(a: argparse.Namespace) -> dict:
    return {
        "run.seed": a.seed, "fleet.devices": a.devices, "run.rounds": a.rounds, "train.local_steps": a.local_steps,
        "train.local_epochs": a.local_epochs, "train.batch_size": a.batch_size, "train.lr": a.lr,
        "run.eval_every": a.eval_every, "run.target_accuracy": a.target, "partition.alpha": a.alpha,
        "partition.kind": "iid" if a.iid else None, "model.name": a.model, "model.path": a.model_path,
        "model.kind": a.model_kind,
        "data.name": a.data, "data.path": a.data_path, "method.name": getattr(a, "method", None),
        "privacy.epsilon": a.dp_epsilon, "privacy.clip": a.dp_clip, "privacy.delta": a.dp_delta,
        "privacy.noise_multiplier": a.dp_noise, "privacy.mode": a.dp_mode,
        "privacy.secure_aggregation": True if getattr(a, "secagg", False) else None,
        "run.engine": a.engine, "run.device": a.device, "run.precision": a.precision,
        "run.eval_precision": a.eval_precision,
        "cache.prefix_cache": False if a.no_prefix_cache else None,
        "run.batch_devices": a.batch_devices, "run.workers": a.workers,
        "fleet.device_activation_cache": True if a.device_cache else None,
    }


def cmd_run(a: argparse.Namespace) -> int:
    from .results import format_summary
    from .rundir import run_experiment

    cfg = load_config(a.config, _overrides(a), preset=a.preset)
    out = a.out or f"runs/{cfg.method.name}-seed{cfg.run.seed}"
    print(f"fedlegend run: {cfg.method.name} on {cfg.model.name} / {cfg.data.name}, {cfg.fleet.devices} devices, "
          f"{cfg.run.rounds} rounds, {cfg.run.engine} engine -> {out}", file=sys.stderr)
    summary = run_experiment(cfg, out, progress=not a.quiet, resume=a.resume,
                             fresh_on_bad_checkpoint=a.fresh_on_bad_checkpoint)
    print(format_summary(summary))
    print(f"outputs in {out}/: records.jsonl summary.json config.toml accuracy_traffic.png adapter/")
    return 0


def cmd_compare(a: argparse.Namespace) -> int:
    from .compare import run_compare
    from .methods import check_method

    methods = [check_method(m.strip()) for m in a.methods.split(",") if m.strip()]
    try:
        seeds = [int(s) for s in a.seeds.split(",")]
    except ValueError:
        raise UserError(f"--seeds {a.seeds!r}: give comma-separated integers, e.g. --seeds 0,1,2") from None
    cfg = load_config(a.config, _overrides(a), preset=a.preset)
    print(f"fedlegend compare: {', '.join(methods)} x seeds {seeds} -> {a.out}", file=sys.stderr)
    run_compare(cfg, methods, seeds, a.out, target=a.target, progress=not a.quiet, resume=a.resume,
                fresh_on_bad_checkpoint=a.fresh_on_bad_checkpoint)
    print(f"outputs in {a.out}/: summary.csv table.md fig7/8/11/12(/13) PNGs, one folder per run")
    return 0


def cmd_pretest(a: argparse.Namespace) -> int:
    from .pretest import PAPER_DEVICES, parse_ints, run_pretest

    over = _overrides(a)
    over["fleet.devices"] = a.devices or PAPER_DEVICES   # the paper's pre-tests: 10 devices
    cfg = load_config(a.config, over, preset=a.preset)
    positions, dists = (None if v is None else [p.strip() for p in v.split(",") if p.strip() not in ("", "none")]
                        for v in (a.positions, a.distributions))
    print(f"fedlegend pretest {a.kind}: {cfg.model.name} / {cfg.data.name}, {cfg.fleet.devices} devices, "
          f"{cfg.run.rounds} rounds -> {a.out}", file=sys.stderr)
    run_pretest(a.kind, cfg, a.out, rank=a.rank, depths=parse_ints(a.depths, "--depths"), budget=a.budget,
                positions=positions, sweep=parse_ints(a.sweep_ranks, "--sweep-ranks"), measure_steps=a.measure_steps,
                progress=not a.quiet, resume=a.resume, distributions=dists, measure_only=a.measure_only)
    folders = f"{a.kind}/measure.json" if a.measure_only else f"one run folder per layout in {a.kind}/"
    print(f"outputs in {a.out}/: {a.kind}.csv {a.kind}.md {a.kind}.png, {folders}")
    return 0


def cmd_certs(a: argparse.Namespace) -> int:
    from pathlib import Path

    from .engine.flower.certs import write_certs, write_supernode_keys

    if a.keys_only:
        files = write_supernode_keys(a.dir, range(a.first, a.first + a.supernodes))
        print(f"wrote {', '.join(str(p) for p in files.values())}")
        return 0
    hosts = [h.strip() for h in a.hosts.split(",") if h.strip()]
    if not hosts:
        raise UserError("--hosts names no host; give the SuperLink's comma-separated names or IPs")
    files = write_certs(a.dir, hosts, a.days, a.supernodes)
    print(f"wrote {', '.join(str(p) for p in files.values())}")
    auth = " --enable-supernode-auth" if a.supernodes else ""
    print(f"flower-superlink --ssl-ca-certfile {files['ca.crt']} --ssl-certfile {files['server.pem']} "
          f"--ssl-keyfile {files['server.key']}{auth}")
    node = f"flower-supernode --root-certificates {files['ca.crt']}"
    if a.supernodes:
        d = Path(a.dir)
        print(f"flwr supernode register {d / 'supernode-I.pub'} LINK   # once per device I, on the SuperLink")
        node += f" --auth-supernode-private-key {d / 'supernode-I.key'} --node-config 'device-id=I'"
    print(node)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedlegend", description="Federated LoRA fine-tuning on heterogeneous devices")
    parser.add_argument("--debug", action="store_true",
                        help="on a user error (config, files, models, data), also print the traceback")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one method on the simulated fleet")
    from .methods import method_list

    run.add_argument("--method", help=f"registered method (default legend): {method_list()}")
    run.add_argument("--out", help="output folder (default runs/METHOD-seedSEED)")
    run.add_argument("--resume", action="store_true",
                     help="continue an interrupted run of the same config in --out from its last round (checkpoint/)")
    run.add_argument("--fresh-on-bad-checkpoint", action="store_true",
                     help="with --resume: a corrupt, truncated or foreign checkpoint is reported and the run starts "
                     "afresh (default: stop with an error naming the file)")
    _add_common(run)
    run.set_defaults(func=cmd_run)
    cmp_ = sub.add_parser("compare", help="run several methods on the same partitions, seeds and fleet")
    cmp_.add_argument("--methods", default="legend,fedlora,hetlora,fedadapter",
                      help="comma-separated registered methods (default: LEGEND and the paper's three baselines)")
    cmp_.add_argument("--seeds", default="0", help="comma-separated seeds")
    cmp_.add_argument("--out", default="runs/compare", help="output folder")
    cmp_.add_argument("--resume", action="store_true",
                      help="reuse runs in --out that finished with the same config and continue unfinished ones "
                           "from their last round (after an interruption)")
    cmp_.add_argument("--fresh-on-bad-checkpoint", action="store_true",
                      help="with --resume: a run whose checkpoint is corrupt, truncated or foreign is reported and "
                      "starts afresh (default: stop with an error naming the file)")
    _add_common(cmp_)
    cmp_.set_defaults(func=cmd_compare)
    pre = sub.add_parser("pretest", help="the paper's pre-tests (figs 3-5): LoRA position, depth, rank distribution")
    pre.add_argument("kind", choices=["position", "depth", "ranks"],
                     help="position: all layers vs the shallow / middle / deep third; depth: the top 1..L layers "
                     "(with per-batch latency and memory measured here); ranks: inc / dec / uniform / random "
                     "distributions and the rank sweep per position")
    pre.add_argument("--out", default="runs/pretest", help="output folder (KIND.csv, KIND.md, KIND.png, KIND/)")
    pre.add_argument("--resume", action="store_true", help="reuse finished layouts in --out, continue unfinished ones")
    pre.add_argument("--rank", type=int, default=8, help="position, depth: the rank of every chosen layer (default 8)")
    pre.add_argument("--depths", help="depth: comma-separated depths (default 1..L)")
    pre.add_argument("--measure-steps", type=int, default=5, help="depth: timed training steps per depth (default 5)")
    pre.add_argument("--measure-only", action="store_true", help="depth: only the training step at each depth, "
                     "measured here (minutes), without the federated runs")
    pre.add_argument("--budget", type=int, help="ranks: total rank of the distributions (default 8 per layer; "
                     "the paper: 96 over 12)")
    pre.add_argument("--positions", help="ranks: layer positions of the rank sweep, comma-separated from all, "
                     "shallow, middle, deep (default all four; none: no sweep); position: which of them to train")
    pre.add_argument("--distributions", help="ranks: comma-separated from inc, dec, uniform, random (default all "
                     "four; none: only the sweep)")
    pre.add_argument("--sweep-ranks", help="ranks: the sweep's ranks (default 1,2,4,8,16,32,64,128)")
    _add_common(pre)
    pre.set_defaults(func=cmd_pretest)
    certs = sub.add_parser("certs", help="TLS certificates for a Flower federation (a private CA + SuperLink cert) "
                           "and SuperNode authentication keys")
    certs.add_argument("dir", help="output folder (must not hold a ca.key yet)")
    certs.add_argument("--hosts", default="localhost,127.0.0.1,::1", help="comma-separated SuperLink names/IPs")
    certs.add_argument("--days", type=int, default=365)
    certs.add_argument("--supernodes", type=int, default=0,
                       help="also write N SuperNode key pairs supernode-I.key/.pub (I = device id) for "
                       "SuperNode authentication")
    certs.add_argument("--keys-only", action="store_true",
                       help="only the SuperNode key pairs, into an existing folder (devices --first..)")
    certs.add_argument("--first", type=int, default=0, help="with --keys-only: the first device id")
    certs.set_defaults(func=cmd_certs)
    a = parser.parse_args(argv)
    try:
        return a.func(a)
    except USER_ERRORS as err:   # anything else is a bug: its traceback goes out as Python prints it
        if a.debug:
            traceback.print_exc()
        print(f"fedlegend: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
