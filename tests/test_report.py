"""The run report without an engine: the progress actor's aggregation of what replicas report, the
progress line, and report.json and the throughput plot from a synthetic series.

    .venv/bin/python -m pytest tests/test_report.py -q

Ray runs locally (`ray_local`); stand-in replicas are Ray actors that report as LLMPredictor does.
"""

import json
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ids_in
from util.output import delete_output
from util.results import PLOT_NAME, REPORT_NAME, build_report, format_report, read_results, timeline, write_report
from util.report import SURVIVED, ProgressLog, ProgressReporter, eta_seconds, progress_line
from util.plots import throughput_series

WRITTEN = {"ok": 9, "error": 1, "input_tokens": 700, "output_tokens": 150}


def test_progress_line_format():
    assert progress_line(1234, 10_000, 5678.4, 754) == \
        "progress: 1,234/10,000 rows (12%), 5,678 output tok/s, ETA 0:12:34"
    assert progress_line(0, 10, 0.0, None) == "progress: 0/10 rows (0%), 0 output tok/s, ETA unknown"
    assert progress_line(9_999, 10_000, 1.0, 1) == "progress: 9,999/10,000 rows (99%), 1 output tok/s, ETA 0:00:01"
    assert progress_line(10, 10, 0.0, 0) == "progress: 10/10 rows (100%), 0 output tok/s, ETA 0:00:00"
    # Rows not counted beforehand: no share, no ETA.
    assert progress_line(1234, None, 5678.4, None) == "progress: 1,234 rows, 5,678 output tok/s"
    # Engines replaced on the way (util/replica/supervisor.py) are shown.
    assert progress_line(5, 10, 1.0, 5, restarts=1).endswith("ETA 0:00:05, 1 engine restart")
    assert progress_line(5, None, 1.0, None, restarts=2) == "progress: 5 rows, 1 output tok/s, 2 engine restarts"


def test_eta_goes_by_the_pace_since_the_first_engine_was_ready():
    assert eta_seconds(100, 1000, first_ready=10.0, now=60.0) == 450.0  # 900 rows left at 2 rows/s
    assert eta_seconds(0, 1000, first_ready=10.0, now=60.0) is None  # no pace yet
    assert eta_seconds(5, 1000, first_ready=None, now=60.0) is None
    assert eta_seconds(1000, 1000, first_ready=10.0, now=60.0) == 0.0
    assert eta_seconds(100, None, first_ready=10.0, now=60.0) is None


def test_progress_log_totals_and_snapshot():
    log = ProgressLog()
    log.replica_ready("b", 12.0)
    log.replica_ready("a", 10.0, {"actor_start": 2.0, "vllm_imported": 5.0})  # its start's steps
    log.replica_ready("a", 99.0, {"actor_start": 90.0})  # a second call (Ray restarted the replica) does not move its start
    log.rows_done("a", 3, 30, 20.0)
    log.rows_done("b", 2, 25, 21.0)
    log.count("engine_restarts", 1)
    log.count("rows_rerun", 7)
    log.cached("a", 100, 40)  # prompt tokens, of which vLLM's prefix cache held
    log.cached("a", 50, 10)
    log.grouped(300, 120)  # grouped rows' prompt tokens, of which shared with the row before
    assert log.totals() == {"rows": 5, "output_tokens": 55, "first_ready": 10.0, "replicas": 2, "restarts": 1}
    assert log.snapshot() == {"ready": {"a": 10.0, "b": 12.0}, "done": [("a", 3, 30, 20.0), ("b", 2, 25, 21.0)],
                              "starts": {"a": {"actor_start": 2.0, "vllm_imported": 5.0, "engine_ready": 10.0},
                                         "b": {"engine_ready": 12.0}},
                              "survived": {"engine_restarts": 1, "rows_rerun": 7, "rows_isolated": 0,
                                           "replica_restarts": 1, "nodes_lost": 0}, "counted": {},
                              "prefix_cache": {"a": [150, 50]}, "grouped_tokens": [300, 120]}
    log.count("still_cut", 1)  # a feature's counts (--repair's), in whatever order the replicas' reports come
    log.count("repaired", 2)
    assert list(log.snapshot()["counted"].items()) == [("repaired", 2), ("still_cut", 1)]  # the report's order


