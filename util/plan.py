"""The run's plan: everything the Config leaves open, resolved once, before anything reads a row.

    from util.config import Config
    from util.plan import make_plan
    ray.init()
    plan = make_plan(Config(model="google/gemma-7b-it", max_tokens=256))
    plan.output_path, plan.engine_kwargs, plan.sampling, plan.prompt_format   # what the stages receive

Resolved here, once: the output path, the accelerator, the engine arguments, the LoRA adapters (each
--lora adapter's config is read here: util/lora.py), the job's sampling (a --json-schema file is read
here, and only here), the batches each replica takes at once (plan.cfg.batches_in_flight, sized from the
engine's max_num_seqs), the prompt format that "auto" stands for, the model's max_model_len, where a
replica runs, the fingerprint that a resumed output must match, and the provenance the manifest
records. A CPU-only cluster too small for the replicas is refused here
(InputError), since Ray would otherwise wait forever for a CPU that never frees; an autoscaling pool
(--concurrency MIN-MAX) must fit its MIN.
"""

import dataclasses
import hashlib
import json
import os

import ray

from util.accelerator import AcceleratorChoice, advertised_accelerator_types, choose_accelerator
from util.config import Config
from util.engine import (CPU_ENV_VARS, batches_in_flight, engine_kwargs, gpus_per_replica, replica_placement,
                         with_gpu_defaults)
from util.errors import InputError
from util.lora import plan_lora
from util.prompt_format import TextOnlyModel, choose_prompt_format, model_max_length, model_processor
from util.reading import OpenAIBatchKind, openai_batch_kind
from util.resources import CPU_REPLICA_CPUS, TASK_CPUS
from util.resume import fingerprint
from util.storage import generate_output_path, resolve
from util.structured_output import job_spec


@dataclasses.dataclass(frozen=True)
class Plan:
    cfg: Config
    output_path: str
    task: str  # generate or embed: --task, or what an OpenAI batch file's urls ask for
    choice: AcceleratorChoice  # GPU or CPU, and which accelerator type the replicas ask for
    engine_kwargs: dict  # vLLM engine arguments of every replica
    adapters: dict  # the LoRA adapters registered with --lora, {name: path}, each one checked (util/lora.py)
    sampling: dict  # the job's SamplingParams keyword arguments; a row's sampling_params go on top
    prompt_format: str  # chat_template, table or plain: what "auto" resolved to
    max_model_len: int | None  # the longest prompt plus output the engine takes (None: not known here)
    replica_resources: dict  # ds.map_batches resource arguments for one replica
    gpus_per_replica: float
    fingerprint: dict  # the settings that decide a row's output (util/resume.py)
    provenance: dict  # versions, model commit and prompt format, for the manifest
    images: bool = False  # rows carry images (--image-column, or image_url parts in an OpenAI batch file)

    @property
    def rows_in_flight(self) -> int:
        """Rows one replica holds at once: batch_size x batches_in_flight (both resolved here)."""
        return self.cfg.batch_size * self.cfg.batches_in_flight

    @property
    def gpus_held(self) -> float:
        """GPUs the run holds while it runs: every replica's, for the whole wall time. An autoscaling
        pool (--concurrency MIN-MAX) holds at most its MAX replicas' GPUs: GPU-hours from this are a bound."""
        return self.cfg.most_replicas * self.gpus_per_replica if self.choice.use_gpu else 0.0


def read_json_schema(json_schema: str | None):
    """--json-schema as given: inline JSON (left for job_spec to parse), or a file (local, s3:// or
    gs://), read and parsed here, once per run."""
    if json_schema is None or json_schema.lstrip().startswith("{"):
        return json_schema
    filesystem, path = resolve(json_schema)
    try:
        with filesystem.open_input_stream(path) as stream:
            text = stream.read().decode("utf-8")
    except FileNotFoundError:
        raise ValueError(f"--json-schema: no such file {json_schema} (pass a schema inline or a .json file)") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--json-schema: {json_schema} is not valid JSON: {error}") from None


