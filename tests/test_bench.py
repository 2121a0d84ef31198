"""The bench command stays alive: all four designs and a variant on CPU with the tiny model and a tiny workload."""

import json
import subprocess
import sys
from pathlib import Path

from bench.workload import make_workload

REPO = Path(__file__).resolve().parents[1]


def test_workload_is_deterministic_and_in_range():
    rows = make_workload(200)
    assert rows == make_workload(200)
    lengths = [r["sampling_params"]["max_tokens"] for r in rows]
    assert min(lengths) >= 16 and max(lengths) <= 512 and len(set(lengths)) > 50
    assert all(r["sampling_params"]["ignore_eos"] for r in rows)
    assert len({r["id"] for r in rows}) == 200


def test_bench_runs_all_four_designs_on_cpu(tmp_path):
    command = [sys.executable, "-m", "bench.run", "--tiny", "--num-prompts", "8", "--seed-prompts", "4",
               "--max-output", "20", "--repeats", "1", "--designs", "raw,pipeline,ray_llm,raw_twice",
               "--then", "seed", "--variant", "raw_twice=raw:generates=2", "--out", str(tmp_path)]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    by_design = {r["design"]: r for r in report["runs"]}
    assert set(by_design) == {"raw", "pipeline", "seed", "ray_llm", "raw_twice"}
    assert [r["generate_index"] for r in report["runs"] if r["design"] == "raw_twice"] == [0, 1]
    expected = sum(r["sampling_params"]["max_tokens"] for r in make_workload(8, max_tokens=20))
    # ignore_eos: every design generates exactly the same tokens
    for name in ("raw", "pipeline", "ray_llm", "raw_twice"):
        assert by_design[name]["rows"] == 8 and by_design[name]["output_tokens"] == expected
    assert by_design["seed"]["rows"] == 4
    assert all(r["output_tok_per_s"] > 0 for r in report["runs"])
    assert all(r["ttft_s"] > 0 for r in report["runs"] if r.get("generate_index", 0) == 0)
    marks = by_design["pipeline"]["start_marks"]  # a replica's start, in order
    assert 0 < marks["init_entered"] <= marks["vllm_imported"] <= marks["engine_ready"] <= marks["first_batch_in"]
    assert set(report["summary"]["designs"]) == set(by_design)
    assert "pipeline/raw" in report["summary"]["ratios_of_medians"]
    assert (tmp_path / "throughput.png").stat().st_size > 1000
