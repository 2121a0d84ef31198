"""The output's manifest: how the last run went, and the settings the output was generated with.

    from util.manifest import Manifest, check_fingerprint, fingerprint
    settings = fingerprint(cfg, use_gpu=True)
    check_fingerprint(output_path, settings)       # InputError if the output was made with other settings
    manifest = Manifest(output_path, settings, accelerator="A10G")
    manifest.start(input=100, already_done=0)      # status "running"
    manifest.finish(ok=98, error=2)                # "complete"; manifest.fail(reason): "failed"

`_manifest.json` lies in the output folder (its leading underscore keeps readers from taking it for data):

    {"status": "complete", "reason": null,
     "counts": {"input": 100, "ok": 98, "error": 2, "already_done": 0},   # input == ok + error + already_done
     "output": {"ok": 98, "error": 2},                                    # rows in the folder, from all runs
     "started": "2025-01-01T12:00:00+00:00", "finished": "2025-01-01T12:09:30+00:00",
     "fingerprint": {"model": ..., "sampling": {...}, "engine": {...}, ...}, "fingerprint_hash": "3f2a9c1d07be",
     "provenance": {"vllm": "0.26.0", "ray": "2.60.0", "accelerator": "A10G", "torch": ..., "transformers": ...,
                    "model_commit": "41b61a33...", "prompt_format": "chat_template", "chat_template_sha256": ...}}

`counts` are the last run's: `input` rows read, `already_done` of them skipped because an earlier run
wrote them, and `ok` and `error` of them written now. Resuming into an output generated with other
settings would mix two configurations in one result, so a run refuses to, and says exactly what changed.
"""

import datetime
import hashlib
import json
import os
import re

import ray

from util.config import Config
from util.output import MANIFEST_NAME, commit_file
from util.reading import ID_SCHEME, InputError
from util.stages import engine_kwargs
from util.storage import resolve


def fingerprint(cfg: Config, use_gpu: bool = True) -> dict:
    """The settings that decide a row's output; a run that resumes an output must have the same."""
    settings = {"model": cfg.model, "revision": cfg.revision, "prompt_format": cfg.prompt_format,
                "system_prompt": cfg.system_prompt, "text_column": cfg.text_column, "id_column": cfg.id_column,
                "id_scheme": None if cfg.id_column else ID_SCHEME,
                "output_format": cfg.output_format, "sampling": cfg.sampling(),
                "engine": engine_kwargs(cfg, use_gpu)}
    return json.loads(json.dumps(settings, default=str))  # as it reads back from the file: tuples are lists