def job_sampling(cfg: Config) -> dict:
    """Keyword arguments for vLLM's SamplingParams, shared by every row unless a row overrides them;
    `reasoning_parser` among them is the predictor's (util/reasoning.py), not the engine's."""
    sampling = {"max_tokens": cfg.max_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p,
                "stop": list(cfg.stop), "seed": cfg.seed}
    # Only when asked for, so that an output made before these flags existed still resumes.
    richer = {"n": cfg.n if cfg.n != 1 else None, "logprobs": cfg.logprobs,
              "prompt_logprobs": cfg.prompt_logprobs, "reasoning_parser": cfg.reasoning_parser}
    sampling.update({k: v for k, v in richer.items() if v is not None})
    structured = job_spec(read_json_schema(cfg.json_schema), cfg.regex, cfg.choice)
    return {**sampling, "structured_outputs": structured} if structured else sampling


def check_cluster_fits(concurrency: int, use_gpu: bool, cluster: dict) -> None:
    """Raises InputError when a CPU-only cluster cannot hold the replicas (an autoscaling pool's MIN: it
    grows as CPUs free or nodes join) and one formatting or reading task at a time beside them. A GPU
    cluster may be autoscaling, so there Ray Data waits for the nodes."""
    cpus = float(cluster.get("CPU", 0))
    need = concurrency * CPU_REPLICA_CPUS + TASK_CPUS
    if not use_gpu and need > cpus:
        raise InputError(
            f"--concurrency {concurrency} needs {need:g} CPUs on this CPU-only cluster: {CPU_REPLICA_CPUS:g} "
            f"for each of {concurrency} replica(s) and {TASK_CPUS:g} for reading, formatting and writing; "
            f"the cluster has {cpus:g}. Lower --concurrency, or add CPUs")


def image_processor(cfg: Config, image_request: str | None):
    """The model's processor, for a job whose rows carry images: ValueError (exit 2) when the model takes
    none, or its prompt format cannot place them (a vision job formats with the processor's chat
    template). None for a processor that cannot be loaded on the driver: left to the formatter, as a
    tokenizer is."""
    given = f"--image-column {cfg.image_column}" if cfg.image_column else f"{image_request} has an image_url part"
    try:
        processor = model_processor(cfg.model, cfg.revision)
    except TextOnlyModel as error:
        raise ValueError(f"{given}, but {error}") from None
    except Exception:
        return None
    if choose_prompt_format(cfg.model, processor, cfg.prompt_format) != "chat_template":
        raise ValueError(f"{given}, but images need the model's chat template to place them: "
                         f"--prompt-format {cfg.prompt_format} and {cfg.model} has "
                         f"{'a' if getattr(processor, 'chat_template', None) else 'no'} chat template")
    return processor


def resolve_model(cfg: Config, engine: dict, processor=None) -> tuple[str, int | None, dict]:
    """The prompt format "auto" stands for, max_model_len, and the model's provenance: its hub commit and
    a hash of its chat template (a vision job's `processor`'s, which formats its prompts, else the
    tokenizer's). The tokenizer is loaded once, here. A model whose tokenizer cannot be loaded on the
    driver is left to the formatter, which reports the problem with the rows it meets."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    record = {"torch": torch.__version__, "transformers": transformers.__version__, "model_commit": None,
              "prompt_format": None, "chat_template_sha256": None}
    prompt_format, max_model_len = cfg.prompt_format, engine.get("max_model_len")
    try:  # a vision job's processor holds the tokenizer already
        templates = processor or AutoTokenizer.from_pretrained(cfg.model, revision=cfg.revision)
    except Exception:
        return prompt_format, max_model_len, record
    prompt_format = choose_prompt_format(cfg.model, templates, cfg.prompt_format)  # ValueError: refused
    record["prompt_format"] = prompt_format
    template = getattr(templates, "chat_template", None)
    if isinstance(template, str):
        record["chat_template_sha256"] = hashlib.sha256(template.encode()).hexdigest()[:16]
    try:
        max_model_len = model_max_length(cfg.model, cfg.revision, max_model_len)
    except Exception:  # a tokenizer without a model config: the formatter looks again
        pass
    if not os.path.isdir(cfg.model):
        try:
            from huggingface_hub import HfApi

            record["model_commit"] = HfApi().model_info(cfg.model, revision=cfg.revision, timeout=10).sha
        except Exception:  # offline: the revision asked for is in the fingerprint all the same
            pass
    return prompt_format, max_model_len, record


def openai_kind(cfg: Config) -> OpenAIBatchKind | None:
    """For an OpenAI batch file: its task and its first image (one pass over its lines); else None."""
    return openai_batch_kind(cfg.input_path) if cfg.input_format == "openai" and cfg.input_path else None


def resolve_task(cfg: Config, kind: OpenAIBatchKind | None = None) -> str:
    """--task, or for an OpenAI batch file the task its urls say (InputError for a file that mixes them,
    or one that contradicts an explicit --task). `kind`: the file's openai_kind, if read already."""
    kind = kind or openai_kind(cfg)
    if kind is None:
        return cfg.task
    task = kind.task
    if cfg.task != "generate" and task != cfg.task:
        raise InputError(f"--task {cfg.task}, but {cfg.input_path} holds requests for the {task} task")
    return task


