"""A finished run's output, read back: every row (those that succeeded and those under errors/), its
counts, and a few rows at a glance; and the run report. main.py prints both at the end of a run.

    rows = read_results("s3://bucket/run/").take(5)
    summarize(read_results("s3://bucket/run/"))        # {"rows": 100, "ok": 98, "errors": 2, ...}
    sample_rows("s3://bucket/run/")                     # [{"id": ..., "generated_text": ..., ...}, ...]
    print(format_report(report)); write_report(output_path, report)   # _report.json and _throughput.png
"""

import datetime
import json
import time

import pyarrow.dataset as pads
import pyarrow.json as pajson
import ray

from util import columns as col
from util.output import EMPTY_COUNTS, add_counts, data_files, output_dataset, output_format_of, row_counts
from util.storage import commit_file, resolve

REPORT_NAME, PLOT_NAME = "_report.json", "_throughput.png"


def read_results(output_path: str, output_format: str = "parquet") -> ray.data.Dataset:
    """Every row of the output, those that succeeded and those under errors/."""
    filesystem, path = resolve(output_path)
    if output_format == "parquet":
        return ray.data.read_parquet(path, filesystem=filesystem, file_extensions=["parquet"])
    # The core columns' types are given: a file whose `error`s are all null would read as null.
    schema = output_format_of(output_format).read_schema if output_format == "jsonl" else None
    return ray.data.read_json(path, filesystem=filesystem, file_extensions=["jsonl"],
                              **({"parse_options": pajson.ParseOptions(explicit_schema=schema)} if schema else {}))


def summarize(ds: ray.data.Dataset) -> dict:
    """Row and token counts of a finished run's output."""
    total = dict(EMPTY_COUNTS)
    for batch in ds.select_columns([col.ERROR, col.NUM_INPUT_TOKENS, col.NUM_GENERATED_TOKENS]).iter_batches(
            batch_format="pyarrow", batch_size=4096):
        add_counts(total, row_counts(batch))
    return {"rows": total["ok"] + total["error"], "ok": total["ok"], "errors": total["error"],
            "input_tokens": total["input_tokens"], "output_tokens": total["output_tokens"]}


GLANCE_COLUMNS = (col.ID, col.GENERATED_TEXT, col.FINISH_REASON, col.NUM_GENERATED_TOKENS, col.ERROR)


def glance(row: dict, columns: tuple = GLANCE_COLUMNS) -> dict:
    """The columns of an output row worth a look; a long list (an embedding) as its size and first values."""
    def short(value):
        return f"{len(value)} values {value[:3]} ..." if isinstance(value, list) and len(value) > 8 else value

    return {k: short(row.get(k)) for k in columns}


def sample_rows(output_path: str, output_format: str = "parquet", count: int = 3,
                columns: tuple | None = None) -> list[dict]:
    """A few rows of the output, each at a glance (`columns`, else GLANCE_COLUMNS), read on the driver:
    quicker than starting a Ray read."""
    fmt = output_format_of(output_format)
    if fmt.preview is dict:  # rows as the pipeline wrote them
        files, _ = output_dataset(output_path, output_format)
        rows = files.head(count).to_pylist() if files else []
    else:  # records of a feature's format, their types as they come
        filesystem, paths = data_files(output_path, output_format)
        rows = [fmt.preview(record) for record in
                pads.dataset(paths, filesystem=filesystem, format="json").head(count).to_pylist()] if paths else []
    return [glance(row, columns or GLANCE_COLUMNS) for row in rows]


