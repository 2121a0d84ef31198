"""The flat config and its command line: defaults, types, unknown keys, engine arguments."""

import pytest

from util.config import Config, parse_args
from util.stages import engine_kwargs


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
    (["--output-format", "xml"], "output_format must be one of parquet, jsonl, openai; got 'xml'"),
])
def test_bad_flags_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_engine_arg_keys_are_refused():
    with pytest.raises(ValueError, match="unknown --engine-arg key\\(s\\): max_num_seqz"):
        engine_kwargs(Config(engine_arg={"max_num_seqz": 4}))


def test_engine_kwargs_precedence():
    kwargs = engine_kwargs(Config(model="google/gemma-7b-it", tensor_parallel_size=2,
                                  engine_arg={"max_model_len": 1024}))
    assert kwargs["max_model_len"] == 1024  # the user's key beats the per-model table
    assert (kwargs["tensor_parallel_size"], kwargs["distributed_executor_backend"]) == (2, "ray")
    assert engine_kwargs(Config(model="google/gemma-7b-it"))["max_model_len"] == 2432


def test_a_multi_gpu_replica_gets_a_placement_group_of_one_gpu_bundle_each():
    from util.accelerator import AcceleratorChoice
    from util.stages import replica_placement

    gpu = AcceleratorChoice(use_gpu=True, accelerator_type="H100", num_gpus_in_cluster=8)
    assert replica_placement(Config(), gpu) == {"num_gpus": 1.0, "accelerator_type": "H100"}
    placement = replica_placement(Config(tensor_parallel_size=2, pipeline_parallel_size=2), gpu)
    assert placement["num_gpus"] == 0  # vLLM's workers hold the GPUs, not the replica's actor
    bundles, strategy = placement["ray_remote_args_fn"].args
    assert bundles == [{"GPU": 1, "CPU": 1, "accelerator_type:H100": 0.001}] * 4 and strategy == "PACK"
    assert replica_placement(Config(tensor_parallel_size=2), gpu)["ray_remote_args_fn"].args[1] == "STRICT_PACK"
    # Local processes instead: the actor reserves the GPUs itself.
    local = Config(tensor_parallel_size=2, engine_arg={"distributed_executor_backend": "mp"})
    assert replica_placement(local, gpu) == {"num_gpus": 2, "accelerator_type": "H100"}