def gpu_type(choice: AcceleratorChoice, cluster: dict) -> str | None:
    """The replicas' GPU type: the one asked for, else the cluster's when all its GPU nodes advertise one."""
    if choice.accelerator_type:
        return choice.accelerator_type
    advertised = advertised_accelerator_types(cluster)
    return advertised[0] if len(advertised) == 1 else None


def output_path_of(cfg: Config) -> str:
    """--output-path, else a path made from the run name and the model, the same on every re-run."""
    return cfg.output_path or generate_output_path(cfg.model, cfg.run_name)


def make_plan(cfg: Config, cluster: dict | None = None, resolve_model_files: bool = True) -> Plan:
    """The plan for `cfg` on this Ray cluster (`cluster`: its resources, else ray.cluster_resources()).
    resolve_model_files=False skips the tokenizer and the hub, for stand-in stages that need no model."""
    import vllm

    cluster = ray.cluster_resources() if cluster is None else cluster
    kind = openai_kind(cfg)
    task = resolve_task(cfg, kind)  # before anything else: a mixed OpenAI file is refused without an engine
    image_request = kind.first_image if kind else None
    images = cfg.image_column is not None or image_request is not None
    # A text-only model given images is refused here, before any engine.
    processor = image_processor(cfg, image_request) if images and resolve_model_files else None
    choice = choose_accelerator(cfg.accelerator_type, cluster)
    check_cluster_fits(cfg.concurrency, choice.use_gpu, cluster)
    adapters, lora_engine = plan_lora(cfg.lora, cfg.max_loras, cfg.max_lora_rank, task, choice.use_gpu)
    engine = engine_kwargs(cfg, choice.use_gpu, images, lora_engine)
    # The GPU type's scheduling defaults go under every other engine argument, and stay out of the
    # fingerprint: they change how fast rows come back, not what they say.
    tuned = with_gpu_defaults(engine, gpu_type(choice, cluster)) if choice.use_gpu else engine
    cfg = dataclasses.replace(cfg, batches_in_flight=batches_in_flight(cfg, tuned))
    sampling = job_sampling(cfg)
    if resolve_model_files:
        prompt_format, max_model_len, model_record = resolve_model(cfg, engine, processor)
    else:
        prompt_format, max_model_len, model_record = cfg.prompt_format, engine.get("max_model_len"), {}
    if task == "embed" and cfg.prompt_format == "auto":  # the text embedded as given: no chat template
        prompt_format = model_record["prompt_format"] = "plain"
    resources = replica_placement(cfg, choice, engine)
    if not choice.use_gpu:
        resources = {**resources, "runtime_env": {"env_vars": CPU_ENV_VARS}}
    accelerator = choice.accelerator_type or ("GPU" if choice.use_gpu else "CPU")
    return Plan(cfg=cfg, output_path=output_path_of(cfg), task=task,
                choice=choice, engine_kwargs=tuned, adapters=adapters, sampling=sampling,
                prompt_format=prompt_format,
                max_model_len=max_model_len, replica_resources=resources, gpus_per_replica=gpus_per_replica(cfg),
                fingerprint=fingerprint(cfg, sampling, engine, task, images, adapters),
                provenance={"vllm": vllm.__version__, "ray": ray.__version__, "accelerator": accelerator,
                            **model_record}, images=images)
