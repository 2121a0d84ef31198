"""The plain vLLM script that main.py replaces: read a JSONL file, answer every row with `LLM.chat`, write JSONL.

    python -m bench.plain /tmp/standard.jsonl /tmp/plain.jsonl --model /tmp/bench-mistral-7b \\
        --engine-arg load_format=dummy --engine-arg max_model_len=4096 --engine-arg max_num_seqs=2048

BENCHMARKS.md's yardstick for "from command to first answer": main.py's wall time on a file against this
script's, each timed from launch to exit with the same engine arguments. Greedy, as main.py's default; each
row's own `sampling_params` apply on top (the standard workload's fixed output lengths), as in main.py. It
prints one JSON line: rows, output tokens, and when its engine was ready and its answers done.
"""

import argparse
import ast
import json
import time


def engine_arg(text: str) -> tuple[str, object]:
    """--engine-arg as main.py reads it (util/config.py parse_engine_arg), without importing the project:
    util.config's imports take about 2 s, which the script being timed would pay and a plain one does not."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--engine-arg takes key=value, got {text!r}")
    try:
        return key.strip(), ast.literal_eval(value)  # numbers, booleans, lists, dicts
    except (ValueError, SyntaxError):
        return key.strip(), value  # plain strings need no quotes


def main() -> None:
    started = time.time()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--model", required=True)
    parser.add_argument("--engine-arg", action="append", default=[], type=engine_arg, help="key=value (repeatable)")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    with open(args.input) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    llm = LLM(model=args.model, **{"seed": 0, **dict(args.engine_arg)})
    ready = time.time()
    params = [SamplingParams(**{"temperature": 0.0, "max_tokens": 2048, **row.get("sampling_params", {})})
              for row in rows]
    outputs = llm.chat([[{"role": "user", "content": row["text"]}] for row in rows], params, use_tqdm=False)
    answered = time.time()
    with open(args.output, "w") as f:
        for row, output in zip(rows, outputs):
            f.write(json.dumps({"id": row.get("id"), "generated_text": output.outputs[0].text,
                                "num_generated_tokens": len(output.outputs[0].token_ids)}) + "\n")
    tokens = sum(len(output.outputs[0].token_ids) for output in outputs)
    print(json.dumps({"rows": len(outputs), "output_tokens": tokens, "engine_ready_s": round(ready - started, 1),
                      "answered_s": round(answered - started, 1),
                      "output_tok_per_s": round(tokens / max(answered - ready, 1e-9), 1)}), flush=True)


if __name__ == "__main__":
    main()
