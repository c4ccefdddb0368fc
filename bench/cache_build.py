"""Cache build rate: images encoded per second by 1 process and by N processes (torchrun, gloo).

    python bench/cache_build.py --json                       # embedded model, 1024 pairs, 1 vs 2 processes (CPU)
    python bench/cache_build.py --json --pairs 4096 --processes 1 4 --threads-per-process 1 --device cuda   # 4 GPUs

The data are a Pick-a-Pic parquet of random non-square JPEGs written once (the VAE's cost does not
depend on what the pixels show; decoding and resizing run as for real data). Each run builds the
cache from scratch into its own directory with ``build_preference_cache``, every process encoding
its share; the time is the build's wall time on process 0, from the call to the finished cache
(it includes the barrier and the index), not the interpreter and model start-up. Threads: the
machine's cores split evenly over the processes (``--threads-per-process`` to fix them), so 1 and
N processes get the same CPU; every run builds into a fresh directory (no reuse). One JSON line: images/s per process count and the ratio to 1 process.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_data(path: Path, pairs: int, size: tuple[int, int]) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)

    def jpeg() -> bytes:
        # Smooth random images (upsampled noise): JPEG sizes like real pictures', not like noise's.
        small = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(small).resize(size, Image.BILINEAR).save(buffer, "JPEG", quality=90)
        return buffer.getvalue()

    table = pa.table({
        "caption": [f"a picture number {i % (pairs // 4 or 1)}" for i in range(pairs)],
        "jpg_0": [jpeg() for _ in range(pairs)],
        "jpg_1": [jpeg() for _ in range(pairs)],
        "label_0": [float(i % 2) for i in range(pairs)],
        "user_id": [i % 7 for i in range(pairs)],
    })
    pq.write_table(table, path, row_group_size=256)


def worker(data: str, root: str, out: str, model: str, batch_size: int, workers: int, device: str) -> None:
    """One process of the build (alone, or one of a torchrun group)."""
    import torch
    import torch.distributed as dist

    from diffpref.models.loading import load_pipeline
    from diffpref.training.cache import build_preference_cache

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    if "WORLD_SIZE" in os.environ:  # gloo: the barriers carry no tensors, so CPU and GPU ranks alike
        dist.init_process_group("gloo")
    pipe = load_pipeline(model, device=device, dtype=torch.float32)
    started = time.perf_counter()
    cache = build_preference_cache(pipe, data, root, batch_size=batch_size, progress=False, num_workers=workers)
    seconds = time.perf_counter() - started
    if not dist.is_initialized() or dist.get_rank() == 0:
        Path(out).write_text(json.dumps({"seconds": seconds, "items": len(cache), "build": cache.meta["build"]}))
    if dist.is_initialized():
        dist.destroy_process_group()


def run(index: int, processes: int, args, data: Path, work: Path) -> dict:
    out = work / f"out-{index}.json"
    threads = args.threads_per_process or max((os.cpu_count() or 1) // processes, 1)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                if processes > 1 else [sys.executable])
    command = launcher + [__file__, "--worker", str(data), str(work / f"cache-{index}"), str(out),
                          "--model", args.model, "--batch-size", str(args.batch_size), "--workers", str(args.workers),
                          "--device", args.device]
    subprocess.run(command, check=True, env=env)
    result = json.loads(out.read_text())
    images = sum(result["build"]["images_encoded_per_rank"])
    return {"processes": processes, "threads_per_process": threads, "seconds": round(result["seconds"], 3),
            "images": images, "images_per_s": round(images / result["seconds"], 2),
            "images_encoded_per_rank": result["build"]["images_encoded_per_rank"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=3, metavar=("DATA", "ROOT", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--pairs", type=int, default=1024)
    parser.add_argument("--image-size", type=int, nargs=2, default=(96, 80), metavar=("W", "H"))
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=32, help="cache_batch_size: images per VAE call")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader decoding workers per process")
    parser.add_argument("--threads-per-process", type=int, default=0, help="0: the cores split over the processes")
    parser.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu or cuda (one per process)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, args.model, args.batch_size, args.workers, args.device)
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "pairs.parquet"
        write_data(data, args.pairs, tuple(args.image_size))
        results = [run(i, p, args, data, work) for i, p in enumerate(args.processes)]
    base = results[0]["images_per_s"]
    report = {"bench": "cache_build", "model": args.model, "device": args.device, "pairs": args.pairs, "image_size": list(args.image_size),
              "cache_batch_size": args.batch_size, "cpu_count": os.cpu_count(), "runs": results,
              "ratio_to_first": [round(r["images_per_s"] / base, 3) for r in results]}
    print(json.dumps(report) if args.json else json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
