"""The job's one flat, typed configuration, and the command line built from it.

    from util.config import Config, parse_args
    cfg = parse_args(["--model", "google/gemma-7b-it", "--max-tokens", "256"])
    cfg = Config(model="google/gemma-7b-it", max_tokens=256)      # the same, from Python

Each field becomes a `--flag` (underscores turn into dashes) with the field's comment as help.
Unknown flags and values of the wrong type are rejected before anything starts.
"""

import argparse
import ast
import dataclasses
import typing
from dataclasses import dataclass, field


def _help(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class Config:
    # --- model ---
    model: str = _help("Hugging Face model id or local model directory.",
                       default="mistralai/Mistral-7B-Instruct-v0.1")
    revision: str | None = _help("Model revision (branch, tag or commit) on the hub.", default=None)
    # --- input ---
    input_path: str | None = _help("File or folder of prompts: local, s3:// or gs://. "
                                   "Default: the five sample prompts.", default=None)
    input_format: str = _help("auto, text, jsonl, csv or parquet. auto goes by file extension.", default="auto")
    text_column: str = _help("Column holding the prompt text (text files: 'text').", default="text")
    id_column: str | None = _help("Column holding a unique row id. Default: derived from position and content.",
                                  default=None)
    limit: int | None = _help("Only process the first N rows (for trials).", default=None)
    # --- prompt ---
    system_prompt: str | None = _help("System message for models with a chat template.", default=None)
    prompt_format: str = _help("auto (table, then chat template, then plain), chat_template, table or plain.",
                               default="auto")
    # --- sampling ---
    max_tokens: int = _help("Most tokens generated per row.", default=2048)
    temperature: float = _help("0 is greedy and deterministic.", default=0.0)
    top_p: float = _help("Nucleus sampling mass, in (0, 1].", default=1.0)
    stop: list[str] = _help("Stop strings (repeat the flag for several). Default: none; a model's own "
                            "end-of-turn tokens (from its generation config) end a row already.",
                            default_factory=list)
    seed: int = _help("Sampling seed, for reproducible runs at temperature > 0.", default=0)
    # --- engine and scaling ---
    concurrency: int = _help("Number of model replicas (vLLM engines).", default=4)
    gpus_per_replica: float = _help("GPUs each replica reserves.", default=1.0)
    tensor_parallel_size: int = _help("GPUs a replica shards each layer across (one node).", default=1)
    pipeline_parallel_size: int = _help("Stages a replica splits the layers into, one GPU group each; "
                                        "with tensor parallelism a replica spans TP x PP GPUs, across "
                                        "nodes if need be.", default=1)
    batch_size: int = _help("Rows per batch handed to a replica; several batches are in flight at once.",
                            default=128)
    batches_in_flight: int = _help("Batches each replica works on at once. batch_size x batches_in_flight "
                                   "should exceed the engine's max_num_seqs, so it never runs dry.", default=16)
    accelerator_type: str = _help("auto (A10G on AWS, L4 on GCP, or what the cluster advertises), "
                                  "any, or a Ray accelerator type such as A10G, L4, H100.", default="auto")
    engine_arg: dict = _help("Extra vLLM engine argument key=value (repeatable), e.g. max_num_seqs=256.",
                             default_factory=dict)
    # --- output ---
    output_path: str | None = _help("Where results go. Default: $ANYSCALE_ARTIFACT_STORAGE or outputs/, "
                                    "then run name and model.", default=None)
    output_format: str = _help("parquet or jsonl.", default="parquet")
    run_name: str = _help("Names the default output folder, so a re-run finds its earlier output.",
                          default="batch-llm")
    # --- modes ---
    smoke: bool = _help("Run offline on CPU with a tiny random-weight model built locally.", default=False)

    def __post_init__(self) -> None:
        choices = {"input_format": ("auto", "text", "jsonl", "csv", "parquet"),
                   "prompt_format": ("auto", "chat_template", "table", "plain"),
                   "output_format": ("parquet", "jsonl")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")

    def sampling(self) -> dict:
        """Keyword arguments for vLLM's SamplingParams, shared by every row unless a row overrides them."""
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "stop": list(self.stop), "seed": self.seed}


def parse_engine_arg(text: str) -> tuple[str, typing.Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--engine-arg takes key=value, got {text!r}")
    try:
        return key.strip(), ast.literal_eval(value)  # numbers, booleans, lists, dicts
    except (ValueError, SyntaxError):
        return key.strip(), value  # plain strings need no quotes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Offline batch LLM inference with Ray Data and vLLM.")
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        flag, help_text = "--" + f.name.replace("_", "-"), f.metadata["help"]
        kind = hints[f.name]
        if kind is bool:
            parser.add_argument(flag, action="store_true", help=help_text)
        elif f.name == "engine_arg":
            parser.add_argument(flag, type=parse_engine_arg, action="append", default=[], help=help_text)
        elif kind == list[str]:
            parser.add_argument(flag, action="append", default=None, help=help_text)
        else:
            scalar = next(t for t in typing.get_args(kind) or (kind,) if t is not type(None))
            parser.add_argument(flag, type=scalar, default=argparse.SUPPRESS, help=help_text)
    return parser


def parse_args(argv: list[str] | None = None) -> Config:
    args = vars(build_parser().parse_args(argv))
    args["engine_arg"] = dict(args["engine_arg"])
    if args["stop"] is None:
        del args["stop"]
    try:
        return Config(**args)
    except ValueError as error:
        build_parser().error(str(error))  # exits 2 with the usage line, like any other bad flag


def smoke_config(cfg: Config) -> Config:
    """The offline trial run: a tiny random-weight model built locally, a few prompts, short outputs.
    Only fields still at their defaults change, so `--smoke --limit 5` still means 5 rows."""
    from util.tiny_model import tiny_model_dir

    defaults, preset = Config(), {"model": tiny_model_dir(), "input_path": "assets/prompts_100.txt",
                                  "limit": 20, "max_tokens": 32, "concurrency": 1, "run_name": "smoke"}
    changes = {k: v for k, v in preset.items() if getattr(cfg, k) == getattr(defaults, k)}
    return dataclasses.replace(cfg, **changes)
