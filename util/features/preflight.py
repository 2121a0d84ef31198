"""Check a job before it runs, on CPU, without an engine (a feature, util/parts.py): would the input be
accepted, how many rows would fail, how many tokens would it generate, and how many GPU-hours and replicas
would that take.

    python main.py --preflight --smoke                                  # the smoke job's input, tiny model
    python main.py --preflight --input-path s3://bucket/prompts.jsonl --text-column question --deadline-hours 4
    python main.py --preflight --input-path prompts.jsonl --throughput-tok-per-s 2500 --preflight-report-dir pre/

It reads the input as the run would (util.reading), applies the run's checks (output path writable, same
settings as an earlier output, file errors, duplicate ids: util.scan.check_before_run), and formats and
tokenizes every row with the run's own stages (util.pipeline), then checks each row as the replica would
(the job's features' checks: util/parts.py) and counts its token budget. It prints, and writes as
preflight.json and input_tokens.png: rows, an input-token histogram, rows that would fail (empty, over
max_model_len, invalid sampling_params, a LoRA adapter that cannot be used) by reason, and the estimates. Reports go
to --preflight-report-dir, else to <output-path>/_preflight/, which readers of the output skip (a
leading `_`, like the manifest's).

Exit codes, the run's own: 0 it would pass; 1 more rows would fail than --max-error-fraction allows;
2 it would be refused (bad input), with `error: <message>` on stderr.

Estimates. Output tokens are an upper bound: each row's max_tokens (the job's, or the row's own
`sampling_params`), capped at what max_model_len leaves after the prompt, as vLLM caps it, plus a retry's
where --repair may run the row once more (util/features/repair.py), times the row's n samples. GPU-hours =
output tokens / (output tok/s of one replica) x GPUs per replica; engine start (about a minute,
BENCHMARKS.md) is not included. The replica throughput is --throughput-tok-per-s, else the one measured
by the earlier run into the same output (its _report.json, same settings), else DEFAULT_TOK_PER_S.
An embedding, score or classify job (--task embed, score, classify) generates nothing: its work is the input
tokens, and GPU-hours are estimated only from --throughput-tok-per-s (input tok/s of one replica), since none was
measured.
"""

import dataclasses
import datetime
import json
import math
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from util import columns as col
from util.errors import (EXIT_FAILED, EXIT_OK, EXIT_REFUSED, INVALID_SAMPLING, ROW_ERRORS, InputError, RowError,
                         refusal_reason, row_error)
from util.parts import Part, flag
from util.output import output_counts
from util.pipeline import Stage, build_pipeline, pipeline_stages
from util.predictor import checked_request
from util.results import REPORT_NAME
from util.resources import TASK_CPUS
from util.scan import check_before_run
from util.storage import commit_file, join, resolve

if TYPE_CHECKING:
    from util.config import Config
    from util.plan import Plan

PREFLIGHT_FOLDER = "_preflight"
# BENCHMARKS.md's median for this pipeline: one replica on 1x H200, a Mistral-7B-shaped model, ~100-token
# prompts, 16-512 output tokens, 3 runs at max_num_seqs 1,024 (vLLM's default, which every card but the H200
# keeps; the H200's 2,048 measured 18,909). Smaller GPUs (A10G, L4) are several times slower, so pass
# --throughput-tok-per-s for them.
DEFAULT_TOK_PER_S = 16_515.0
DEFAULT_TOK_PER_S_SOURCE = "default: BENCHMARKS.md, this pipeline's median on 1x H200, Mistral-7B shape"
MAX_OUTPUT_TOKENS = "max_output_tokens"  # the column the budget stage adds
NO_EMBED_THROUGHPUT = ("not estimated: no embed, score or classify throughput is measured; pass --throughput-tok-per-s, "
                       "the input tokens a second of one replica")


