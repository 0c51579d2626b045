"""`fedlegend pretest position|depth|ranks`: the paper's section 2 pre-tests (figs 3-5), federated.

Each pre-test trains a few *fixed layouts* (layer -> LoRA rank, the same on every device, FedAvg)
through the ordinary run folder and local round loop (rundir.run_experiment with a method factory,
experiment.build_experiment(cfg, make=...)), so partitions, fleet, seeds and the virtual clock are
those of `fedlegend run` with the same config. One run folder per layout in OUT/KIND/, then
OUT/KIND.csv, OUT/KIND.md and OUT/KIND.png:

- position (fig. 3): LoRA on all layers and on the shallow, middle and deep third of them;
- depth (fig. 4): the top k layers for k = 1..L, plus the per-batch latency and peak memory of a
  training step at each depth, measured on this machine (CPU time: process_time; CUDA:
  torch.cuda.max_memory_allocated; CPU memory: the peak of torch's live CPU allocations in a step,
  from the profiler), beside the paper's figures;
- ranks (fig. 5): increasing, decreasing, uniform and random rank distributions over all layers with
  one total budget, and the rank sweep {1, 2, 4, ..., 128} on each layer position.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .compare import rows_for_seed
from .config import Config, dump_config
from .engine import Engine
from .engine.local import run_local
from .results import plot_accuracy, pyplot, read_records, save
from .rundir import finished_run, run_experiment
from .spec import Ranks
from .pretest_layouts import (DISTRIBUTIONS, KINDS, PAPER, PAPER_DEVICES, POSITIONS, SWEEP_RANKS,  # noqa: F401
                              FixedLayout, PretestError, depth_layers, position_layers, rank_distribution)
from .pretest_measure import fit_per_layer, measure_depths  # noqa: F401

# ---------------------------------------------------------------- running layouts
@dataclass(frozen=True)
class Variant:
    name: str          # the run folder's stem and the CSV's variant
    ranks: Ranks


def check_local(cfg: Config) -> None:
    if cfg.run.engine != "local":
        raise PretestError(f"pre-tests run on the local engine (run.engine = {cfg.run.engine!r}); drop --engine")


def run_variant(cfg: Config, out: Path, v: Variant, progress: bool, resume: bool) -> dict:
    """One fixed layout through the run folder and the local loop; with resume a finished run of the
    same config in its folder is read back and an unfinished one continues from its checkpoint."""
    run_cfg = cfg.model_copy(deep=True)
    run_cfg.method.name = "fedlora"                 # the config records a FedAvg run at the layout's top rank
    run_cfg.method.fedlora.rank = max(v.ranks.values())
    folder = out / f"{v.name}-seed{cfg.run.seed}"
    if resume and (done := finished_run(folder, run_cfg)) is not None:
        return done
    ranks, weighting = dict(v.ranks), cfg.method.fedlora.weighting
    from .experiment import build_experiment

    engine = Engine("local", run_local, supports_resume=True,
                    build=lambda c: build_experiment(c, make=lambda ctx: FixedLayout(ctx, ranks, v.name, weighting)))
    if progress:
        print(f"  {v.name}: layers {sorted(ranks)} ranks {[ranks[l] for l in sorted(ranks)]}", flush=True)
    summary = run_experiment(run_cfg, folder, progress=progress, engine=engine, resume=resume)
    (folder / "layout.json").write_text(json.dumps({"variant": v.name, "ranks": {str(l): r for l, r in ranks.items()}}))
    return summary


def run_variants(cfg: Config, out: Path, variants: list[Variant], progress: bool, resume: bool,
                 target: float | None = None) -> list[dict]:
    """Every variant, then compare's rows (target: the lowest final accuracy unless given), with
    the layout and the mean round time (virtual seconds) added."""
    summaries = {v.name: run_variant(cfg, out, v, progress, resume) for v in variants}
    rows = rows_for_seed(out, cfg.run.seed, summaries, target)
    for row, v in zip(rows, variants):
        s = summaries[v.name]
        row.update(variant=v.name, layers=sorted(v.ranks), ranks=[v.ranks[l] for l in sorted(v.ranks)],
                   best_accuracy=s["best_accuracy"], rounds=s["rounds"], bytes_total=s["bytes_total"],
                   mean_round_time_s=s["virtual_time_s"] / max(s["rounds"], 1))
    return rows


def records_of(out: Path, name: str, seed: int) -> list[dict]:
    return read_records(out / f"{name}-seed{seed}" / "records.jsonl")


# ---------------------------------------------------------------- outputs
def write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (" ".join(map(str, r[k])) if isinstance(r.get(k), list) else r.get(k)) for k in fields})


def _pct(x) -> str:
    return "never" if x is None else f"{100 * x:.1f}"


def _num(x, fmt="{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def _header(cfg: Config, kind: str) -> str:
    return (f"{kind} pre-test: {cfg.model.name} / {cfg.data.name}, {cfg.fleet.devices} devices, {cfg.run.rounds} rounds, "
            f"seed {cfg.run.seed}")


POSITION_FIELDS = ["variant", "layers", "ranks", "final_accuracy", "best_accuracy", "target_accuracy",
                   "time_to_target_s", "mean_round_time_s", "virtual_time_s", "bytes_total", "rounds",
                   "paper_final_accuracy_pct"]
DEPTH_FIELDS = ["depth", "layers", "ranks", "final_accuracy", "best_accuracy", "mean_round_time_s", "virtual_time_s",
                "time_to_target_s", "target_accuracy", "cpu_ms_per_batch", "wall_ms_per_batch", "peak_mb",
                "measured_on", "batch_size", "width"]
RANKS_FIELDS = ["group", "variant", "position", "layers", "ranks", "budget", "final_accuracy", "best_accuracy",
                "gain_vs_lowest_rank", "mean_round_time_s", "virtual_time_s", "paper_gain_pct"]


def pretest_position(cfg: Config, out: Path, rank: int = 8, progress: bool = True, resume: bool = False,
                     positions: list[str] | None = None) -> list[dict]:
    """Fig. 3: LoRA (rank `rank`) on all layers and on each third (or only `positions`); final accuracy
    and time."""
    L = _num_layers(cfg)
    sets = position_layers(L)
    chosen = _check_positions(list(POSITIONS) if not positions else positions)
    variants = [Variant(p, {l: rank for l in sets[p]}) for p in chosen]
    rows = run_variants(cfg, out / "position", variants, progress, resume)
    for r in rows:
        r["paper_final_accuracy_pct"] = PAPER["position"]["final_accuracy_pct"][r["variant"]]
    write_csv(out / "position.csv", rows, POSITION_FIELDS)
    deep = next((r for r in rows if r["variant"] == "deep"), rows[-1])
    lines = [f"{_header(cfg, 'position')}, rank {rank} on the chosen layers (paper: RoBERTa-base 12 layers, SST-2, "
             "10 devices)", "",
             "| layers | which | final acc % | paper % | time to target (s) | mean round time (s) | deep's speed-up "
             "(round time) | paper: deep's speed-up |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sp = deep["mean_round_time_s"] and r["mean_round_time_s"] / deep["mean_round_time_s"]
        paper_sp = PAPER["position"]["deep_speedup"].get(r["variant"])
        lines.append(f"| {r['variant']} | {_span(r['layers'])} | {_pct(r['final_accuracy'])} | "
                     f"{r['paper_final_accuracy_pct']} | {_num(r['time_to_target_s'], '{:.0f}')} | "
                     f"{r['mean_round_time_s']:.1f} | {sp:.2f}x | {'-' if paper_sp is None else f'{paper_sp}x'} |")
    lines.append(f"\nTarget = {_pct(rows[0]['target_accuracy'])} % (the lowest final accuracy, the paper's rule).")
    _write_table(out / "position.md", lines)

    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    plot_accuracy(a1, {f"Layers-{r['variant'][0].upper()} {_span(r['layers'])}": records_of(out / "position", r["variant"],
                                                                                               cfg.run.seed)
                       for r in rows}, rows[0]["target_accuracy"], title="(a) accuracy vs time")
    x = np.arange(len(rows))
    a2.bar(x, [r["mean_round_time_s"] for r in rows], color="tab:blue", label="mean round time")
    a2.set_xticks(x, [f"Layers-{r['variant'][0].upper()}" for r in rows])
    a2.set(ylabel="mean round time (virtual s)", title="(b) per-round time and final accuracy")
    t2 = a2.twinx()
    t2.plot(x, [100 * (r["final_accuracy"] or 0) for r in rows], "o-", c="tab:red", label="final accuracy")
    t2.set_ylabel("final accuracy (%)", color="tab:red")
    fig.suptitle(_header(cfg, "position"), fontsize=9)
    save(fig, out / "position.png")
    return rows


def _check_positions(positions: list[str]) -> list[str]:
    bad = [p for p in positions if p not in POSITIONS]
    if bad:
        raise PretestError(f"unknown layer position(s) {bad}; use {', '.join(POSITIONS)} (or none)")
    return positions


def _span(layers: list[int]) -> str:
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 and layers == list(range(layers[0], layers[-1] + 1)) \
        else ",".join(map(str, layers))


def _write_table(path: Path, lines: list[str]) -> None:
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    print(text)


def _num_layers(cfg: Config) -> int:
    """The model's transformer layer count from its config.json (no weights loaded)."""
    import json as _json

    from .assets import resolve_model
    asset = resolve_model(cfg.model.name, cfg.model.path, cfg.model.target_modules, cfg.model.kind)
    conf = _json.loads((Path(asset.path) / "config.json").read_text())
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if key in conf:
            return int(conf[key])
    raise PretestError(f"{asset.path}/config.json names no layer count (num_hidden_layers)")


