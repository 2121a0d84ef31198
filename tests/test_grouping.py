"""Rows that share a prompt prefix run together (util/grouping.py): the keys, the sample's verdict, Ray Data's
sort, and on an engine with a small KV cache a shuffled documents-x-questions input whose documents overflow
it: grouped by default, with a clearly higher prefix-cache hit rate than in input order, and every row
written once, a resumed run included.

    .venv/bin/python -m pytest tests/test_grouping.py
"""

import json
import random

import pyarrow.parquet as pq
import pytest

from conftest import PROMPTS, write_jsonl
from util import columns as col
from util.grouping import (MIN_SHARED_SHARE, choose_row_order, group_rows, prefix_key, sample_share, shared_blocks,
                           shared_tokens)
from util.results import REPORT_NAME, format_report


def documents_and_questions(documents: int, questions: int, document_tokens: int, seed: int = 0) -> list[list[int]]:
    """Token ids: a chat header every row has, a document, then a question of its own; shuffled."""
    rng = random.Random(seed)
    header = list(range(1, 20))
    docs = [[rng.randrange(1000, 30000) for _ in range(document_tokens)] for _ in range(documents)]
    rows = [header + doc + [rng.randrange(30000) for _ in range(12)] for doc in docs for _ in range(questions)]
    rng.shuffle(rows)
    return rows


def test_keys_share_exactly_the_whole_blocks_their_prompts_share():
    a = list(range(100, 180))  # 5 blocks of 16
    b = a[:40] + [7] * 40  # shares 2 whole blocks (32 tokens) and 8 more tokens
    assert len(prefix_key(a, 16)) == 5 * 8 and len(prefix_key(a[:15], 16)) == 0  # a partial block is never cached
    assert shared_blocks(prefix_key(a, 16), prefix_key(b, 16)) == 2
    assert shared_blocks(prefix_key(a, 16), prefix_key(a[:50], 16)) == 3
    assert prefix_key(a, 16, "adapter-1")[:8] != prefix_key(a, 16, "adapter-2")[:8]  # LoRA: apart by adapter
    assert shared_tokens(sorted([prefix_key(a, 16), prefix_key(b, 16), prefix_key(a, 16)]), 16) == 5 * 16 + 2 * 16


def test_auto_groups_documents_and_questions_but_not_one_instruction_or_unrelated_rows():
    rng = random.Random(1)
    shuffled = documents_and_questions(100, 4, 300)
    order, share = choose_row_order("auto", shuffled, 16)
    assert order == "grouped" and 0.6 < share < 0.75  # 3 of 4 rows reuse their ~300-token document
    instruction = [list(range(1, 400)) + [rng.randrange(30000) for _ in range(30)] for _ in range(400)]
    unrelated = [[rng.randrange(30000) for _ in range(200)] for _ in range(400)]
    for rows in (instruction, unrelated):  # an instruction all rows share stays cached in any order
        assert sample_share(rows, 16) < MIN_SHARED_SHARE and choose_row_order("auto", rows, 16)[0] == "input"
    assert choose_row_order("grouped", unrelated, 16)[0] == "grouped"
    assert choose_row_order("input", shuffled, 16)[0] == "input"


def test_ray_data_sorts_each_documents_rows_together_and_drops_the_key(ray_local):
    import ray

    rows = [{col.ID: f"r{i}", col.PROMPT_TOKEN_IDS: ids, "document": ids[19]}
            for i, ids in enumerate(documents_and_questions(30, 3, 64))]
    out = group_rows(ray.data.from_items(rows, override_num_blocks=3), 16).take_all()
    assert sorted(r[col.ID] for r in out) == sorted(r[col.ID] for r in rows)  # every row once
    assert set(out[0]) == {col.ID, col.PROMPT_TOKEN_IDS, "document"}
    documents = [r["document"] for r in out]
    assert sum(a != b for a, b in zip(documents, documents[1:])) == 29  # each document's rows in one run


