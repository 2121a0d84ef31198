"""The flat config and its command line: defaults, types, bad flags. The engine arguments and the rest of
what a run resolves from the config are in test_plan.py."""

import pytest

from util.config import parse_args
from util.parts import features, registry

OUTPUT_FORMATS = list(registry("OUTPUT_FORMATS"))  # a feature's formats (openai's), where it is present
IMAGES = "util.features.images" in [module.__name__ for module in features()]


def test_defaults_match_the_original_template():
    cfg = parse_args([])
    assert cfg.model == "mistralai/Mistral-7B-Instruct-v0.1"
    assert (cfg.temperature, cfg.max_tokens, cfg.concurrency, cfg.gpus_per_replica) == (0.0, 2048, 4, 1.0)
    assert cfg.stop == []


def test_flags_are_typed_and_repeatable():
    cfg = parse_args(["--max-tokens", "7", "--temperature", "0.5", "--stop", "END", "--stop", "###",
                      "--engine-arg", "max_num_seqs=8", "--engine-arg", "load_format=dummy",
                      "--engine-arg", "enable_prefix_caching=False", "--limit", "3"])
    assert (cfg.max_tokens, cfg.temperature, cfg.stop, cfg.limit) == (7, 0.5, ["END", "###"], 3)
    assert cfg.engine_arg == {"max_num_seqs": 8, "load_format": "dummy", "enable_prefix_caching": False}


@pytest.mark.parametrize("argv, message", [
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--max-tokens", "many"], "argument --max-tokens: invalid int value: 'many'"),
    (["--engine-arg", "novalue"], "--engine-arg takes key=value"),
    (["--output-format", "xml"], f"output_format must be one of {', '.join(['parquet', 'jsonl', *OUTPUT_FORMATS])}; got 'xml'"),
    (["--top-p", "0"], "error: --top-p must be in (0, 1], got 0.0"),  # a value checked by the Config
    (["--concurrency", "0"], "error: --concurrency needs at least 1 replica, got 0"),
    (["--concurrency", "a-b"], "argument --concurrency: --concurrency takes N or MIN-MAX (e.g. 4, or 1-8 to "
                               "autoscale), got 'a-b'"),
    (["--max-concurrency", "8"], "unrecognized arguments: --max-concurrency"),  # set by --concurrency only
    (["--image-column"], "argument --image-column: expected one argument") if IMAGES else
    (["--image-column", "x"], "unrecognized arguments: --image-column x"),  # a feature's flag, with its module
])
def test_bad_flags_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