def parse_ints(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PretestError(f"{what} {text!r}: give comma-separated integers, e.g. 1,2,4") from None


def pretest_depth(cfg: Config, out: Path, rank: int = 8, depths: list[int] | None = None, measure_steps: int = 5,
                  progress: bool = True, resume: bool = False, measure_only: bool = False) -> list[dict]:
    """Fig. 4: the top k layers at rank `rank` for each depth k: federated accuracy and round time, and
    the per-batch latency and peak memory of a training step measured on this machine. measure_only:
    the measurement alone (minutes where the federated runs take hours on a large model); the accuracy
    and round-time columns stay empty."""
    L = _num_layers(cfg)
    depths = sorted(set(depths or range(1, L + 1)))
    for k in depths:
        depth_layers(L, k)
    variants = [Variant(f"depth{k}", {l: rank for l in depth_layers(L, k)}) for k in depths]
    if measure_only:
        rows = [{"variant": v.name, "layers": sorted(v.ranks), "ranks": [rank] * len(v.ranks), "final_accuracy": None,
                 "mean_round_time_s": None} for v in variants]
    else:
        rows = run_variants(cfg, out / "depth", variants, progress, resume)
    mpath = out / "depth" / "measure.json"
    key = {"config": dump_config(cfg), "depths": depths, "rank": rank, "steps": measure_steps}
    saved = json.loads(mpath.read_text()) if resume and mpath.exists() else None
    if saved is not None and {**saved.get("key", {}), "depths": None} == {**key, "depths": None} \
            and set(depths) <= set(saved["key"]["depths"]):   # a measurement of these depths and more
        measured = saved["measured"]
        measured = {**measured, "rows": [r for r in measured["rows"] if r["depth"] in depths]}
    else:
        if progress:
            print(f"  measuring a training step at depths {depths} ({measure_steps} steps each)", flush=True)
        measured = measure_depths(cfg, depths, rank, measure_steps)
        mpath.write_text(json.dumps({"key": key, "measured": measured}, indent=1))
    info = measured["info"]
    for r, k, m in zip(rows, depths, measured["rows"]):
        r.update({**m, "depth": k, "measured_on": info["device"], "batch_size": info["batch_size"],
                  "width": info["width"]})
    write_csv(out / "depth.csv", rows, DEPTH_FIELDS)

    lat_key = "wall_ms_per_batch" if info["device"].startswith("cuda") else "cpu_ms_per_batch"
    lat_slope, lat_inc = fit_per_layer(depths, [r[lat_key] for r in rows])
    mem_slope, mem_inc = fit_per_layer(depths, [r["peak_mb"] for r in rows])
    P = PAPER["depth"]
    clock = "wall time (CUDA synchronised)" if lat_key.startswith("wall") else "CPU time (process_time)"
    lines = [f"{_header(cfg, 'depth')}, rank {rank}; a step measured on {info['device']} at batch {info['batch_size']} x "
             f"width {info['width']} ({info['threads']} thread(s)), latency = {clock}, median of {info['steps']}; "
             f"memory = peak above the step's start (model weights {info['model_mb']:.0f} MB not included)", "",
             "| depth | layers | final acc % | mean round time (virtual s) | CPU ms / batch | wall ms / batch | "
             "peak MB / step |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = "-" if measure_only else _pct(r["final_accuracy"])
        lines.append(f"| {r['depth']} | {_span(r['layers'])} | {acc} | {_num(r['mean_round_time_s'])} | "
                     f"{r['cpu_ms_per_batch']:.1f} | {r['wall_ms_per_batch']:.1f} | {r['peak_mb']:.1f} |")
    d0, d1 = depths[0], depths[-1]
    lines += ["", "| per added layer / from shallowest to deepest | here | paper (RoBERTa-base, Jetson) |", "|---|---|---|",
              f"| latency per added layer | {_num(lat_slope, '{:+.2f}')} ms | +{P['latency_ms_per_layer']:.0f} ms |",
              f"| memory per added layer | {_num(mem_slope, '{:+.2f}')} MB | +{P['memory_mb_per_layer']:.0f} MB |",
              f"| latency, depth {d0} -> {d1} | {_num(lat_inc, '{:+.0f}')} % | +{P['latency_increase_pct']:.0f} % (1 -> 12) |",
              f"| memory, depth {d0} -> {d1} | {_num(mem_inc, '{:+.0f}')} % | +{P['memory_increase_pct']:.0f} % (1 -> 12) |"]
    _write_table(out / "depth.md", lines)

    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.4))
    x = np.array(depths)
    accs = [100 * r["final_accuracy"] for r in rows if r["final_accuracy"] is not None]
    if accs:
        a1.bar(x, [100 * (r["final_accuracy"] or 0) for r in rows], color="tab:blue", alpha=0.7, label="final accuracy")
        a1.set_ylim(max(0.0, min(accs) - 5), min(100.0, max(accs) + 3))
        a1.set(xlabel="LoRA depth", ylabel="final accuracy (%)", title="(a) accuracy & per-batch latency")
        t1 = a1.twinx()
    else:   # measure_only: latency alone
        a1.set(xlabel="LoRA depth", title="(a) per-batch latency")
        t1 = a1
    a1.set_xticks(x)
    t1.plot(x, [r[lat_key] for r in rows], "o-", c="tab:red")
    t1.set_ylabel(f"per-batch latency (ms, {clock.split(' (')[0]})", color="tab:red")
    a2.bar(x, [r["peak_mb"] for r in rows], color="tab:green")
    a2.set(xlabel="LoRA depth", ylabel="peak memory of a step (MB)", title="(b) memory usage")
    a2.set_xticks(x)
    fig.suptitle(_header(cfg, "depth"), fontsize=9)
    fig.text(0.5, 0.005, f"here: {_num(lat_slope, '{:+.1f}')} ms and {_num(mem_slope, '{:+.1f}')} MB per added layer, "
             f"{_num(lat_inc, '{:+.0f}')} % latency and {_num(mem_inc, '{:+.0f}')} % memory from depth {d0} to {d1} "
             f"({info['device']}, batch {info['batch_size']}x{info['width']}); paper: +5 ms, +107 MB per layer, "
             "+252 % and +221 % from 1 to 12", ha="center", fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    save(fig, out / "depth.png")
    return rows


def pretest_ranks(cfg: Config, out: Path, budget: int | None = None, positions: list[str] | None = None,
                  sweep: list[int] | None = None, progress: bool = True, resume: bool = False,
                  distributions: list[str] | None = None) -> list[dict]:
    """Fig. 5: (b) the rank distributions (default all four) over all layers with one budget (default 8
    per layer); (a) the rank sweep on each chosen layer position."""
    L = _num_layers(cfg)
    budget = budget or 8 * L
    positions = _check_positions(list(POSITIONS) if positions is None else positions)
    sweep = sorted(set(SWEEP_RANKS if sweep is None else sweep))
    if any(r < 1 for r in sweep):
        raise PretestError(f"sweep ranks must be >= 1, got {sweep}")
    distributions = list(DISTRIBUTIONS) if distributions is None else distributions
    dists = [Variant(d, dict(enumerate(rank_distribution(d, L, budget, cfg.run.seed)))) for d in distributions]
    rows = [dict(r, group="distribution", position="all", budget=budget)
            for r in (run_variants(cfg, out / "ranks", dists, progress, resume) if dists else [])]
    sets = position_layers(L)
    curves = {}
    for p in positions:
        vs = [Variant(f"{p}-r{r}", {l: r for l in sets[p]}) for r in sweep]
        prow = run_variants(cfg, out / "ranks", vs, progress, resume)
        low = prow[0]["final_accuracy"]
        for r, rank in zip(prow, sweep):
            r.update(group="sweep", position=p, budget=rank * len(sets[p]), paper_gain_pct=PAPER["ranks"]["gain_pct"][p],
                     gain_vs_lowest_rank=None if r["final_accuracy"] is None or low is None else r["final_accuracy"] - low)
        curves[p] = prow
        rows += prow
    write_csv(out / "ranks.csv", rows, RANKS_FIELDS)

    lines = [f"{_header(cfg, 'ranks')}; distributions: budget {budget} over {L} layers (paper: 96 over 12)", "",
             "| distribution | ranks (input -> output) | final acc % | best acc % | mean round time (virtual s) |",
             "|---|---|---|---|---|"]
    for r in rows[:len(dists)]:
        lines.append(f"| {r['variant']} | {' '.join(map(str, r['ranks']))} | {_pct(r['final_accuracy'])} | "
                     f"{_pct(r['best_accuracy'])} | {r['mean_round_time_s']:.1f} |")
    lines.append("\nPaper (RoBERTa-base, SST-2): inc best at 94.9 %, up to 1.6 points above the others.")
    if curves:
        lines += ["", "| position | layers | " + " | ".join(f"r={r}" for r in sweep) + f" | gain r={sweep[0]} -> "
                  f"r={sweep[-1]} | paper gain (r=1 -> 128) |", "|---|---|" + "---|" * (len(sweep) + 2)]
        for p, prow in curves.items():
            gain = prow[-1]["gain_vs_lowest_rank"]
            lines.append(f"| {p} | {_span(sets[p])} | " + " | ".join(_pct(r["final_accuracy"]) for r in prow) +
                         f" | {_num(None if gain is None else 100 * gain, '{:+.1f}')} | +{PAPER['ranks']['gain_pct'][p]} |")
        lines.append("\n(final accuracy %, gain in accuracy points)")
    _write_table(out / "ranks.md", lines)

    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for p, prow in curves.items():
        a1.plot(sweep, [100 * (r["final_accuracy"] or 0) for r in prow], "o-", label=f"Layers-{p[0].upper()} "
                f"{_span(sets[p])}")
    a1.set_xscale("log", base=2)
    a1.set(xlabel="LoRA rank", ylabel="final accuracy (%)", title="(a) rank on each layer position")
    a1.grid(alpha=0.3)
    if curves:
        a1.legend()
    drows = rows[:len(dists)]
    a2.bar([r["variant"] for r in drows], [100 * (r["final_accuracy"] or 0) for r in drows], color="tab:blue")
    accs = [100 * r["final_accuracy"] for r in drows if r["final_accuracy"] is not None]
    if accs:
        a2.set_ylim(max(0.0, min(accs) - 5), min(100.0, max(accs) + 3))
    a2.set(ylabel="final accuracy (%)", title=f"(b) rank distributions, budget {budget} over {L} layers")
    fig.suptitle(_header(cfg, "ranks"), fontsize=9)
    save(fig, out / "ranks.png")
    return rows


def run_pretest(kind: str, cfg: Config, out: str | Path, *, rank: int = 8, depths: list[int] | None = None,
                budget: int | None = None, positions: list[str] | None = None, sweep: list[int] | None = None,
                measure_steps: int = 5, progress: bool = True, resume: bool = False,
                distributions: list[str] | None = None, measure_only: bool = False) -> list[dict]:
    """One pre-test into `out` (KIND.csv, KIND.md, KIND.png and one run folder per layout in OUT/KIND/)."""
    if kind not in KINDS:
        raise PretestError(f"unknown pre-test {kind!r}; use one of {', '.join(KINDS)}")
    if rank < 1:
        raise PretestError(f"--rank must be >= 1, got {rank}")
    if measure_only and kind != "depth":
        raise PretestError(f"--measure-only is the depth pre-test's (a training step per depth); drop it for {kind}")
    check_local(cfg)
    out = Path(out)
    (out / kind).mkdir(parents=True, exist_ok=True)
    if kind == "position":
        return pretest_position(cfg, out, rank, progress, resume, positions)
    if kind == "depth":
        return pretest_depth(cfg, out, rank, depths, measure_steps, progress, resume, measure_only)
    return pretest_ranks(cfg, out, budget, positions, sweep, progress, resume, distributions)