def row_error_kind(message: str) -> str:
    """The kind of a row's error message (a key of ROW_ERRORS), or the message itself if it is none."""
    return next((kind for kind, template in ROW_ERRORS.items() if message.startswith(template.split("{")[0])), message)


@dataclasses.dataclass
class Flags:
    preflight: bool = flag("Check the input and estimate the run (rows that would fail, input-token histogram, output "
                           "tokens, GPU-hours, replicas) on CPU, without an engine; exit 0 it would pass, 1 too many "
                           "rows would fail, 2 it would be refused.", default=False)
    preflight_report_dir: str | None = flag("Where --preflight writes preflight.json and input_tokens.png. Default: "
                                            "<output-path>/_preflight/, which readers skip.", default=None)
    throughput_tok_per_s: float | None = flag("Output tok/s of one replica, for --preflight's GPU-hours. Default: the "
                                              "earlier run's measured number in the output's _report.json, else 16,515 "
                                              "(BENCHMARKS.md: 1x H200, 7B). For --task embed, score, classify: input tok/s, no "
                                              "default.", default=None)
    deadline_hours: float | None = flag("For --preflight: the replicas needed to finish within this many hours.",
                                        default=None)


class Preflight(Part):
    """--preflight replaces the run (main.py calls plan.run_instead); it adds nothing to a row."""

    def __init__(self):
        self.plan = {"run_instead": run_preflight}


def part(plan: "Plan") -> Preflight | None:
    return Preflight() if plan.cfg.preflight else None


def row_budgets(batch: pa.Table, job_sampling: dict | None, max_model_len: int | None, parts: list = ()) -> pa.Table:
    """Ray Data stage after the formatter: per row, why it would fail (the checks the replica makes before
    its engine does: the job's features' `parts`), or the most tokens it may generate. Runs on the workers,
    so only these small columns reach the driver. `job_sampling` None: a task that generates nothing
    (embeddings), whose replicas read no sampling_params: only the formatter's errors fail a row."""
    errors, budgets = [], []
    for row in batch.to_pylist():
        error, budget = row[col.ERROR], 0
        if error is None and job_sampling is not None:
            try:
                sampling = (request := checked_request(row, job_sampling, parts)).sampling
                budget = int(sampling["max_tokens"])
                budget = budget if max_model_len is None else min(budget, max(0, max_model_len - row[col.NUM_INPUT_TOKENS]))
                budget += request.state.get("retry_max_tokens") or 0  # a cut row run once more (util/features/repair.py)
                budget *= int(sampling.get("n") or 1)  # each of the row's n samples
            except RowError as refused:
                error = str(refused)
            except (TypeError, ValueError) as bad:
                error = row_error(INVALID_SAMPLING, reason=f"max_tokens {sampling['max_tokens']!r} ({bad})")
        errors.append(error)
        budgets.append(budget)
    return pa.table({col.ID: batch[col.ID], col.NUM_INPUT_TOKENS: batch[col.NUM_INPUT_TOKENS],
                     col.ERROR: pa.array(errors, pa.string()), MAX_OUTPUT_TOKENS: pa.array(budgets, pa.int64())})


def token_histogram(values: np.ndarray, counted: bool = False) -> list[dict]:
    """Rows per input-token range, in ranges that double: 0-15, 16-31, 32-63, ... `values`: one token
    count per row, or (counted=True) the number of rows for each token count."""
    weights = values if counted else None
    values = np.arange(len(values)) if counted else values
    present = values[weights > 0] if counted else values
    top = max(16, int(present.max()) + 1 if present.size else 0)
    edges = [0] + [2 ** k for k in range(4, math.ceil(math.log2(top)) + 1)]
    rows, _ = np.histogram(values, bins=edges, weights=weights)
    return [{"from": lo, "to": hi - 1, "rows": int(n)} for lo, hi, n in zip(edges, edges[1:], rows)]


