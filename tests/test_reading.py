"""Tests for util/reading.py: every input format, stable ids, --limit, and errors that name file and line.

Local files only (S3 reads are in test_storage.py); Ray runs locally through the `ray_local` fixture.
"""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from conftest import REPO, h8, scan_error, write_jsonl
from util.errors import InputError, original
from util.parts import registry
from util.parts import RowAsks
from util.reading import BLOCK_ROWS, PromptFiles, first_rows, list_files, read_prompts
from util.scan import InputScan, scan_input

PROMPTS_100 = str(REPO / "assets" / "prompts_100.txt")

pytestmark = pytest.mark.usefixtures("ray_local")


def rows(ds) -> list[dict]:
    return ds.take_all()


def input_error(ds) -> InputError:
    """Run `ds`; the InputError that a worker raised, as it reaches the driver: Ray's wrapper holds it."""
    with pytest.raises(ray.exceptions.RayTaskError) as info:
        ds.take_all()
    error = original(info.value)
    assert type(error) is InputError
    return error


# --- in-memory items ---

def test_items_strings_have_id_and_text_and_stable_unique_ids():
    items = ["a", "b", "a", "c"]
    first, second = rows(read_prompts(items)), rows(read_prompts(items))
    assert [set(r) for r in first] == [{"id", "text"}] * 4
    assert [r["text"] for r in first] == items
    ids = [r["id"] for r in first]
    assert len(set(ids)) == 4  # the repeated "a" still gets its own id: position is part of it
    assert ids == [r["id"] for r in second]
    assert ids[0] == f"items:1:{h8('a')}"


def test_items_dicts_pass_extra_columns_through():
    items = [{"question": "q1", "lang": "en"}, {"question": "q2", "lang": "fr", "level": 3}]
    out = rows(read_prompts(items, text_column="question"))
    assert [(r["question"], r["lang"]) for r in out] == [("q1", "en"), ("q2", "fr")]
    # a key only a later item has is kept, not dropped because the first item lacks it
    assert [r["level"] for r in out] == [None, 3]


# --- text files ---

def test_text_file_ids_name_file_and_byte_offset_and_skip_blank_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("first\n\nthird\n   \nfifth", encoding="utf-8")
    out = rows(read_prompts(str(path)))
    assert [r["text"] for r in out] == ["first", "third", "fifth"]
    assert [r["id"] for r in out] == [f"prompts.txt:0:{h8('first')}", f"prompts.txt:7:{h8('third')}",
                                      f"prompts.txt:17:{h8('fifth')}"]


def test_text_lines_split_on_newlines_only(tmp_path):
    # U+2028 and form feeds are not line breaks here (str.splitlines() would split on them),
    # a Windows \r\n is, and a UTF-8 byte-order mark is not part of the first prompt.
    path = tmp_path / "odd.txt"
    path.write_bytes("\ufeffone\u2028two\r\nthree\x0cfour\r\n".encode("utf-8"))
    out = rows(read_prompts(str(path)))
    assert [r["text"] for r in out] == ["one\u2028two", "three\x0cfour"]
    assert [r["id"].split(":")[1] for r in out] == ["0", "14"]  # byte offsets: the mark is 3 bytes


def test_byte_ranges_give_every_line_once_whatever_the_cut(tmp_path):
    """A file cut into ranges of a few bytes, so lines cross every boundary: the rows are those of
    reading it whole, each id's offset is a line start, and a two-byte character is never split."""
    lines = [json.dumps({"text": "\u00e9" * (i % 7) + f"#{i}"}, ensure_ascii=False) if i % 4 else ""
             for i in range(60)]
    path = tmp_path / "cut.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")  # no newline at the end
    expected = [json.loads(line)["text"] for line in lines if line]
    raw = path.read_bytes()
    files, root = list_files(str(path))
    for chunk_bytes in (1, 5, 64, len(raw) - 1, len(raw)):
        ds = ray.data.read_datasource(PromptFiles(str(path), files, root, "auto",
                                                  chunk_bytes=chunk_bytes))
        out = sorted(rows(ds), key=lambda r: int(r["id"].split(":")[1]))
        assert [r["text"] for r in out] == expected, chunk_bytes
        assert all(raw[int(r["id"].split(":")[1]) - 1:int(r["id"].split(":")[1])] in (b"", b"\n") for r in out)


