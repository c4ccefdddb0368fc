"""Build a cache from one process of a torchrun group (or alone) and write what it saw; used by
tests/test_cache_distributed.py and bench/cache_build.py. Not a test module itself.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/cache_build_worker.py DATA ROOT OUT.json
"""

from __future__ import annotations

import json
import os
import sys
import time


def main(data: str, root: str, out: str, chunk_rows: int, model: str, batch_size: int, workers: int) -> None:
    import torch
    import torch.distributed as dist

    from diffpref.training.cache import build_preference_cache, layout

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if "WORLD_SIZE" in os.environ:  # started by torchrun: join its group (gloo: CPU)
        dist.init_process_group("gloo")
    layout.CHUNK_ROWS = chunk_rows
    if model == "tiny-sd15":
        from diffpref.models.builders import tiny_sd15_pipeline

        pipe = tiny_sd15_pipeline(seed=0)
    else:
        from diffpref.models.loading import load_pipeline

        pipe = load_pipeline(model, device="cpu", dtype=torch.float32)
    started = time.perf_counter()
    cache = build_preference_cache(pipe, data, root, batch_size=batch_size, progress=False, num_workers=workers)
    seconds = time.perf_counter() - started
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        with open(out, "w") as handle:
            json.dump({"path": str(cache.path), "seconds": seconds, "items": len(cache), "build": cache.meta["build"]},
                      handle)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    data, root, out = sys.argv[1:4]
    options = dict(arg.split("=", 1) for arg in sys.argv[4:])
    main(data, root, out, int(options.get("chunk_rows", 2)), options.get("model", "tiny-sd15"),
         int(options.get("batch_size", 8)), int(options.get("workers", 1)))
