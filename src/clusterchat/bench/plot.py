"""`--plot FILE.png`: a bench run's latency percentiles second by second, and its latency histogram.

Matplotlib is an optional dependency (`pip install 'clusterchat[plot]'`): `missing()` says
so before a run starts, and the figure is drawn on the Agg canvas, with no display and
no pyplot state. The input is what the scenarios already keep: the per-second `series`
of the JSON (`t`, `phase`, `count`, `p50_ms`, `p90_ms`, `p99_ms` and a rate) and the
measured window's latency samples in nanoseconds.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

from clusterchat.bench.stats import NS_PER_MS, LatencySummary

PERCENTILE_LINES = (("p50_ms", "p50", "#1f77b4"), ("p90_ms", "p90", "#ff7f0e"), ("p99_ms", "p99", "#d62728"))


def missing() -> str | None:
    """Why `--plot` cannot work here, or None when it can."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "--plot needs matplotlib, which is not installed: pip install 'clusterchat[plot]'"
    return None


def latency_plot(path: str, title: str, series: Sequence[dict[str, Any]], samples_ns: Sequence[int],
                 window_s: Sequence[float], rate_key: str, rate_label: str) -> None:
    """Write a PNG of two panels: percentiles over time (with the rate), and the window's histogram."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(11, 8.5), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title, fontsize=11)
    top, bottom = fig.subplots(2, 1, height_ratios=(1, 1))

    # Percentiles, one point a second at the middle of its second; a second without samples breaks the lines.
    ends = np.array([p["t"] for p in series], dtype=float)
    edges = np.concatenate(([0.0], ends))
    mids = (edges[:-1] + edges[1:]) / 2
    has = np.array([p.get("count", 0) > 0 for p in series], dtype=bool)
    rate_ax = top.twinx()
    if len(ends):
        rate_ax.stairs([p.get(rate_key, 0.0) for p in series], edges, fill=True, color="#dde6ee", zorder=0)
    rate_ax.set_ylabel(rate_label + " (shaded)", color="#5a7590")
    rate_ax.tick_params(axis="y", colors="#5a7590")
    rate_ax.set_ylim(bottom=0)
    top.set_zorder(rate_ax.get_zorder() + 1)
    top.patch.set_visible(False)
    for key, label, color in PERCENTILE_LINES:
        values = np.array([p.get(key, 0.0) for p in series], dtype=float)
        values[~has] = np.nan
        top.plot(mids, values, marker=".", color=color, label=label)
    if len(window_s) == 2 and len(ends):
        span = max(float(ends[-1]), 1e-9)
        for lo, hi, name in ((0.0, window_s[0], "warmup"), (window_s[1], float(ends[-1]), "drain")):
            if hi - lo > 0.05:
                top.axvspan(lo, hi, facecolor="none", edgecolor="0.6", hatch="//", lw=0)
            if (hi - lo) / span > 0.06:  # wide enough for its label
                top.text((lo + hi) / 2, 0.02, name, transform=top.get_xaxis_transform(), ha="center",
                         va="bottom", fontsize=8, color="0.35", backgroundcolor="white")
    top.set_xlim(0, float(ends[-1]) if len(ends) else 1.0)
    top.set_xlabel("seconds since the load started")
    top.set_ylabel("latency, ms (each second's samples)")
    top.set_ylim(bottom=0)
    top.grid(True, alpha=0.3)
    top.legend(loc="upper left")
    top.set_title("latency percentiles over time", fontsize=10)

    # Histogram of the measured window, on log-spaced bins when the latencies span decades.
    ms = np.asarray(samples_ns, dtype=np.float64) / NS_PER_MS
    if ms.size:
        lo, hi = float(ms.min()), float(ms.max())
        spread = hi / lo if lo > 0 else float("inf")
        if spread > 20:
            bins = np.geomspace(max(lo, 1e-3), max(hi, 2e-3), 80)
            bottom.set_xscale("log")
            bottom.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
            bottom.xaxis.set_minor_formatter(FuncFormatter(_minor_label))
        else:
            bins = np.linspace(lo, hi if hi > lo else lo + 1e-3, 80)
        bottom.hist(ms, bins=bins, color="0.55")
        s = LatencySummary.of(samples_ns)
        for value, (_key, label, color) in zip((s.p50, s.p90, s.p99), PERCENTILE_LINES, strict=True):
            bottom.axvline(value, color=color, lw=1.5, label=f"{label} {value:.2f} ms")
        bottom.axvline(s.max, color="k", lw=1, ls=":", label=f"max {s.max:.2f} ms")
        bottom.legend(loc="upper right")
        bottom.set_title(f"latency histogram of the measured window ({ms.size:,} samples)", fontsize=10)
    else:
        bottom.text(0.5, 0.5, "no latency samples in the measured window", ha="center", va="center",
                    transform=bottom.transAxes)
        bottom.set_title("latency histogram of the measured window", fontsize=10)
    bottom.set_xlabel("latency, ms")
    bottom.set_ylabel("samples")
    bottom.grid(True, alpha=0.3)
    fig.savefig(path, dpi=100)


def _minor_label(value: float, _pos: int) -> str:
    """Label the 2s and 5s between the decades of a log axis (1, 2, 5, 10, 20, 50 ...)."""
    if value <= 0:
        return ""
    mantissa = round(value / 10 ** math.floor(math.log10(value)), 6)
    return f"{value:g}" if mantissa in (2.0, 5.0) else ""


def save(path: str, title: str, series: Sequence[dict[str, Any]], samples_ns: Sequence[int],
         window_s: Sequence[float], rate_key: str, rate_label: str, who: str) -> bool:
    """`latency_plot`, saying on stderr (as `who`) why it could not; whether it wrote the file."""
    try:
        latency_plot(path, title, series, samples_ns, window_s, rate_key, rate_label)
    except Exception as exc:  # a plot is a by-product: the numbers are already out
        print(f"{who}: cannot write the plot {path}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return False
    print(f"{who}: plot written to {path}", file=sys.stderr)
    return True