def test_malformed_line_in_a_later_range_names_its_line(tmp_path):
    path = tmp_path / "late.jsonl"
    path.write_text('{"text": "a"}\n' * 50 + '{"text": oops}\n', encoding="utf-8")
    files, root = list_files(str(path))
    ds = ray.data.read_datasource(PromptFiles(str(path), files, root, "auto", chunk_bytes=100))
    assert str(input_error(ds)) == f"{path}:51: malformed JSON (Expecting value at column 10)"


def test_the_first_rows_are_the_first_files_first_block_read_without_ray(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"a{i}"}) + "\n" for i in range(BLOCK_ROWS + 5)))
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "b", "tools": []}) + "\n")
    first = first_rows(str(tmp_path))
    assert first.num_rows == BLOCK_ROWS and first["text"][0].as_py() == "a0" and "tools" not in first.column_names
    assert first_rows(["x", {"text": "y", "lora": "z"}]).column_names == ["text", "lora"]
    with pytest.raises(InputError, match="^a.jsonl: no column 'question'; columns are: text$"):
        first_rows(str(tmp_path), text_column="question")


def test_a_later_row_that_asks_for_what_the_plan_left_out_is_refused_naming_its_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"text": "b", "sampling_params": {"max_tokens": 2}})
                    + "\n" + json.dumps({"text": "c", "sampling_params": {"n": 2, "logprobs": None}}) + "\n")
    unplanned = RowAsks(frozenset({"tools"}), frozenset({"n", "logprobs"}))
    error = input_error(read_prompts(str(path), unplanned=unplanned))
    assert str(error) == (f"{path}:3: the row sets sampling_params.n, which none of the rows the job was planned from "
                          f"sets (the first file's first {BLOCK_ROWS}); put a row that sets it among those")
    assert len(rows(read_prompts(str(path), unplanned=RowAsks(frozenset({"tools"}))))) == 3  # nothing it left out


def test_one_file_reaches_the_model_stage_in_batches(tmp_path):
    """The reader's blocks are cut to the predictor's batch size, so one file feeds every replica."""
    path = write_jsonl(tmp_path / "big.jsonl", [{"text": f"p{i}"} for i in range(1000)])
    ds = read_prompts(path).repartition(target_num_rows_per_block=128)
    sizes = [ray.get(ref).num_rows for ref in ds.to_arrow_refs()]
    assert sum(sizes) == 1000 and max(sizes) <= 2 * 128 and len(sizes) >= 1000 // 256


def test_limit_leaves_the_global_data_context_alone(tmp_path):
    context = ray.data.DataContext.get_current()
    before = context.execution_options.preserve_order
    assert len(rows(read_prompts(PROMPTS_100, limit=3))) == 3
    assert ray.data.DataContext.get_current().execution_options.preserve_order == before


def test_prompts_100_asset_gives_100_unique_ids():
    out = rows(read_prompts(PROMPTS_100))
    assert len(out) == 100
    assert len({r["id"] for r in out}) == 100
    assert all(r["id"].startswith("prompts_100.txt:") for r in out)


# --- jsonl, csv, parquet ---

def test_jsonl_custom_text_column_and_extra_columns(tmp_path):
    path = write_jsonl(tmp_path / "qs.jsonl", [{"question": "why?", "topic": "sky"},
                                               {"question": "how?", "topic": "sea", "meta": {"n": 1}}])
    out = rows(read_prompts(path, text_column="question"))
    assert [r["question"] for r in out] == ["why?", "how?"]
    assert [r["topic"] for r in out] == ["sky", "sea"]
    assert out[1]["meta"] == {"n": 1}
    second = len(json.dumps({"question": "why?", "topic": "sky"})) + 1
    assert [r["id"] for r in out] == [f"qs.jsonl:0:{h8('why?')}", f"qs.jsonl:{second}:{h8('how?')}"]


