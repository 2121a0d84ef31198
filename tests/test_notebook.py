"""README.ipynb executed top to bottom by papermill, on CPU with the smoke model (SmolLM2-135M-Instruct):
it runs, it teaches the core first (the predictor class on screen and one literal
`ds.map_batches(LLMPredictor, ...)` call), then one cell per feature showing what it adds to the chain; it
starts one set of engines, and its output is one row per input row, with the ids main.py gives them.

    .venv/bin/python -m pytest tests/test_notebook.py
"""

import ast

import nbformat
import pyarrow.parquet as pq
import pytest

from conftest import PROMPTS, REPO, line_ids
from util.output import OUTPUT_SCHEMA

# Every test here starts vLLM engines, in a kernel whose ray.init starts a cluster of its own: alone, as Ray's fixed
# 30 s wait for the cluster's start failed it beside the other worker's engines.
pytestmark = [pytest.mark.engine, pytest.mark.solo]

SMOKE_ROWS = 20  # --smoke's limit


@pytest.fixture(scope="module")
def notebook(tmp_path_factory):
    import papermill

    work = tmp_path_factory.mktemp("notebook")
    papermill.execute_notebook(str(REPO / "README.ipynb"), str(work / "executed.ipynb"), cwd=str(REPO),
                               parameters={"SMOKE": True, "OUTPUT_PATH": str(work / "out")},
                               progress_bar=False, log_output=False)
    return nbformat.read(work / "executed.ipynb", as_version=4), work / "out"


def code_cells(notebook) -> list[str]:
    return [cell.source for cell in notebook.cells if cell.cell_type == "code"]


def calls(source: str, name: str) -> list[ast.Call]:
    """The calls of `name` (a function or a method) in a cell."""
    return [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call)
            and (getattr(node.func, "attr", None) == name or getattr(node.func, "id", None) == name)]


def test_the_notebook_writes_one_row_per_input_row_with_mains_ids(notebook):
    executed, out = notebook
    printed = "".join(o.get("text", "") for cell in executed.cells if cell.cell_type == "code" for o in cell.outputs)
    assert f"{{'rows': {SMOKE_ROWS}, 'ok': {SMOKE_ROWS}, 'errors': 0" in printed
    table = pq.read_table(out)
    assert table.schema.names[:len(OUTPUT_SCHEMA)] == OUTPUT_SCHEMA.names  # main.py's columns, in its order
    assert sorted(table["id"].to_pylist()) == sorted(line_ids("prompts_100.txt", PROMPTS)[:SMOKE_ROWS])
    assert all(table["generated_text"].to_pylist())


def test_the_notebook_shows_the_predictor_class_and_one_literal_map_batches_call(notebook):
    executed, _ = notebook
    cells = code_cells(executed)
    printed = [o.get("text", "") for cell in executed.cells if cell.cell_type == "code" for o in cell.outputs]
    assert any("class LLMPredictor" not in text and "def __init__(self, model: str" in text and
               "async def generate(self, engine, request" in text for text in printed)  # the class's own source
    predictor_calls = [call for cell in cells for call in calls(cell, "map_batches")
                       if call.args and getattr(call.args[0], "id", None) == "LLMPredictor"]
    assert len(predictor_calls) == 1
    assert {"compute", "batch_size", "fn_constructor_kwargs"} <= {k.arg for k in predictor_calls[0].keywords}
    # The core comes first: every feature's cell follows the write.
    first_feature = next(i for i, cell in enumerate(cells) if "def chain(" in cell)
    assert [i for i, cell in enumerate(cells) if calls(cell, "write_results")][0] < first_feature


def test_each_feature_cell_shows_what_its_part_adds(notebook):
    executed, _ = notebook
    printed = "".join(o.get("text", "") for cell in executed.cells if cell.cell_type == "code" for o in cell.outputs)
    assert "embed      needs id, prompt_token_ids, error; adds embedding, error, model" in printed
    assert "parts: []" in printed  # a plain job's: no feature asked for
    assert "'Images'" in printed and "{'image': 1}" in printed  # the vision job's part, and the engine's limit
    assert "{'enable_lora': True, 'max_loras': 2, 'max_lora_rank': 8}" in printed  # a spare slot on CPU
    assert "generate messages custom_id openai" in printed  # the OpenAI adapter's columns and records


def test_the_notebook_starts_one_set_of_engines_and_reads_the_input_once(notebook):
    executed, _ = notebook
    cells = code_cells(executed)
    # Engines start when a dataset with the predictor stage runs; only the one write runs such a dataset.
    runs = [name for cell in cells for name in ("write_results", "take_all", "take", "iter_batches", "count",
                                                "materialize", "check_before_run", "scan_input") if calls(cell, name)]
    assert runs.count("write_results") == 1
    assert "check_before_run" not in runs and "scan_input" not in runs  # no second pass over the input
    # The input; the 4 in-memory rows; the OpenAI cell's one-line file.
    assert sum(len(calls(cell, "read_prompts")) for cell in cells) == 3