def test_the_progress_actor_aggregates_what_the_replicas_report(ray_local):
    ray = ray_local

    @ray.remote(num_cpus=0)
    class StandInReplica:  # reports the way LLMPredictor does; defined here so Ray ships it by value
        def __init__(self):
            from util.replica.supervisor import ProgressClient

            self.progress = ProgressClient.connect()

        def run(self, batches):
            for rows, tokens in batches:
                self.progress.rows_done(rows, tokens, flush=True)
            return self.progress.replica

    lines = []
    with ProgressReporter(total_rows=10, interval_s=0.2, gpus=2, write=lines.append) as progress:
        replicas = [StandInReplica.remote(), StandInReplica.remote()]
        first, second = ray.get([replicas[0].run.remote([(3, 30), (2, 20)]), replicas[1].run.remote([(5, 100)])])
        deadline = time.time() + 30
        while not any(line.startswith("progress: 10/10 rows (100%), ") for line in lines) and time.time() < deadline:
            time.sleep(0.1)
    assert any(line.startswith("progress: 10/10 rows (100%), ") and line.endswith(" output tok/s, ETA 0:00:00")
               for line in lines), lines
    assert first != second

    report = progress.report(WRITTEN)
    by_replica = {r["replica"]: r for r in report["replicas"]}
    assert set(by_replica) == {first, second}
    assert (by_replica[first]["rows"], by_replica[first]["output_tokens"]) == (5, 50)
    assert (by_replica[second]["rows"], by_replica[second]["output_tokens"]) == (5, 100)
    assert report["rows"] == {"ok": 9, "error": 1} and report["output_tokens"] == 150
    assert report["gpus"] == 2
    assert report["gpu_hours"] == pytest.approx(report["wall_s"] * 2 / 3600, abs=1e-3)
    assert sum(report["throughput"]["total"]) * report["throughput"]["bin_s"] == pytest.approx(150)
    with pytest.raises(ValueError):  # the actor is gone with the `with` block
        ray.get_actor("batch-llm-progress")


def test_a_held_run_lets_its_replicas_answer_only_once_released(ray_local):
    """main.py starts the replicas while the input is still being checked: they wait for the release, and
    no progress line is printed before it (the total is not known yet)."""
    ray = ray_local

    @ray.remote(num_cpus=0)
    class StandInReplica:
        def __init__(self):
            from util.replica.supervisor import ProgressClient

            self.progress = ProgressClient.connect()

        async def answer(self):
            await self.progress.released()
            self.progress.rows_done(4, 40, flush=True)
            return time.time()

    lines = []
    with ProgressReporter(None, interval_s=0.1, write=lines.append, held=True) as progress:
        answered = StandInReplica.remote().answer.remote()
        ready, _ = ray.wait([answered], timeout=2)
        assert not ready and not lines  # held: the replica waits, and nothing is printed
        released = time.time()
        progress.release(4)
        assert ray.get(answered, timeout=30) >= released
        deadline = time.time() + 30
        while not any(line.startswith("progress: 4/4 rows (100%)") for line in lines) and time.time() < deadline:
            time.sleep(0.05)
    assert any(line.startswith("progress: 4/4 rows (100%)") for line in lines), lines


def test_the_first_finished_row_is_printed_at_once_not_at_the_next_tick(ray_local):
    """Progress moves from the first finished row: its line follows within about a second, though the
    interval between lines is a minute (and no line with no row comes before a tick)."""
    ray = ray_local

    @ray.remote(num_cpus=0)
    class StandInReplica:
        def __init__(self):
            from util.replica.supervisor import ProgressClient

            self.progress = ProgressClient.connect()

        def run(self):
            self.progress.rows_done(1, 12, flush=True)
            return time.time()

    lines = []
    with ProgressReporter(total_rows=4, interval_s=60, write=lines.append):
        reported = ray.get(StandInReplica.remote().run.remote(), timeout=60)
        deadline = reported + 30
        while not lines and time.time() < deadline:
            time.sleep(0.05)
    assert lines and lines[0].startswith("progress: 1/4 rows (25%), "), lines


def test_a_replica_finds_no_actor_outside_a_reporting_run(ray_local):
    from util.replica.supervisor import ProgressClient

    client = ProgressClient.connect()
    client.rows_done(3, 30, flush=True)  # nothing to report to, and no error
    assert client.reporting_to is None


def synthetic_report() -> dict:
    """Two replicas over 100 s: `a` ready at 10 s, `b` at 12 s; each batch counted when it finished."""
    started = 1_000.0
    snapshot = {"ready": {"a": started + 10, "b": started + 12},
                "done": [("a", 4, 200, started + 30), ("b", 3, 150, started + 32), ("a", 2, 100, started + 60),
                            ("b", 1, 50, started + 99.5)], "survived": dict.fromkeys(SURVIVED, 0)}
    return build_report(snapshot, {"ok": 9, "error": 1, "input_tokens": 700, "output_tokens": 500},
                        started, started + 100, gpus=2)


def test_throughput_series_bins_each_report_when_it_was_sent():
    series = throughput_series([("a", 2, 50, 101.5), ("b", 1, 30, 101.9), ("a", 1, 20, 109.99)], 100.0, 110.0)
    assert series["bin_s"] == 1.0 and series["start_s"] == [float(i) for i in range(10)]
    assert series["per_replica"]["a"] == [0, 50, 0, 0, 0, 0, 0, 0, 0, 20]
    assert series["per_replica"]["b"] == [0, 30, 0, 0, 0, 0, 0, 0, 0, 0]
    assert series["total"] == [0, 80, 0, 0, 0, 0, 0, 0, 0, 20]