def test_jsonl_string_holding_line_separator_is_one_row(tmp_path):
    path = tmp_path / "sep.jsonl"
    path.write_text(json.dumps({"text": "a\u2028b"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert [r["text"] for r in rows(read_prompts(str(path)))] == ["a\u2028b"]


def test_csv_keeps_text_and_ids_as_written(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("key,text,score\n007,hello,1.5\n7,world,2\n", encoding="utf-8")
    out = rows(read_prompts(str(path), id_column="key"))
    assert [r["id"] for r in out] == ["007", "7"]  # not both "7"
    assert [r["text"] for r in out] == ["hello", "world"]
    assert [r["score"] for r in out] == [1.5, 2.0]
    out = rows(read_prompts(str(path)))
    assert [r["id"] for r in out] == [f"p.csv:1:{h8('hello')}", f"p.csv:2:{h8('world')}"]


def test_parquet(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["x", "y", "z"], "n": [1, 2, 3]}), path)
    out = rows(read_prompts(str(path), text_column="prompt"))
    assert [(r["prompt"], r["n"]) for r in out] == [("x", 1), ("y", 2), ("z", 3)]
    assert out[2]["id"] == f"p.parquet:3:{h8('z')}"


def test_id_column_becomes_id_as_string(tmp_path):
    path = write_jsonl(tmp_path / "ids.jsonl", [{"uid": 10, "text": "a"}, {"uid": 11, "text": "b"}])
    out = rows(read_prompts(path, id_column="uid"))
    assert [r["id"] for r in out] == ["10", "11"]
    assert [r["uid"] for r in out] == [10, 11]


def test_explicit_format_reads_a_file_whatever_its_extension(tmp_path):
    path = tmp_path / "prompts.log"
    path.write_text("a\nb\n", encoding="utf-8")
    assert [r["text"] for r in rows(read_prompts(str(path), input_format="text"))] == ["a", "b"]


# --- folders ---

def test_folder_of_jsonl_files_ids_include_relative_file_name(tmp_path):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    write_jsonl(folder / "a.jsonl", [{"text": "same"}, {"text": "a2"}])
    write_jsonl(folder / "b.jsonl", [{"text": "same", "extra": "b"}])
    write_jsonl(folder / "sub" / "c.jsonl", [{"text": "same"}])
    (folder / "README.md").write_text("not prompts\n", encoding="utf-8")  # skipped: not an input format
    (folder / "_SUCCESS").write_text("", encoding="utf-8")
    out = rows(read_prompts(str(folder) + "/"))
    ids = sorted(r["id"] for r in out)
    second = len(json.dumps({"text": "same"})) + 1
    assert ids == sorted([f"a.jsonl:0:{h8('same')}", f"a.jsonl:{second}:{h8('a2')}", f"b.jsonl:0:{h8('same')}",
                          f"sub/c.jsonl:0:{h8('same')}"])
    assert {r["id"]: r.get("extra") for r in out}[f"b.jsonl:0:{h8('same')}"] == "b"


def test_limit_takes_the_first_rows_in_file_order(tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for n in (3, 0, 2, 1):  # written out of order: file order is by name
        (folder / f"part{n}.txt").write_text(f"p{n}-0\np{n}-1\n", encoding="utf-8")
    expected = ["p0-0", "p0-1", "p1-0"]  # across a file boundary
    assert [r["text"] for r in rows(read_prompts(str(folder), limit=3))] == expected
    assert [r["text"] for r in rows(read_prompts(str(folder), limit=3))] == expected


# --- errors: as the input scan before a run refuses the input (util/scan.py) ---

def test_missing_text_column_lists_available_columns(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "a", "lang": "en"}])
    assert scan_error(path) == "q.jsonl: no column 'text'; columns are: question, lang"
    with pytest.raises(InputError, match=r"^items: no column 'prompt'; columns are: text$"):
        read_prompts([{"text": "a"}], text_column="prompt")


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": broken}\n', encoding="utf-8")
    assert scan_error(path) == f"{path}:3: malformed JSON (Expecting value at column 10)"


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"text": "ok"}\n["a"]\n', encoding="utf-8")
    assert scan_error(path) == f"{path}:2: each line must be a JSON object, got list"


def test_non_utf8_text_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("fine\nalso fine\ncaf\u00e9\n".encode("latin-1"))
    assert scan_error(path) == f"{path}:3: not valid UTF-8 (invalid continuation byte at byte 18)"


def test_empty_file_is_an_input_error_naming_it(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"text": "a"}])
    (folder / "b.jsonl").write_text("", encoding="utf-8")  # found empty when the files are listed
    assert scan_error(folder) == f"{folder}/b.jsonl: empty file, no prompts in it"
    (folder / "b.jsonl").write_text("\n  \n\n", encoding="utf-8")  # only blank lines: found when it is read
    assert scan_error(folder) == f"{folder}/b.jsonl: empty file, no prompts in it"
    with pytest.raises(InputError, match=r"^items: the list holds no prompts$"):
        read_prompts([])


