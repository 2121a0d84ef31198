"""The run's pictures, drawn with matplotlib (imported only here, when one is drawn): the throughput of a
run (its report's series and `_throughput.png`, util/report.py) and the input-token histogram of --preflight.

    from util.plots import plot_throughput
    png = plot_throughput(report)      # PNG bytes
"""

import io
import math


def throughput_series(done: list, started: float, finished: float, bins: int = 40) -> dict:
    """Output tok/s over time, per replica and in total: each report's tokens counted when it was sent."""
    bin_s = max(1.0, math.ceil(max(finished - started, 1e-9) / bins))
    count = max(1, math.ceil(max(finished - started, 1e-9) / bin_s))
    per_replica: dict[str, list[float]] = {}
    for replica, _, tokens, at in done:
        index = min(count - 1, max(0, int((at - started) // bin_s)))
        per_replica.setdefault(replica, [0.0] * count)[index] += tokens / bin_s
    total = [sum(values) for values in zip(*per_replica.values())] if per_replica else [0.0] * count
    return {"bin_s": bin_s, "start_s": [i * bin_s for i in range(count)], "total": total,
            "per_replica": dict(sorted(per_replica.items()))}


def _figure():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(8, 4))


def _png(plt, fig) -> bytes:
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def plot_throughput(report: dict) -> bytes:
    """Output tok/s over the run, per replica and in total; a dotted line where a replica's engine was ready."""
    plt, fig, ax = _figure()
    series, scale = report["throughput"], 60 if report["wall_s"] > 600 else 1
    x = [t / scale for t in series["start_s"] + [series["start_s"][-1] + series["bin_s"]]]  # the last bin's end
    ready = {r["replica"]: r["ready_s"] for r in report["replicas"]}
    for replica, values in series["per_replica"].items():
        line, = ax.step(x, values + values[-1:], where="post", linewidth=1, label=f"replica {replica}")
        if replica in ready:  # before this line the replica's engine was starting
            ax.axvline(ready[replica] / scale, color=line.get_color(), linestyle=":", linewidth=1)
    ax.step(x, series["total"] + series["total"][-1:], where="post", linewidth=2.5, color="black", label="total")
    ax.set_xlabel(f"{'minutes' if scale == 60 else 'seconds'} since the pipeline started")
    ax.set_ylabel(f"output tokens / s ({series['bin_s']:g} s bins)")
    ax.set_title(f"{report['output_tokens']:,} output tokens in {report['wall_s']:,.0f} s, "
                 f"{len(series['per_replica'])} replica(s); dotted: a replica's engine is ready", fontsize=9)
    ax.legend(fontsize=8)
    return _png(plt, fig)


def histogram_png(histogram: list[dict], max_model_len: int | None, title: str) -> bytes:
    """Rows per input-token range; in red the ranges that reach max_model_len."""
    from matplotlib.ticker import MaxNLocator

    plt, fig, ax = _figure()
    over = [max_model_len is not None and b["to"] >= max_model_len - 1 for b in histogram]
    bars = ax.bar([f"{b['from']}-{b['to']}" for b in histogram], [b["rows"] for b in histogram],
                  color=["#c44e52" if o else "#4c72b0" for o in over])
    ax.bar_label(bars, fontsize=8)
    ax.set_xlabel("input tokens per row (prompt format applied)" +
                  (f"; red: reaches max_model_len {max_model_len}" if any(over) else ""))
    ax.set_ylabel("rows")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize=9)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right", fontsize=8)
    return _png(plt, fig)
