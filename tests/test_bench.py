"""The bench command stays alive: all five designs on CPU with the tiny model and a tiny workload (one
engine start each), and its parts: variants, medians and ratios.

    .venv/bin/python -m pytest tests/test_bench.py
"""

import json
import subprocess
import sys

import pytest

from bench.run import parse_variant, summarize
from bench.workload import make_prefix_workload, make_table_workload, make_workload
from conftest import REPO


def test_workload_is_deterministic_and_in_range():
    rows = make_workload(200)
    assert rows == make_workload(200)
    lengths = [r["sampling_params"]["max_tokens"] for r in rows]
    assert min(lengths) >= 16 and max(lengths) <= 512 and len(set(lengths)) > 50
    assert all(r["sampling_params"]["ignore_eos"] for r in rows)
    assert len({r["id"] for r in rows}) == 200


def test_prefix_and_table_workloads_share_what_real_batches_share():
    shuffled, grouped = make_prefix_workload(20, 4, 200), make_prefix_workload(20, 4, 200, order="grouped")
    assert len(shuffled) == 80 and sorted(map(str, shuffled)) == sorted(map(str, grouped))  # the same rows
    documents = [row["text"].split("\n\nQuestion")[0] for row in grouped]
    assert documents[0] == documents[3] != documents[4] and len(set(documents)) == 20
    assert len(documents[0].split()) * 1.3 >= 200  # about the tokens asked for
    assert [r["id"] for r in shuffled] != [r["id"] for r in grouped]
    assert {r["sampling_params"]["max_tokens"] for r in shuffled} == {64}
    table = make_table_workload(50)
    assert len({row["text"].split("\n\nRow")[0] for row in table}) == 1 and len({r["id"] for r in table}) == 50


@pytest.mark.engine
def test_bench_runs_all_five_designs_on_cpu(tmp_path):
    command = [sys.executable, "-m", "bench.run", "--tiny", "--num-prompts", "8", "--seed-prompts", "4",
               "--max-output", "20", "--repeats", "1", "--designs", "raw,pipeline,ray_llm",
               "--then", "seed,plain", "--out", str(tmp_path)]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    by_design = {r["design"]: r for r in report["runs"]}
    assert set(by_design) == {"raw", "pipeline", "seed", "ray_llm", "plain"}
    expected = sum(r["sampling_params"]["max_tokens"] for r in make_workload(8, max_tokens=20))
    # ignore_eos: every design generates exactly the same tokens
    for name in ("raw", "pipeline", "ray_llm", "plain"):
        assert by_design[name]["rows"] == 8 and by_design[name]["output_tokens"] == expected
    assert by_design["seed"]["rows"] == 4
    assert all(r["output_tok_per_s"] > 0 for r in report["runs"])
    assert all(r["ttft_s"] > 0 for r in report["runs"] if r.get("generate_index", 0) == 0)
    marks = by_design["pipeline"]["start_marks"]  # a replica's start, in order
    assert 0 < marks["init_entered"] <= marks["vllm_imported"] <= marks["engine_ready"] <= marks["first_batch_in"]
    assert set(report["summary"]["designs"]) == set(by_design)
    assert "pipeline/raw" in report["summary"]["ratios_of_medians"]
    assert report["summary"]["ratios_of_medians"]["pipeline/plain generation time"] > 0
    assert by_design["pipeline"]["row_order"] == "input"  # the standard workload's prompts share nothing
    assert (tmp_path / "throughput.png").stat().st_size > 1000


def test_a_variant_names_its_base_design_and_settings():
    assert parse_variant('raw_s2048=raw:generates=2;max_num_seqs=2048') == (
        "raw_s2048", "raw", {"generates": 2, "max_num_seqs": 2048})


def test_summary_gives_medians_spreads_and_ratios_of_medians():
    runs = [{"design": d, "output_tok_per_s": v, "ttft_s": t} for d, v, t in
            [("raw", 10.0, 5.0), ("raw", 30.0, 7.0), ("raw", 20.0, 6.0), ("pipeline", 15.0, 9.0)]]
    summary = summarize(runs)
    assert summary["designs"]["raw"]["output_tok_per_s"] == {"median": 20.0, "min": 10.0, "max": 30.0, "n": 3}
    assert summary["ratios_of_medians"]["pipeline/raw"] == 0.75