def test_duplicate_id_names_both_rows_by_line(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("key,text\n007,a\n7,b\n8,c\n7,d\n", encoding="utf-8")  # "007" and "7" differ
    assert scan_error(path, id_column="key") == "duplicate id '7' in column 'key': p.csv:2 and p.csv:4"
    nulls = write_jsonl(tmp_path / "n.jsonl", [{"uid": 1, "text": "a"}, {"text": "b"}, {"text": "c"}])
    assert [r["id"] for r in rows(read_prompts(nulls, id_column="uid"))] == ["1", None, None]
    scan = scan_input(read_prompts(nulls, id_column="uid", with_where=True), "uid", None, nulls)
    assert (scan.rows, scan.already_done) == (3, 0)  # missing ids are not equal to each other
    assert scan_error([{"uid": "a", "text": "x"}, {"uid": "b", "text": "y"}, {"uid": "a", "text": "z"}],
                      id_column="uid") == "duplicate id 'a' in column 'uid': items:1 and items:3"


def test_duplicate_id_across_files_names_both(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"uid": "x", "text": "1"}, {"uid": "y", "text": "2"}])
    write_jsonl(folder / "b.jsonl", [{"uid": "z", "text": "3"}, {"uid": "y", "text": "4"}])
    assert scan_error(folder, id_column="uid") == "duplicate id 'y' in column 'uid': a.jsonl:2 and b.jsonl:2"
    # Without an id column the ids are derived from file and position, so the same rows are fine.
    assert scan_input(read_prompts(str(folder)), None, None) == InputScan(rows=4, already_done=0)


def test_corrupt_parquet_is_an_input_error(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"not parquet at all")
    assert str(input_error(read_prompts(str(path)))).startswith(f"{path}: not a readable parquet file (")


def test_missing_path():
    with pytest.raises(InputError, match=r"^/nonexistent/prompts\.jsonl: no such file or folder$"):
        read_prompts("/nonexistent/prompts.jsonl")


def test_unknown_extension_with_auto_format(tmp_path):
    path = tmp_path / "prompts.dat"
    path.write_text("a\n", encoding="utf-8")
    with pytest.raises(InputError) as info:
        read_prompts(str(path))
    assert str(info.value) == (f"{path}: cannot tell the format from the extension .dat; "
                               "pass --input-format text, jsonl, csv or parquet")


def test_folder_without_input_files(tmp_path):
    (tmp_path / "README.md").write_text("no prompts here\n", encoding="utf-8")
    with pytest.raises(InputError) as info:
        read_prompts(str(tmp_path))
    assert str(info.value) == f"{tmp_path}: no files ending in .txt, .text, .jsonl, .json, .csv, .parquet, .pq in this folder"
    with pytest.raises(InputError, match=rf"^{tmp_path}: no files ending in \.csv in this folder$"):
        read_prompts(str(tmp_path), input_format="csv")
    formats = ", ".join(["text", "jsonl", "csv", "parquet", *registry("INPUT_FORMATS")])
    with pytest.raises(InputError, match=rf"^unknown input format 'xml'; use auto, {formats}$"):
        read_prompts(str(tmp_path), input_format="xml")


# --- an InputError, as it reaches the driver ---

def test_an_input_error_reaches_the_driver_typed_when_it_surfaces_at_write(tmp_path):
    """main.py's first action on the data is writing it: the error surfaces there, downstream of a map."""
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n{oops\n', encoding="utf-8")
    ds = read_prompts(str(path)).map_batches(lambda batch: batch, batch_format="pyarrow")
    with pytest.raises(InputError) as info:  # Ray's wrapper is an InputError too, and holds the original
        ds.write_parquet(str(tmp_path / "out"))
    error = original(info.value)
    assert type(error) is InputError and str(error) == (
        f"{path}:2: malformed JSON (Expecting property name enclosed in double quotes at column 2)")


def test_an_input_error_keeps_its_own_message_through_ray():
    import pickle

    error = InputError("f.jsonl:4: malformed JSON")
    error.args = (error.args[0] + "\nFailed to read after 1/10 attempts.",)  # Ray Data's retry advice
    copy = pickle.loads(pickle.dumps(error))  # as Ray hands a worker's exception to the driver
    assert type(copy) is InputError and str(copy) == str(error) == "f.jsonl:4: malformed JSON"
