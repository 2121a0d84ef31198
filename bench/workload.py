"""The standard benchmark workload: prompts of about 100 tokens, output lengths from 16 to 512 tokens.

    python -m bench.workload /tmp/workload.jsonl --num-prompts 4000

Each row is `{"id", "text", "sampling_params": {"max_tokens": n, "ignore_eos": true}}`: the output length is
fixed per prompt (deterministic from its index), and `ignore_eos` makes every engine generate exactly that
many tokens, so every design does the same work. main.py reads the file as it is (--input-format jsonl
--id-column id), applying each row's sampling_params.
"""

import argparse
import json
import random
from pathlib import Path

SENTENCES = (Path(__file__).resolve().parents[1] / "assets" / "prompts_100.txt").read_text().splitlines()


def make_workload(num_prompts: int = 4000, min_tokens: int = 16, max_tokens: int = 512,
                  sentences_per_prompt: int = 8, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(num_prompts):
        text = f"Request {i}. " + " ".join(rng.choice(SENTENCES) for _ in range(sentences_per_prompt))
        rows.append({"id": f"req-{i:06d}", "text": text,
                     "sampling_params": {"max_tokens": rng.randint(min_tokens, max_tokens), "ignore_eos": True}})
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path")
    parser.add_argument("--num-prompts", type=int, default=4000)
    parser.add_argument("--min-tokens", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=512)
    args = parser.parse_args()
    rows = make_workload(args.num_prompts, args.min_tokens, args.max_tokens)
    Path(args.path).write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"{len(rows)} prompts, {sum(r['sampling_params']['max_tokens'] for r in rows)} output tokens -> {args.path}")
