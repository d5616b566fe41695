"""PNG plots of a benchmark (or a simulation): latency CDFs against the SLOs, attainment against the request rate,
and a timeline of load, pool sizes and rolling attainment.

Each function takes plain data (records, (rate, attainment) pairs, (t, value) pairs) and writes one file. matplotlib
is imported inside the functions and draws on an Agg canvas of its own: no pyplot, no global backend switch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pdserve.bench.metrics import SLO, RequestRecord


def plot_latency_cdfs(records: Sequence[RequestRecord], slo: SLO, path: str, title: str = "") -> None:
    """CDFs of TTFT, TPOT and ITL over the successful requests, with the SLO lines."""
    done = [r for r in records if r.ok]
    panels = [("TTFT (s)", [r.ttft_s for r in done], slo.ttft_s),
              ("TPOT (s)", [r.tpot_s for r in done], slo.tpot_s),
              ("ITL (s)", [x for r in done for x in r.itl_s], slo.tpot_s)]
    fig, axes = _figure(1, 3, (15, 4))
    for ax, (label, values, limit) in zip(axes, panels):
        values = sorted(v for v in values if math.isfinite(v))
        if values:
            ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.axvline(limit, color="red", linestyle="--", label=f"SLO {limit:g} s")
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests" if label != "ITL (s)" else "fraction of tokens")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    _save(fig, path, title or f"{len(done)} of {len(records)} requests succeeded")


def plot_attainment_vs_rate(points: Sequence[tuple[float, float]], goodput: float, path: str,
                            target: float = 0.9, title: str = "") -> None:
    """SLO attainment at each measured rate, the target line, and the goodput marked."""
    fig, (ax,) = _figure(1, 1, (7, 4.5))
    ordered = sorted(points)
    if ordered:
        ax.plot([r for r, _ in ordered], [a * 100 for _, a in ordered], marker="o")
    ax.axhline(target * 100, color="red", linestyle="--", label=f"{target:.0%} target")
    if goodput > 0:
        ax.axvline(goodput, color="green", linestyle=":", label=f"goodput {goodput:.3g} req/s")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    _save(fig, path, title or "SLO attainment vs request rate")


def plot_timeline(arrivals: Sequence[float], pool_samples: Sequence, attainment_series: Sequence[tuple[float, float]],
                  path: str, title: str = "", bin_s: float = 1.0, target: float = 0.9) -> None:
    """Three panels over time: requests arriving per second, pool sizes, rolling attainment.

    `pool_samples` are `PoolSample`s or (t, n_prefill, n_decode) tuples."""
    fig, axes = _figure(3, 1, (11, 8), sharex=True)
    load, pools, attain = axes
    if arrivals:
        bins = int(max(arrivals) // bin_s) + 1
        counts = [0] * bins
        for t in arrivals:
            counts[int(t // bin_s)] += 1
        load.bar([i * bin_s for i in range(bins)], [c / bin_s for c in counts], width=bin_s, align="edge",
                 color="gray")
    load.set_ylabel("arrivals (req/s)")
    rows = [_pool_row(s) for s in pool_samples]
    if rows:
        from matplotlib.ticker import MaxNLocator

        times = [r[0] for r in rows]
        pools.step(times, [r[1] for r in rows], where="post", label="prefill", linewidth=2)
        pools.step(times, [r[2] for r in rows], where="post", label="decode", linewidth=2, linestyle="--")
        if any(r[3] for r in rows):
            pools.step(times, [r[3] for r in rows], where="post", label="colocated", linestyle=":")
        pools.set_ylim(-0.2, max(max(r[1:]) for r in rows) + 0.8)
        pools.yaxis.set_major_locator(MaxNLocator(integer=True))
        pools.legend(loc="upper left")
    else:
        pools.text(0.5, 0.5, "no pool samples", ha="center", va="center", transform=pools.transAxes)
    pools.set_ylabel("ready workers")
    if attainment_series:
        attain.plot([t for t, _ in attainment_series], [a * 100 for _, a in attainment_series])
    attain.axhline(target * 100, color="red", linestyle="--")
    attain.set_ylim(0, 102)
    attain.set_ylabel("SLO attainment (%)")
    attain.set_xlabel("time (s)")
    for ax in axes:
        ax.grid(alpha=0.3)
    _save(fig, path, title)


def plot_scenario_study(rows: Sequence[dict], path: str, title: str = "") -> None:
    """One column per scenario (ordered by headroom): the model's ceiling for any controller, and the controller's
    goodput over the best static split's from the even split and from the best static split."""
    ordered = sorted(rows, key=lambda r: (r["headroom"], r["ratio_from_best"]))
    fig, (ax,) = _figure(1, 1, (10, 4))
    xs = range(len(ordered))
    ax.bar(xs, [r["headroom"] for r in ordered], color="0.85", label="ceiling: each phase on its own best split")
    ax.plot(xs, [r["ratio_from_best"] for r in ordered], "o", color="tab:blue", label="controller from the best split")
    ax.plot(xs, [r["ratio"] for r in ordered], "x", color="tab:red", label="controller from the even split")
    for level, style in ((1.0, "-"), (0.95, ":"), (1.15, "--")):
        ax.axhline(level, color="0.4", linestyle=style, linewidth=0.8)
    ax.set_xticks(list(xs), [str(r["seed"]) for r in ordered], fontsize=7)
    ax.set_xlabel("scenario seed")
    ax.set_ylabel("goodput / best static split's")
    ax.set_ylim(0.4, max(1.4, max(r["headroom"] for r in ordered) + 0.05))
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, path, title)


def _pool_row(sample) -> tuple[float, int, int, int]:
    if hasattr(sample, "n_prefill"):
        return sample.t_s, sample.n_prefill, sample.n_decode, getattr(sample, "n_both", 0)
    t, n_prefill, n_decode, *rest = sample
    return t, n_prefill, n_decode, rest[0] if rest else 0


def _figure(rows: int, cols: int, size: tuple[float, float], sharex: bool = False):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, sharex=sharex, squeeze=False)
    return fig, list(axes.flat)


def _save(fig, path: str, title: str) -> None:
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
