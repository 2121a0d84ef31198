"""Vision throughput through main.py: a LLaVA-1.5-7B-like model (util/model_dirs/tiny_model.py `llava-7b`: CLIP
ViT-L/14 at 336 px, 576 image tokens, on Mistral-7B; vLLM load_format=dummy), one image per row.

    python -m bench.images --out bench-images                                    # GPU: 2,000 rows, 1 GPU
    python -m bench.images --out bench-text --without-images                     # GPU: the same rows, no image
    python -m bench.images --out /tmp/bi --tiny --num-prompts 8 --max-output 16  # CPU: the tiny LLaVA

Writes --num-prompts images (336x336 JPEGs, each its own: a gradient and a stripe pattern from the row's
index, so that vLLM's caches never serve one row from another's image) and the standard workload
(bench/workload.py: prompts of about 100 tokens, 16 to --max-output output tokens fixed per row with
ignore_eos) with each row's image path in an `image` column, then runs main.py on it once
(--image-column image). Reports, from the run's _report.json, output tok/s and rows/s from the replica's
engine being ready to its last batch (engine start excluded, as bench/replicas.py), input tokens per
row (the image's tokens included) and wall time; prints them and writes results.json under --out.

--tiny runs the tiny random LLaVA on CPU instead, to check the command end to end; vLLM's CPU build needs
tests/no_torchvision on the path to load LLaVA there (that file says why).
"""

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.replicas import generation_rate
from bench.run import GPU_ENGINE_ARGS
from bench.workload import make_workload

REPO = Path(__file__).resolve().parents[1]
SIDE = 336  # LLaVA-1.5's tower sees 336x336: larger images are only resized down first


def write_image(path: Path, index: int, side: int = SIDE) -> None:
    """An image of its own for row `index`: a colour gradient, and stripes whose period and angle vary."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    stripes = np.sin((x * (index % 7 + 1) + y * (index % 5 + 1)) * (4 + index % 11) * np.pi)
    base = np.stack([x, y, 1 - x], axis=-1) * 180 + (index * np.array([37, 59, 83]) % 64)
    pixels = np.clip(base + 40 * stripes[..., None], 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, "JPEG", quality=90)


def write_workload(out: Path, num_prompts: int, max_output: int) -> Path:
    """The standard workload with an `image` column, and its images; the JSONL file's path."""
    folder = out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    rows = make_workload(num_prompts, max_tokens=max_output)
    paths = [folder / f"{index:06d}.jpg" for index in range(len(rows))]
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:  # numpy and PIL let go of the GIL
        list(pool.map(write_image, paths, range(len(rows))))
    for row, path in zip(rows, paths):
        row["image"] = str(path)
    workload = out / "workload.jsonl"
    workload.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return workload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-prompts", type=int, default=2000)
    parser.add_argument("--max-output", type=int, default=512)
    parser.add_argument("--tiny", action="store_true", help="the tiny LLaVA on CPU instead of the 7B shape on GPU")
    parser.add_argument("--model-dir", default="/tmp/bench-llava-7b", help="where the 7B shape is built")
    parser.add_argument("--engine-arg", action="append", default=[], help="key=value, after the bench's own")
    parser.add_argument("--without-images", action="store_true",
                        help="the same rows and model with no image: the text-only baseline")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    from util.model_dirs.tiny_model import build_model_dir, tiny_llava_dir

    model = tiny_llava_dir() if args.tiny else build_model_dir(args.model_dir, "llava-7b")
    workload = write_workload(out, args.num_prompts, args.max_output)
    engine = [] if args.tiny else [f"--engine-arg={k}={v}" for k, v in GPU_ENGINE_ARGS.items()]
    env = dict(os.environ)
    if args.tiny:  # vLLM's CPU build loads LLaVA only with this on the path (tests/no_torchvision says why)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "tests" / "no_torchvision"),
                                                          env.get("PYTHONPATH")]))
    output = out / "output"
    command = [sys.executable, "main.py", "--model", model, "--input-path", str(workload), "--id-column", "id",
               *([] if args.without_images else ["--image-column", "image"]), "--concurrency", "1",
               "--accelerator-type", "any",
               "--output-path", str(output), "--overwrite", "--progress-interval-s", "600", *engine,
               *(f"--engine-arg={kv}" for kv in args.engine_arg)]
    with open(out / "log.txt", "w") as log:
        code = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"main.py exited with {code}; see {out / 'log.txt'}")
    report = json.loads((output / "_report.json").read_text())
    replica = report["replicas"][0]
    busy = replica["last_batch_s"] - replica["ready_s"]
    rows = report["rows"]["ok"] + report["rows"]["error"]
    result = {"model": "tiny-llava" if args.tiny else "llava-7b (dummy weights)", "images": not args.without_images,
              "rows": rows,
              "rows_ok": report["rows"]["ok"], "output_tokens": report["output_tokens"],
              "output_tok_per_s": round(generation_rate(report), 1), "rows_per_s": round(rows / busy, 2),
              "input_tokens_per_row": round(report["input_tokens"] / max(rows, 1), 1),
              "engine_ready_s": replica["ready_s"], "wall_s": report["wall_s"]}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