def share(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def prefix_cache_report(snapshot: dict, row_order: str | None, sample_shared_share: float | None) -> dict:
    """How the prefix cache worked: the share of prompt tokens vLLM's cache held (its per-request counts), and
    beside it how much the prompts share: measured over every grouped row, or over the first rows' sample."""
    counts = snapshot.get("prefix_cache", {}).values()
    prompt, cached = sum(c[0] for c in counts), sum(c[1] for c in counts)
    grouped_prompt, grouped_shared = snapshot.get("grouped_tokens", [0, 0])
    return {"row_order": row_order, "prompt_tokens": prompt, "cached_tokens": cached,
            "cached_share": share(cached, prompt), "shared_share": share(grouped_shared, grouped_prompt),
            "sample_shared_share": None if sample_shared_share is None else round(sample_shared_share, 4)}


def timeline(snapshot: dict, marks: dict, written: float, now: float) -> dict:
    """Seconds from launch (marks["launched"]) to each step of the run: the driver's `marks` (ray.init, the
    plan), the first replica's start (its actor, vLLM imported, its engine ready), the first and last row, the
    output committed (`written`) and the report (`now`, about the exit); and each replica's start."""
    if "launched" not in marks:
        return {}
    since = lambda at: round(at - marks["launched"], 1)  # noqa: E731
    starts = sorted(snapshot.get("starts", {}).items(), key=lambda item: (item[1]["engine_ready"], item[0]))
    rows = [at for _, count, _, at in snapshot["done"] if count]
    steps = {**{name: at for name, at in marks.items() if name != "launched"}, **(starts[0][1] if starts else {}),
             **({"first_row": min(rows), "last_row": max(rows)} if rows else {}), "written": written, "report": now}
    return {"steps": {name: since(at) for name, at in sorted(steps.items(), key=lambda item: item[1])},
            "replicas": {replica: {name: since(at) for name, at in start.items()} for replica, start in starts}}


def build_report(snapshot: dict, written: dict, started: float, finished: float, gpus: float,
                 row_order: str | None = None, sample_shared_share: float | None = None,
                 marks: dict | None = None) -> dict:
    from util.plots import throughput_series

    wall = max(finished - started, 1e-9)
    replicas = []
    # In the order the replicas joined (an autoscaling pool's later ones last), each with its join time
    # (when its engine was ready, from the run's start) and its own pace from then to its last row.
    for replica, ready in sorted(snapshot["ready"].items(), key=lambda item: (item[1], item[0])):
        mine = [d for d in snapshot["done"] if d[0] == replica]
        tokens, last = sum(d[2] for d in mine), max((d[3] for d in mine), default=None)
        busy = None if last is None else last - ready
        prompt, cached = snapshot.get("prefix_cache", {}).get(replica, (0, 0))
        replicas.append({"replica": replica, "rows": sum(d[1] for d in mine), "output_tokens": tokens,
                         "prefix_cache_hit_rate": share(cached, prompt),
                         "output_tok_per_s": round(tokens / busy, 1) if busy and busy > 0 else None,
                         "ready_s": round(ready - started, 1),
                         "last_batch_s": None if last is None else round(last - started, 1)})
    return {"rows": {"ok": written["ok"], "error": written["error"], **snapshot.get("counted", {})},
            "input_tokens": written["input_tokens"], "output_tokens": written["output_tokens"],
            "wall_s": round(wall, 1), "output_tok_per_s": round(written["output_tokens"] / wall, 1),
            "gpus": gpus, "gpu_hours": round(wall * gpus / 3600, 3), "replicas": replicas,
            "survived": dict(snapshot.get("survived", {})),
            "prefix_cache": prefix_cache_report(snapshot, row_order, sample_shared_share),
            "timeline": timeline(snapshot, marks or {}, finished, time.time()),
            **{name: datetime.datetime.fromtimestamp(at, datetime.timezone.utc).isoformat(timespec="seconds")
               for name, at in (("started", started), ("finished", finished))},
            "throughput": throughput_series(snapshot["done"], started, finished)}  # its plot's series


def format_report(report: dict) -> str:
    lines = ["run report",
             "  rows           " + ", ".join(f"{n:,} {name.replace('_', ' ')}" for name, n in report["rows"].items()),
             f"  input tokens   {report['input_tokens']:,}",
             f"  output tokens  {report['output_tokens']:,}",
             f"  output tok/s   {report['output_tok_per_s']:,.1f} overall (wall time, engine start included)",
             f"  wall time      {datetime.timedelta(seconds=round(report['wall_s']))}",
             f"  GPU-hours      {report['gpu_hours']:,.3f} ({report['gpus']:g} GPUs x wall time)",
             "  survived       " + ", ".join(f"{n:,} {name.replace('_', ' ').replace('rerun', 'run again')}"
                                              for name, n in report["survived"].items())]
    if (cache := report.get("prefix_cache")) and cache["prompt_tokens"]:  # rows a generating engine ran
        lines.append(f"  prefix cache   {percent(cache['cached_share'])} of {cache['prompt_tokens']:,} prompt tokens "
                     f"came from the cache; rows {cache['row_order'] or 'input'} order, prompts sharing "
                     f"{percent(cache['shared_share'] if cache['shared_share'] is not None else cache['sample_shared_share'])}"
                     f"{'' if cache['shared_share'] is not None else ' (first rows)'}")
    if steps := report.get("timeline", {}).get("steps"):  # from launch, the first replica's start among them
        lines.append("  timeline       " + ", ".join(f"{name.replace('_', ' ')} {at:.1f}s" for name, at in steps.items())
                     + " (from launch)")
    if report["replicas"]:  # "joined at": seconds from the run's start to the replica's engine being ready
        lines.append(f"  {'replica':<10} {'rows':>10} {'output tokens':>14} {'output tok/s':>13} {'cache hits':>10} "
                     f"{'joined at':>9}")
        for r in report["replicas"]:
            speed = "-" if r["output_tok_per_s"] is None else f"{r['output_tok_per_s']:,.1f}"
            lines.append(f"  {r['replica']:<10} {r['rows']:>10,} {r['output_tokens']:>14,} {speed:>13} "
                         f"{percent(r.get('prefix_cache_hit_rate')):>10} {r['ready_s']:>8.1f}s")
    return "\n".join(lines)


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def write_report(output_path: str, report: dict) -> list[str]:
    """`_report.json` and the plot of its throughput, `_throughput.png`, beside the output; their paths."""
    from util.plots import plot_throughput  # matplotlib: only when a report is written

    filesystem, path = resolve(output_path)
    files = {REPORT_NAME: json.dumps(report, indent=2).encode() + b"\n", PLOT_NAME: plot_throughput(report)}
    for name, data in files.items():
        commit_file(filesystem, f"{path}/{name}", data)
    return [f"{output_path.rstrip('/')}/{name}" for name in files]