def estimate(output_tokens: int, tok_per_s: float, gpus_per_replica: float, concurrency: int,
             deadline_hours: float | None, input_tokens: int | None = None) -> dict:
    """GPU-hours for `output_tokens` at `tok_per_s` per replica, the hours with `concurrency` replicas
    (an autoscaling pool's most: once grown, it runs at that), and the replicas a deadline needs
    (data-parallel replicas scale about linearly: 1.80x for two, BENCHMARKS.md). `input_tokens`: for an
    embedding job, the tokens to embed, which its tok/s counts instead."""
    replica_hours = (output_tokens if input_tokens is None else input_tokens) / tok_per_s / 3600
    replicas = None if deadline_hours is None else max(1, math.ceil(round(replica_hours / deadline_hours, 9)))
    return {"output_tokens_at_most": output_tokens, "throughput_tok_per_s": tok_per_s,
            "throughput_counts": "output tokens" if input_tokens is None else "input tokens",
            "gpus_per_replica": gpus_per_replica, "replica_hours": replica_hours,
            "gpu_hours": replica_hours * gpus_per_replica, "concurrency": concurrency,
            "hours_at_concurrency": replica_hours / concurrency, "deadline_hours": deadline_hours,
            "replicas_for_deadline": replicas,
            "gpus_for_deadline": None if replicas is None else replicas * gpus_per_replica}


def replica_throughput(cfg: "Config", output_path: str, task: str = "generate") -> tuple[float | None, str]:
    """Output tok/s of one replica (input tok/s for an embedding job), and where the number comes from;
    None for an embedding job without --throughput-tok-per-s, for which nothing was measured."""
    if cfg.throughput_tok_per_s is not None:
        if not cfg.throughput_tok_per_s > 0:
            raise InputError(f"--throughput-tok-per-s must be > 0, got {cfg.throughput_tok_per_s}")
        return cfg.throughput_tok_per_s, "--throughput-tok-per-s"
    if task != "generate":
        return None, NO_EMBED_THROUGHPUT
    if not cfg.overwrite:  # the earlier output was made with these settings (check_fingerprint)
        filesystem, path = resolve(output_path)
        try:
            with filesystem.open_input_stream(f"{path}/{REPORT_NAME}") as stream:
                earlier = json.loads(stream.read())
            speeds = [r["output_tok_per_s"] for r in earlier["replicas"] if r["output_tok_per_s"]]
        except (FileNotFoundError, KeyError, ValueError):
            speeds = []
        if speeds:
            return sum(speeds) / len(speeds), f"measured: the earlier run's replicas, {output_path}/{REPORT_NAME}"
    return DEFAULT_TOK_PER_S, DEFAULT_TOK_PER_S_SOURCE


def budget_stage(plan: "Plan") -> Stage:
    """After the formatter: per row, why it would fail, or the most tokens it may generate."""
    return Stage("budget", needs=(col.ID, col.NUM_INPUT_TOKENS, col.ERROR), adds=(MAX_OUTPUT_TOKENS,),
                 drops=(col.PROMPT, col.PROMPT_TOKEN_IDS), map_batches=dict(
                     fn=row_budgets, batch_format="pyarrow", num_cpus=TASK_CPUS,
                     fn_kwargs={"job_sampling": plan.sampling if plan.task == "generate" else None,
                                "max_model_len": plan.max_model_len, "parts": plan.parts}))


