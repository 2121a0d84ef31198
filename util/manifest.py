"""The output's manifest: how the last run went, and the settings the output was generated with.

    from util.manifest import Manifest, read_manifest
    manifest = Manifest(output_path, plan.fingerprint, plan.provenance)  # util/plan.py resolves both
    manifest.start(input=100, already_done=0)      # status "running"
    manifest.finish(ok=98, error=2)                # "complete"; manifest.fail(reason): "failed"
    read_manifest(output_path)["status"]           # "complete"; None when there is no manifest

`_manifest.json` lies in the output folder (its leading underscore keeps readers from taking it for data):

    {"status": "complete", "reason": null,
     "counts": {"input": 100, "ok": 98, "error": 2, "already_done": 0},   # input == ok + error + already_done
     "output": {"ok": 98, "error": 2},                                    # rows in the folder, from all runs
     "started": "2025-01-01T12:00:00+00:00", "finished": "2025-01-01T12:09:30+00:00",
     "fingerprint": {"model": ..., "sampling": {...}, "engine": {...}, ...}, "fingerprint_hash": "3f2a9c1d07be",
     "provenance": {"vllm": "0.26.0", "ray": "2.60.0", "accelerator": "A10G", "torch": ..., "transformers": ...,
                    "model_commit": "41b61a33...", "prompt_format": "chat_template", "chat_template_sha256": ...}}

`counts` are the last run's: `input` rows read, `already_done` of them skipped because an earlier run
wrote them, and `ok` and `error` of them written now. A run refuses to resume an output whose
fingerprint differs from its own (util/resume.py).
"""

import datetime
import hashlib
import json

from util.storage import commit_file, resolve

MANIFEST_NAME = "_manifest.json"


def fingerprint_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def read_manifest(output_path: str) -> dict | None:
    filesystem, path = resolve(output_path)
    try:
        with filesystem.open_input_stream(f"{path}/{MANIFEST_NAME}") as stream:
            return json.loads(stream.read())
    except FileNotFoundError:
        return None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class Manifest:
    """One run's manifest, rewritten whole, and atomically, at each change of status."""

    def __init__(self, output_path: str, settings: dict, provenance: dict):
        self.output_path = output_path
        self.record = {"status": None, "reason": None,
                       "counts": {"input": None, "ok": None, "error": None, "already_done": None},
                       "output": None, "started": None, "finished": None,
                       "fingerprint": settings, "fingerprint_hash": fingerprint_hash(settings),
                       "provenance": provenance}

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