def test_the_report_shows_the_cache_and_the_shared_share():
    from util.results import build_report

    snapshot = {"ready": {"a": 10.0, "b": 11.0}, "done": [("a", 2, 20, 12.0), ("b", 2, 20, 13.0)],
                "survived": {}, "prefix_cache": {"a": [1000, 600], "b": [1000, 200]}, "grouped_tokens": [2000, 700]}
    report = build_report(snapshot, {"ok": 4, "error": 0, "input_tokens": 2000, "output_tokens": 40}, 0.0, 20.0, 0,
                          "grouped", 0.3512)
    assert report["prefix_cache"] == {"row_order": "grouped", "prompt_tokens": 2000, "cached_tokens": 800,
                                      "cached_share": 0.4, "shared_share": 0.35, "sample_shared_share": 0.3512}
    assert [r["prefix_cache_hit_rate"] for r in report["replicas"]] == [0.6, 0.2]
    text = format_report(report)
    assert "prefix cache   40.0% of 2,000 prompt tokens came from the cache; rows grouped order, prompts sharing 35.0%" in text
    assert [line.split()[4] for line in text.splitlines()[-2:]] == ["60.0%", "20.0%"]  # each replica's cache hits


# An engine of its own with a KV cache of 16 blocks (2,048 tokens at the CPU's 128 a block): a few documents'
# worth, so that in shuffled order a document is mostly gone before its second question comes.
SMALL_CACHE = ["--concurrency", "1", "--engine-arg", "num_gpu_blocks_override=16", "--engine-arg", "max_model_len=1024"]


@pytest.fixture(scope="module")
def small_cache_job(ray_local, main_here, test_model):
    from util.config import parse_args
    from util.features.replica_pool import ReplicaPool
    from util.plan import make_plan

    plan = make_plan(parse_args(["--model", test_model, *SMALL_CACHE]))
    plan.replica_resources["num_cpus"] = 0.01  # beside the session's warm engine, in its 2 CPUs
    with ReplicaPool(plan) as pool:
        yield lambda *args: main_here("--model", test_model, *SMALL_CACHE, *args, replicas=pool)


def prefix_input(path, documents: int, questions: int, seed: int):
    """Documents of about 250 tokens, each asked `questions` questions, shuffled: JSONL with an id column."""
    rng = random.Random(seed)
    rows = []
    for d in range(documents):
        document = f"Document {d}. " + " ".join(rng.choice(PROMPTS) for _ in range(20))
        rows += [{"id": f"d{d}-q{q}", "text": f"{document}\n\nQuestion: {rng.choice(PROMPTS)}"} for q in range(questions)]
    rng.shuffle(rows)
    write_jsonl(path, rows)
    return rows


@pytest.mark.engine
def test_grouped_by_default_hits_the_cache_clearly_more_than_input_order_and_resumes_once(small_cache_job, tmp_path):
    reports = {}
    for order, seed in (("input", 1), ("auto", 2)):  # other documents each time: no cache left from the first run
        source, out = tmp_path / f"{order}.jsonl", tmp_path / f"out-{order}"
        rows = prefix_input(source, 30, 2, seed)
        job = small_cache_job("--input-path", source, "--id-column", "id", "--max-tokens", "1", "--output-path", out,
                              "--row-order", order)
        assert job.code == 0, job.err[-3000:]
        assert sorted(pq.read_table(out)["id"].to_pylist()) == sorted(r["id"] for r in rows)  # every row, once
        reports[order] = json.loads((out / REPORT_NAME).read_text())["prefix_cache"]
        assert "prefix cache" in job.out
    grouped, streamed = reports["auto"], reports["input"]
    print("prefix cache, input order then grouped:", streamed, grouped)  # shown with -s
    assert grouped["row_order"] == "grouped" and streamed["row_order"] == "input"
    assert grouped["sample_shared_share"] > 0.3 and grouped["shared_share"] > 0.3
    assert grouped["cached_share"] > streamed["cached_share"] + 0.2, (grouped, streamed)

    # A resumed run groups only the rows left: 20 more rows of new documents, appended; each row once.
    source, out = tmp_path / "auto.jsonl", tmp_path / "out-auto"
    old = [json.loads(line) for line in source.read_text().splitlines()]
    new = prefix_input(tmp_path / "more.jsonl", 10, 2, 3)
    write_jsonl(source, old + [{**r, "id": "more-" + r["id"]} for r in new])
    job = small_cache_job("--input-path", source, "--id-column", "id", "--max-tokens", "1", "--output-path", out)
    assert job.code == 0, job.err[-3000:]
    assert "80 rows: 20 ok, 0 errors, 60 already done" in job.out, job.out[-2000:]
    ids = pq.read_table(out)["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 80
