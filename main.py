"""Offline batch LLM inference with Ray Data and vLLM: read prompts, format them for the model, run vLLM
on every GPU of the Ray cluster, and write one output row per input row.

    python main.py --smoke              # offline on CPU with a small local model (--verbose: every log line)
    python main.py --input-path assets/prompts_100.txt   # 100 prompts, Mistral-7B-Instruct, 4 GPUs
    python main.py --input-path s3://my-bucket/prompts.jsonl --text-column question --max-tokens 256
    python main.py --preflight --input-path prompts.jsonl --deadline-hours 4   # check and estimate, no GPU
    python main.py --input-path batch_input.jsonl --input-format openai       # an OpenAI Batch API file
    python main.py --input-path prompts.jsonl --json-schema schema.json       # structured (JSON) output
    python main.py --input-path corpus.jsonl --task embed                    # an `embedding` per row
    python main.py --input-path photos.parquet --image-column image --model llava-hf/llava-1.5-7b-hf  # images
    anyscale job submit -f job.yaml                      # the same as an Anyscale job

Exit codes: 0 done; 1 a crash, or more failed rows than --max-error-fraction allows (all rows still written);
2 bad input, `error: <message>` on stderr (util/errors.py). Features: parts the plan adds when asked (util/parts.py).
"""

import sys
import time

LAUNCHED = time.time()  # the run's timeline counts from here, imports included (_report.json)
import ray  # noqa: E402

from util.config import Config, parse_args, smoke_config
from util.errors import EXIT_FAILED, EXIT_OK, EXIT_REFUSED, failure_reason, refusal_reason
from util.resume import Manifest
from util.output import EMPTY_COUNTS, delete_output, output_counts, write_results
from util.pipeline import order_rows, pipeline_stages, read_input
from util.plan import make_plan
from util.report import ProgressReporter, check_accounting, over_error_budget
from util.scan import ScanBeside, check_output


def run(cfg: Config, replicas=None) -> int:
    """One job. `replicas`: engines already running (util/features/replica_pool.py) to answer it, else its own."""
    cfg = smoke_config(cfg) if cfg.smoke else cfg
    marks = {"launched": LAUNCHED if __name__ == "__main__" else time.time()}  # called in a process of its own?

    # What the workers get (util/replica/workers.py): a gated model's token, by a setup hook (never a file), log levels.
    from util.replica.workers import prompt_for_hugging_face_token, ray_init_kwargs, worker_runtime_env

    token = prompt_for_hugging_face_token(cfg.model, interactive=False)
    ray.init(**ray_init_kwargs(worker_runtime_env(token), cfg.verbose))  # vLLM and Ray: warnings up
    marks["ray_init"] = time.time()

    # Plan: output path, accelerator, engine arguments, sampling, prompt format, the job's features, fingerprint,
    # resolved once (util/plan.py). The output can be written; an earlier one with the same fingerprint resumes.
    plan, marks["plan"] = make_plan(cfg), time.time()
    if plan.run_instead:  # a feature that replaces the run: --preflight checks and estimates, no engine
        return plan.run_instead(plan)
    done = check_output(plan)
    manifest = Manifest(plan.output_path, plan.fingerprint, plan.provenance, cfg.overwrite)  # how rows were made

    def release(scan) -> bool:  # the input passed its check: rows may run now (False: none is left to run)
        if cfg.overwrite:
            delete_output(plan.output_path)
        manifest.start(input=scan.rows, already_done=scan.already_done)
        progress.release(scan.rows - scan.already_done)
        return scan.rows > scan.already_done

    try:
        started, written = time.perf_counter(), dict(EMPTY_COUNTS)
        order_rows(plan, done)  # rows sharing a long prompt prefix sorted together, where it pays (util/grouping.py)
        marks["row_order"] = time.time()
        # The replicas start their engines now, while one distributed pass checks that the input reads cleanly,
        # with unique ids (util/scan.py). They answer no row until it passes; a refusal fails their first batch.
        with ProgressReporter(None, cfg.progress_interval_s, plan.gpus_held, held=True) as progress, \
                ScanBeside(plan, done, release, progress.stop) as checking:
            # 1. Read, without the rows an earlier run wrote. Nothing runs yet: Ray Data streams every stage.
            # 2. Format (the chat template, tokenized once, on CPU) and 3. generate (`concurrency` vLLM
            #    replicas, several batches in flight each), with the stages the job's features add.
            ds = read_input(plan, done)
            for stage in replicas.stages(plan, done) if replicas else pipeline_stages(plan, done):
                ds = stage.apply(ds)  # format, (group), cut_blocks, predict (util/pipeline.py)
            # 4. Write: each write task commits its file whole, so a killed run resumes from what it wrote.
            written = write_results(ds, plan.output_path, cfg.output_format, rows_per_file=plan.rows_in_flight,
                                    columns=plan.columns)
        scan, elapsed = checking.scan, time.perf_counter() - started
        report = progress.report(written, plan, marks) if scan.rows > scan.already_done else None
        # Account for every input row (written now, ok or failed, or already there), then the error budget.
        check_accounting(scan.rows, written, scan.already_done)
        output = output_counts(plan.output_path, cfg.output_format)
        failure = over_error_budget(output, cfg.max_error_fraction, plan.output_path)
    except BaseException as error:
        manifest.fail(failure_reason(error))
        raise
    manifest.finish(written["ok"], written["error"], output, failure)

    # Report, once the replicas have shut their engines down (else vLLM's exit messages follow it).
    from util.replica.internals import wait_for_replicas_to_exit
    from util.results import format_report, sample_rows, write_report
    wait_for_replicas_to_exit()
    if written["ok"] + written["error"]:  # a few rows at a glance
        for row in sample_rows(plan.output_path, cfg.output_format, columns=plan.glance):
            print(row)
    print(f"summary: {scan.rows} rows: {written['ok']} ok, {written['error']} errors, {scan.already_done} already done; "
          f"{written['input_tokens']} input tokens, {written['output_tokens']} output tokens in {elapsed:.1f} s "
          f"({written['output_tokens'] / elapsed:.0f} output tok/s, engine start included) -> {plan.output_path}")
    if report:  # per replica, and GPU-hours; also _report.json and _throughput.png beside the output
        print(format_report(report))
        write_report(plan.output_path, report)
    if failure:
        print(f"error: {failure}", file=sys.stderr)
    return EXIT_FAILED if failure else EXIT_OK


def main(argv: list[str] | None = None, replicas=None) -> int:
    cfg = parse_args(argv)
    try:
        return run(cfg, replicas)
    except Exception as error:  # bad input, a gated model without a token: a clear message, exit code 2
        reason = refusal_reason(error)
        if reason is None:
            raise  # a crash: the traceback, exit code 1
        print(f"error: {reason}", file=sys.stderr)
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