def inspect_input(plan: "Plan") -> dict:
    """Everything a run checks before it starts, then every row formatted and tokenized. Raises
    InputError (or ValueError for a bad flag) where the run would be refused."""
    checked = check_before_run(plan)  # as main.py checks before a run
    stages = pipeline_stages(plan, checked.done, until="format") + [budget_stage(plan)]
    ds = build_pipeline(plan, checked.done, stages=stages)
    # Rows per input-token count: its size grows with the longest prompt, not with the rows.
    counts, output_tokens, failing, examples = np.zeros(0, np.int64), 0, {}, {}
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        batch_counts = np.bincount(batch[col.NUM_INPUT_TOKENS].to_numpy(zero_copy_only=False))
        counts = np.pad(counts, (0, max(0, len(batch_counts) - len(counts))))
        counts[: len(batch_counts)] += batch_counts
        output_tokens += int(batch[MAX_OUTPUT_TOKENS].to_numpy().sum())
        for row_id, error in zip(batch[col.ID].to_pylist(), batch[col.ERROR].to_pylist()):
            if error is not None:
                kind = row_error_kind(error)
                failing[kind] = failing.get(kind, 0) + 1
                if len(examples.setdefault(kind, [])) < 5:  # a few ids to look at, not a second output
                    examples[kind].append(row_id)
    rows, present = int(counts.sum()), np.flatnonzero(counts)
    return {"rows": checked.rows, "already_done": checked.already_done, "to_run": rows,
            "use_gpu": plan.choice.use_gpu, "max_model_len": plan.max_model_len,
            "input_tokens": {"total": int((counts * np.arange(len(counts))).sum()),
                             "min": int(present[0]) if rows else None,
                             "median": median_of_counts(counts) if rows else None,
                             "max": int(present[-1]) if rows else None,
                             "histogram": token_histogram(counts, counted=True)},
            "failing": {"rows": sum(failing.values()), "by_reason": failing, "examples": examples},
            "output_tokens_at_most": output_tokens}


