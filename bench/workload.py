"""The benchmark workloads, as JSONL files main.py reads as they are (--input-format jsonl --id-column id).

    python -m bench.workload /tmp/standard.jsonl --num-prompts 4000
    python -m bench.workload /tmp/prefix.jsonl --workload prefix --documents 1000 --questions 4 \\
        --document-tokens 700 --output-tokens 64                # documents x questions, shuffled
    python -m bench.workload /tmp/table.jsonl --workload table --num-prompts 4000

Each row is `{"id", "text", "sampling_params": {"max_tokens": n, "ignore_eos": true}}`: the output length is
fixed per row (deterministic from the seed), and `ignore_eos` makes every engine generate exactly that many
tokens, so every design does the same work.
  - standard: prompts of about 100 tokens, output lengths from 16 to 512 tokens;
  - prefix: each document followed by one of its questions, every document asked several questions, the rows
    shuffled (`--prefix-order grouped`: each document's rows together), as retrieval batches come;
  - table: one instruction of a few hundred tokens over many short rows, as a table's rows are labelled.
"""

import argparse
import json
import random
from pathlib import Path

SENTENCES = (Path(__file__).resolve().parents[1] / "assets" / "prompts_100.txt").read_text().splitlines()
WORKLOADS = {"standard": 4000, "large": 20000, "prefix": None, "table": 4000}  # name -> default rows
TOKENS_PER_WORD = 1.3  # about, for English text under a Llama-style tokenizer


def make_workload(num_prompts: int = 4000, min_tokens: int = 16, max_tokens: int = 512,
                  sentences_per_prompt: int = 8, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(num_prompts):
        text = f"Request {i}. " + " ".join(rng.choice(SENTENCES) for _ in range(sentences_per_prompt))
        rows.append({"id": f"req-{i:06d}", "text": text,
                     "sampling_params": {"max_tokens": rng.randint(min_tokens, max_tokens), "ignore_eos": True}})
    return rows


def words(rng: random.Random, tokens: int) -> str:
    """Text of about `tokens` tokens, from the sample prompts' sentences."""
    text = []
    while len(" ".join(text).split()) * TOKENS_PER_WORD < tokens:
        text.append(rng.choice(SENTENCES))
    return " ".join(text)


def make_prefix_workload(documents: int = 1000, questions: int = 4, document_tokens: int = 700,
                         output_tokens: int = 64, order: str = "shuffled", seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for d in range(documents):
        document = f"Document {d}. {words(rng, document_tokens)}"
        for q in range(questions):
            rows.append({"id": f"doc-{d:06d}-q{q}", "text": f"{document}\n\nQuestion {q}: {rng.choice(SENTENCES)}",
                         "sampling_params": {"max_tokens": output_tokens, "ignore_eos": True}})
    if order == "shuffled":
        rng.shuffle(rows)
    return rows


def make_table_workload(num_prompts: int = 4000, instruction_tokens: int = 300, output_tokens: int = 64,
                        seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    instruction = f"Label each row of the table below. {words(rng, instruction_tokens)}"
    return [{"id": f"row-{i:06d}", "text": f"{instruction}\n\nRow {i}: {rng.choice(SENTENCES)}",
             "sampling_params": {"max_tokens": output_tokens, "ignore_eos": True}} for i in range(num_prompts)]


def workload_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="standard")
    parser.add_argument("--num-prompts", type=int, default=None, help="default: the workload's (prefix: documents x questions)")
    parser.add_argument("--max-output", type=int, default=512, help="standard: the longest output")
    parser.add_argument("--documents", type=int, default=1000, help="prefix: documents")
    parser.add_argument("--questions", type=int, default=4, help="prefix: questions per document")
    parser.add_argument("--document-tokens", type=int, default=700, help="prefix: about this many tokens a document")
    parser.add_argument("--output-tokens", type=int, default=64, help="prefix and table: tokens generated per row")
    parser.add_argument("--prefix-order", choices=("shuffled", "grouped"), default="shuffled",
                        help="prefix: the rows shuffled, or each document's together")


def make_rows(args: argparse.Namespace) -> list[dict]:
    """The rows of the workload that `args` (workload_flags') describe."""
    if args.workload == "prefix":
        return make_prefix_workload(args.documents, args.questions, args.document_tokens, args.output_tokens,
                                    args.prefix_order)
    if args.workload == "table":
        return make_table_workload(args.num_prompts or WORKLOADS["table"], output_tokens=args.output_tokens)
    return make_workload(args.num_prompts or WORKLOADS[args.workload], max_tokens=args.max_output)


def write_rows(rows: list[dict], path: Path) -> Path:
    Path(path).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return Path(path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path")
    workload_flags(parser)
    args = parser.parse_args()
    rows = make_rows(args)
    write_rows(rows, args.path)
    print(f"{len(rows)} prompts, {sum(r['sampling_params']['max_tokens'] for r in rows)} output tokens -> {args.path}")