def test_report_fields_per_replica_and_gpu_hours():
    report = synthetic_report()
    assert report["rows"] == {"ok": 9, "error": 1}
    assert (report["input_tokens"], report["output_tokens"], report["wall_s"]) == (700, 500, 100.0)
    assert report["output_tok_per_s"] == 5.0
    assert (report["gpus"], report["gpu_hours"]) == (2, round(100 * 2 / 3600, 3))
    assert report["replicas"] == [
        {"replica": "a", "rows": 6, "output_tokens": 300, "prefix_cache_hit_rate": None, "output_tok_per_s": 6.0,
         "ready_s": 10.0, "last_batch_s": 60.0},
        {"replica": "b", "rows": 4, "output_tokens": 200, "prefix_cache_hit_rate": None,
         "output_tok_per_s": round(200 / 87.5, 1), "ready_s": 12.0, "last_batch_s": 99.5}]
    assert report["throughput"]["bin_s"] == 3.0  # 100 s in at most 40 bins of whole seconds
    assert sum(report["throughput"]["total"]) * 3.0 == pytest.approx(500)
    assert report["started"] == "1970-01-01T00:16:40+00:00" and report["finished"] == "1970-01-01T00:18:20+00:00"


def test_the_timeline_counts_each_step_from_launch():
    launched = 1_000.0
    snapshot = {"starts": {"b": {"actor_start": 1_006.0, "vllm_imported": 1_012.0, "engine_ready": 1_031.0},
                           "a": {"actor_start": 1_005.0, "vllm_imported": 1_011.5, "engine_ready": 1_030.0}},
                "done": [("a", 0, 0, 1_031.0), ("a", 4, 40, 1_032.5), ("b", 2, 20, 1_050.0)]}  # a flush of no rows first
    marks = {"launched": launched, "ray_init": 1_002.0, "plan": 1_003.0, "row_order": 1_003.5}
    line = timeline(snapshot, marks, written=1_051.0, now=1_052.25)
    assert line["steps"] == {"ray_init": 2.0, "plan": 3.0, "row_order": 3.5, "actor_start": 5.0, "vllm_imported": 11.5,
                             "engine_ready": 30.0, "first_row": 32.5, "last_row": 50.0, "written": 51.0, "report": 52.2}
    assert line["replicas"]["b"] == {"actor_start": 6.0, "vllm_imported": 12.0, "engine_ready": 31.0}
    assert list(line["replicas"]) == ["a", "b"]  # the first replica ready first
    assert timeline(snapshot, {}, 1.0, 2.0) == {}  # a driver that marked no launch (a stand-in progress)
    report = {**synthetic_report(), "timeline": line}
    assert "  timeline       ray init 2.0s, plan 3.0s, row order 3.5s, actor start 5.0s, vllm imported 11.5s, engine " \
           "ready 30.0s, first row 32.5s, last row 50.0s, written 51.0s, report 52.2s (from launch)" in format_report(report)


def test_format_report_prints_the_summary_table():
    text = format_report(synthetic_report())
    assert text.splitlines()[:9] == [
        "run report",
        "  rows           9 ok, 1 error",
        "  input tokens   700",
        "  output tokens  500",
        "  output tok/s   5.0 overall (wall time, engine start included)",
        "  wall time      0:01:40",
        "  GPU-hours      0.056 (2 GPUs x wall time)",
        "  survived       0 engine restarts, 0 rows run again, 0 rows isolated, 0 replica restarts, 0 nodes lost",
        "  replica          rows  output tokens  output tok/s cache hits joined at",
    ]
    assert text.splitlines()[9].split() == ["a", "6", "300", "6.0", "-", "10.0s"]


def test_report_files_lie_beside_the_data_and_readers_skip_them(ray_local, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(pa.table({"id": ["r1", "r2"], "error": pa.array([None, None], pa.string())}), out / "part-a-000000.parquet")
    paths = write_report(str(out), synthetic_report())
    assert paths == [f"{out}/{REPORT_NAME}", f"{out}/{PLOT_NAME}"]
    assert json.loads((out / REPORT_NAME).read_text()) == json.loads(json.dumps(synthetic_report()))
    assert (out / PLOT_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pq.read_table(out).num_rows == 2  # pyarrow, pandas
    assert read_results(str(out)).count() == 2  # Ray Data
    assert ids_in(out) == {"r1", "r2"}
    delete_output(str(out))  # --overwrite takes them as the run's own records, not as foreign files
    assert not out.exists()
