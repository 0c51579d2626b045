"""Per-round records -> time-to-target, traffic, waiting; the summary, the table and the plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def time_to_target(records: list[dict], target: float) -> tuple[float | None, int | None, int | None]:
    """(virtual seconds, cumulative bytes down+up, round) when the global model first reaches target."""
    total = 0
    for r in records:
        total += r["bytes_down"] + r["bytes_up"]
        if r["accuracy"] is not None and r["accuracy"] >= target:
            return r["virtual_time_s"], total, r["round"]
    return None, None, None


def summarize(records: list[dict], method: str, target: float, **extra) -> dict:
    evals = [r["accuracy"] for r in records if r["accuracy"] is not None]
    t, b, rnd = time_to_target(records, target)
    return {
        "method": method,
        "final_accuracy": evals[-1] if evals else None,
        "best_accuracy": max(evals) if evals else None,
        "target_accuracy": target,
        "time_to_target_s": t,
        "round_to_target": rnd,
        "bytes_to_target": b,
        "bytes_total": int(sum(r["bytes_down"] + r["bytes_up"] for r in records)),
        "mean_waiting_s": float(np.mean([r["mean_waiting_s"] for r in records])) if records else 0.0,
        "virtual_time_s": records[-1]["virtual_time_s"] if records else 0.0,
        "rounds": len(records),
        "rejected_updates": sum(1 for r in records for e in r["events"] if e["kind"] == "rejected"),
        **({k: records[-1][k] for k in ("epsilon", "delta", "noise_multiplier")}   # DP runs only
           if records and "epsilon" in records[-1] else {}),
        **({"peak_device_cache_mb": max(r["device_cache_mb"] for r in records)}   # device activation cache runs
           if records and "device_cache_mb" in records[-1] else {}),
        **extra,
    }


class RecordWriter:
    """Appends one JSON line per round as soon as the round ends."""

    def __init__(self, path: Path):
        self.f = open(path, "w")

    def __call__(self, record: dict) -> None:
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def read_records(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def pyplot():
    """matplotlib's pyplot on the file-only backend (no display on servers and in CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_accuracy(ax, records_by_method: dict[str, list[dict]], target: float | None = None,
                  title: str = "Accuracy vs time") -> None:
    """Test accuracy of the evaluated rounds against virtual time, one line per method (fig. 7)."""
    for name, recs in records_by_method.items():
        ev = [r for r in recs if r["accuracy"] is not None]
        ax.plot([r["virtual_time_s"] for r in ev], [100 * r["accuracy"] for r in ev], marker="o", ms=3, label=name)
    if target is not None:
        ax.axhline(100 * target, ls="--", c="grey", lw=1, label=f"target {100 * target:.1f}%")
    ax.set(xlabel="virtual time (s)", ylabel="test accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()


def save(fig, out_png: Path) -> None:
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    pyplot().close(fig)


def plot_run(records_by_method: dict[str, list[dict]], out_png: Path, target: float | None = None) -> None:
    """Accuracy vs virtual time, and cumulative traffic vs virtual time, one line per method."""
    fig, (ax1, ax2) = pyplot().subplots(1, 2, figsize=(11, 4))
    plot_accuracy(ax1, records_by_method, target)
    for name, recs in records_by_method.items():
        traffic = np.cumsum([r["bytes_down"] + r["bytes_up"] for r in recs]) / 1e6
        ax2.plot([r["virtual_time_s"] for r in recs], traffic, label=name)
    ax2.set(xlabel="virtual time (s)", ylabel="cumulative traffic (MB)", title="Traffic (down + up)")
    ax2.grid(alpha=0.3)
    ax2.legend()
    save(fig, out_png)


def format_summary(summary: dict) -> str:
    def fmt(v):
        if v is None:
            return "never"
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
        return f"{v:,}" if isinstance(v, int) else str(v)

    keys = ["method", "final_accuracy", "best_accuracy", "target_accuracy", "time_to_target_s", "bytes_to_target",
            "bytes_total", "mean_waiting_s", "virtual_time_s", "wall_clock_s", "peak_rss_mb"]
    width = max(len(k) for k in keys)
    return "\n".join(f"  {k:<{width}}  {fmt(summary.get(k))}" for k in keys)