def fingerprint_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def _flatten(settings: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def fingerprint_changes(before: dict, after: dict) -> list[str]:
    """What differs, one `name: old -> new` each, e.g. `sampling.max_tokens: 32 -> 64`."""
    old, new = _flatten(before), _flatten(after)
    show = lambda flat, key: json.dumps(flat[key]) if key in flat else "(unset)"
    return [f"{key}: {show(old, key)} -> {show(new, key)}"
            for key in sorted(old.keys() | new.keys()) if old.get(key, ...) != new.get(key, ...)]


def check_accounting(input_rows: int, written: dict, already_done: int) -> None:
    """Every input row is written now (ok or failed) or was already: anything else is a bug, loudly."""
    if input_rows != written["ok"] + written["error"] + already_done:
        raise RuntimeError(f"row accounting is off: {input_rows} input rows, but {written['ok']} ok + "
                           f"{written['error']} errors + {already_done} already done")


def over_error_budget(output: dict, max_error_fraction: float, output_path: str) -> str | None:
    """Why the run fails although every row is written (too many failed rows in the output), or None."""
    rows = output["ok"] + output["error"]
    failed_share = output["error"] / max(1, rows)
    if failed_share <= max_error_fraction:
        return None
    return (f"{output['error']} of {rows} output rows failed ({failed_share:.0%}), more than "
            f"--max-error-fraction {max_error_fraction} allows; they are in {output_path}/errors")


def model_provenance(cfg: Config) -> dict:
    """What the model and `--prompt-format auto` resolved to when the run started: the hub commit, the
    prompt format chosen and a hash of the chat template, so an output can be traced to its exact inputs.
    Every row of an output shares them: a run with other settings is refused (check_fingerprint)."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    from util.prompt_format import choose_prompt_format

    record = {"torch": torch.__version__, "transformers": transformers.__version__, "model_commit": None,
              "prompt_format": None, "chat_template_sha256": None}
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model, revision=cfg.revision)
        record["prompt_format"] = choose_prompt_format(cfg.model, tokenizer, cfg.prompt_format)
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, str):
            record["chat_template_sha256"] = hashlib.sha256(template.encode()).hexdigest()[:16]
    except Exception:  # noted as unknown; the formatter reports a real problem with the row that meets it
        pass
    if not os.path.isdir(cfg.model):
        try:
            from huggingface_hub import HfApi

            record["model_commit"] = HfApi().model_info(cfg.model, revision=cfg.revision, timeout=10).sha
        except Exception:  # offline: the revision asked for is in the fingerprint all the same
            pass
    return record


def read_manifest(output_path: str) -> dict | None:
    filesystem, path = resolve(output_path)
    try:
        with filesystem.open_input_stream(f"{path}/{MANIFEST_NAME}") as stream:
            return json.loads(stream.read())
    except FileNotFoundError:
        return None


def check_fingerprint(output_path: str, settings: dict) -> None:
    """Raise an InputError if `output_path` holds output generated with other settings. An output
    without a manifest (written by hand, or by an older version) is resumed as it is."""
    earlier = read_manifest(output_path)
    changes = fingerprint_changes(earlier.get("fingerprint", {}), settings) if earlier else []
    if changes:
        raise InputError(f"{output_path} holds output generated with other settings ({'; '.join(changes)}); "
                         "pass --overwrite to delete the earlier output and start over, "
                         "or choose another --output-path")


def failure_reason(error: BaseException) -> str:
    """The reason a run failed, for the manifest. Ray hands a worker's exception over as traceback text,
    in which the first `SomeError: message` line is the original exception: that line, not the text."""
    text = str(error).strip()
    if isinstance(error, ray.exceptions.RayError):
        root = re.search(r"^(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*: .+)$", re.sub(r"\x1b\[[0-9;]*m", "", text), re.MULTILINE)
        if root:
            return root.group(1)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class Manifest:
    """One run's manifest, rewritten whole, and atomically, at each change of status."""

    def __init__(self, output_path: str, settings: dict, accelerator: str, model: dict | None = None):
        import vllm

        self.output_path = output_path
        self.record = {"status": None, "reason": None,
                       "counts": {"input": None, "ok": None, "error": None, "already_done": None},
                       "output": None, "started": None, "finished": None,
                       "fingerprint": settings, "fingerprint_hash": fingerprint_hash(settings),
                       "provenance": {"vllm": vllm.__version__, "ray": ray.__version__, "accelerator": accelerator,
                                      **(model or {})}}

    def save(self) -> None:
        filesystem, path = resolve(self.output_path)
        commit_file(filesystem, f"{path}/{MANIFEST_NAME}", json.dumps(self.record, indent=2).encode() + b"\n")

    def start(self, input: int, already_done: int) -> None:
        self.record["counts"].update(input=input, already_done=already_done)
        self.record.update(status="running", started=_now())
        self.save()

    def finish(self, ok: int, error: int, output: dict | None = None, failure: str | None = None) -> None:
        """Everything is written. `failure`: why the run still failed (too many errors)."""
        self.record["counts"].update(ok=ok, error=error)
        self.record.update(status="failed" if failure else "complete", reason=failure, output=output,
                           finished=_now())
        self.save()

    def fail(self, reason: str) -> None:
        self.record.update(status="failed", reason=reason, finished=_now())
        self.save()