def median_of_counts(counts: np.ndarray) -> float:
    """The median of the values whose occurrences `counts` holds (counts[v] = rows with value v)."""
    total, cumulative = int(counts.sum()), np.cumsum(counts)
    low = int(np.searchsorted(cumulative, (total - 1) // 2 + 1))
    high = int(np.searchsorted(cumulative, total // 2 + 1))
    return (low + high) / 2


def format_preflight(result: dict) -> str:
    lines = [f"preflight: {result['input_path']} -> {result['output_path']}"]
    if result["verdict"] == "refused":
        return "\n".join(lines + [f"  verdict        refused (exit 2): {result['reason']}"])
    tokens, failing, est = result["input_tokens"], result["failing"], result["estimate"]
    lines += [f"  engine         {'GPU' if result['use_gpu'] else 'CPU (no GPU in this Ray cluster: the CPU engine settings apply)'}",
              f"  rows           {result['rows']:,} ({result['already_done']:,} already done, "
              f"{result['to_run']:,} to run)"]
    if result["to_run"]:
        lines.append(f"  input tokens   {tokens['total']:,} (min {tokens['min']:,}, median {tokens['median']:,.0f}, "
                     f"max {tokens['max']:,}; max_model_len {result['max_model_len']})")
        widest = max(b["rows"] for b in tokens["histogram"]) or 1
        lines.append(f"  {'input tokens':<15} {'rows':>8}")
        for b in tokens["histogram"]:
            bar = "#" * math.ceil(40 * b["rows"] / widest)
            lines.append(f"  {b['from']:>7,}-{b['to']:<7,} {b['rows']:>8,}  {bar}")
    reasons = ", ".join(f"{n:,} {kind}" for kind, n in sorted(failing["by_reason"].items())) or "none"
    lines += [f"  would fail     {failing['rows']:,} rows ({reasons}): {failing['fraction']:.1%} of the output's "
              f"rows after the run; --max-error-fraction {result['max_error_fraction']}"]
    if result["task"] != "generate":
        lines.append(f"  output tokens  none (--task {result['task']}: each row's input tokens are the work)")
    else:
        lines.append(f"  output tokens  at most {est['output_tokens_at_most']:,} (each row's max_tokens, and any "
                     "retry's, capped by max_model_len)")
    if est is None:
        lines.append(f"  GPU-hours      {result['throughput_source']}")
    else:
        lines += [f"  throughput     {est['throughput_tok_per_s']:,.0f} {est['throughput_counts'].replace('tokens', 'tok/s')} "
                  f"per replica ({result['throughput_source']})",
                  f"  GPU-hours      {est['gpu_hours']:,.3f} at most ({est['gpus_per_replica']:g} GPU(s) per replica); "
                  f"{datetime.timedelta(seconds=round(est['hours_at_concurrency'] * 3600))} with {est['concurrency']} "
                  f"replica(s), engine start excluded"]
    if est is not None and est["deadline_hours"] is not None:
        lines.append(f"  deadline       {est['deadline_hours']:g} h needs {est['replicas_for_deadline']:,} "
                     f"replica(s), {est['gpus_for_deadline']:g} GPU(s)")
    verdict = "pass (exit 0)" if result["exit_code"] == 0 else f"{result['reason']} (exit 1)"
    lines.append(f"  verdict        {verdict}")
    return "\n".join(lines)


def save_preflight(report_dir: str, result: dict) -> list[str]:
    """preflight.json (and, once rows were tokenized, input_tokens.png) under `report_dir`."""
    filesystem, path = resolve(report_dir)
    files = {"preflight.json": json.dumps(result, indent=2).encode() + b"\n"}
    if "input_tokens" in result:
        title = (f"{result['to_run']:,} rows, {result['input_tokens']['total']:,} input tokens; "
                 f"{result['failing']['rows']:,} would fail")
        from util.plots import histogram_png

        files["input_tokens.png"] = histogram_png(result["input_tokens"]["histogram"], result["max_model_len"], title)
    for name, data in files.items():
        commit_file(filesystem, f"{path}/{name}", data)
    return [join(report_dir, name) for name in files]


def run_preflight(plan: "Plan") -> int:
    """`main.py --preflight`: check, estimate, print, write the report; the exit code the run would have.
    A refusal is reported (verdict "refused") and raised again, for main.py's exit code 2."""
    cfg, output_path = plan.cfg, plan.output_path
    report_dir = cfg.preflight_report_dir or join(output_path, PREFLIGHT_FOLDER)
    result = {"input_path": cfg.input_path or "(the sample prompts)", "output_path": output_path,
              "task": plan.task, "max_error_fraction": cfg.max_error_fraction}
    try:
        if cfg.deadline_hours is not None and not cfg.deadline_hours > 0:
            raise InputError(f"--deadline-hours must be > 0, got {cfg.deadline_hours}")
        tok_per_s, source = replica_throughput(cfg, output_path, plan.task)
        result.update(inspect_input(plan))
    except Exception as error:  # refused as the run would refuse it (main.py: exit code 2)
        reason = refusal_reason(error)
        if reason is not None:
            result.update(verdict="refused", exit_code=EXIT_REFUSED, reason=str(reason))
            print(format_preflight(result))
            try:
                save_preflight(report_dir, result)
            except OSError:
                pass  # an unwritable output path is the refusal itself; the message says so
        raise

    earlier = {"ok": 0, "error": 0} if cfg.overwrite else output_counts(output_path, cfg.output_format)
    failing, output_tokens = result["failing"], result.pop("output_tokens_at_most")
    failing["fraction"] = (earlier["error"] + failing["rows"]) / max(1, earlier["ok"] + earlier["error"] + result["to_run"])
    too_many = failing["fraction"] > cfg.max_error_fraction
    result.update(
        verdict="too many failing rows" if too_many else "pass", exit_code=EXIT_FAILED if too_many else EXIT_OK,
        reason=(f"{failing['fraction']:.0%} of the output's rows would fail, more than --max-error-fraction "
                f"{cfg.max_error_fraction} allows") if too_many else None,
        throughput_source=source,
        estimate=None if tok_per_s is None else estimate(
            output_tokens, tok_per_s, plan.gpus_per_replica, plan.most_replicas, cfg.deadline_hours,
            input_tokens=result["input_tokens"]["total"] if plan.task != "generate" else None))
    print(format_preflight(result))
    print(f"  report         {', '.join(save_preflight(report_dir, result))}")
    return result["exit_code"]
