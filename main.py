"""Offline batch LLM inference with Ray Data and vLLM: read prompts, format them for the model, run
vLLM on every GPU of the Ray cluster, and write one output row per input row.

    python main.py --smoke                               # offline on CPU with a tiny local model
    python main.py --input-path assets/prompts_100.txt   # 100 prompts, Mistral-7B-Instruct, 4 GPUs
    python main.py --input-path s3://my-bucket/prompts.jsonl --text-column question --max-tokens 256
    anyscale job submit -f job.yaml                      # the same as an Anyscale job
    python main.py --help                                # every knob

README.ipynb walks through the same steps, cell by cell, with the same helpers from util/.
"""

import sys
import time

import ray

from util.accelerator import choose_accelerator
from util.config import Config, parse_args, smoke_config
from util.hf_token import prompt_for_hugging_face_token, worker_env_vars
from util.output import read_results, summarize, write_results, written_ids
from util.reading import SAMPLE_PROMPTS, read_prompts, unwrap_input_error
from util.stages import formatter_stage, predictor_stage
from util.storage import generate_output_path


def run(cfg: Config) -> None:
    if cfg.smoke:
        cfg = smoke_config(cfg)
    output_path = cfg.output_path or generate_output_path(cfg.model, cfg.run_name)

    # 1. Access. A gated model needs a Hugging Face token; it reaches the workers through Ray's
    #    runtime environment, never through a file in the working directory that a job uploads.
    token = prompt_for_hugging_face_token(cfg.model, interactive=False)
    ray.init(runtime_env={"env_vars": worker_env_vars(token)})
    choice = choose_accelerator(cfg.accelerator_type)

    # 2. Read. One row per prompt, each with a stable id. Nothing runs yet: Ray Data is lazy.
    ds = read_prompts(cfg.input_path or SAMPLE_PROMPTS, cfg.input_format, cfg.text_column,
                      cfg.id_column, cfg.limit)

    # A re-run with the same output path resumes: rows whose ids are already written are skipped.
    done = written_ids(output_path, cfg.output_format)
    if done:
        ds = ds.filter(lambda row: row["id"] not in done)
        if ds.count() == 0:
            print(f"summary: nothing to do, all rows are already in {output_path}")
            return

    # 3. Format. The model's chat template (or its verified format), tokenized once, on CPU.
    ds = ds.map_batches(**formatter_stage(cfg, choice.use_gpu))

    # 4. Generate. `concurrency` vLLM replicas, each on its GPUs, several batches in flight each.
    ds = ds.map_batches(**predictor_stage(cfg, choice))

    # 5. Write. Execution streams: reading, formatting, generation and writing overlap.
    started = time.perf_counter()
    write_results(ds, output_path, cfg.output_format)
    elapsed = time.perf_counter() - started

    # 6. Read back and report.
    results = read_results(output_path, cfg.output_format)
    for row in results.take(3):
        print({k: row[k] for k in ("id", "generated_text", "finish_reason", "num_generated_tokens")})
    stats = summarize(results)
    print(f"summary: {stats['rows']} rows ({stats['ok']} ok, {stats['errors']} errors; {len(done)} from earlier runs), "
          f"{stats['input_tokens']} input tokens, {stats['output_tokens']} output tokens in {elapsed:.1f} s "
          f"({stats['output_tokens'] / elapsed:.0f} output tok/s, engine start included) -> {output_path}")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        run(cfg)
    except Exception as error:  # bad input, a gated model without a token: a clear message, exit code 2
        reason = unwrap_input_error(error) or (error if isinstance(error, (ValueError, PermissionError)) else None)
        if reason is None:
            raise
        print(f"error: {reason}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
