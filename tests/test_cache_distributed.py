"""Two processes (torchrun, gloo, CPU) build the same cache, row for row, as one, each encoding about half."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from diffpref.training.cache import PreferenceCache

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "cache_build_worker.py"
# 20 source rows in chunks of 2: 10 chunks, 5 per process; rows 3 and 12 are ties (dropped), so the
# chunks hold different numbers of rows and the index must still line up.
LABELS = [1.0, 0.0, 1.0, 0.5, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.5, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0]


def _build(tmp_path: Path, processes: int) -> dict:
    out = tmp_path / f"out-{processes}.json"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = (launcher if processes > 1 else [sys.executable]) + [
        str(WORKER), str(tmp_path / "pairs.parquet"), str(tmp_path / f"cache-{processes}"), str(out),
        "chunk_rows=2", "batch_size=3", "workers=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(command, check=False, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(out.read_text())


def test_two_processes_build_the_one_process_cache_each_encoding_half(tmp_path: Path) -> None:
    from test_cache import write_parquet

    write_parquet(tmp_path / "pairs.parquet", LABELS)
    one, two = _build(tmp_path, 1), _build(tmp_path, 2)
    single, shared = PreferenceCache(one["path"]), PreferenceCache(two["path"])

    assert single.key == shared.key and len(single) == len(shared) == 18
    for name in ("users", "prompts", "chunks", "report", "latent_shape"):
        assert single.meta[name] == shared.meta[name], name
    for i in range(len(single)):
        a, b = single[i], shared[i]
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), (i, name)  # bit for bit

    assert one["build"]["images_encoded_per_rank"] == [36]  # 18 pairs, 2 images each
    per_rank = two["build"]["images_encoded_per_rank"]
    assert len(per_rank) == 2 and sum(per_rank) == 36 and min(per_rank) >= 16  # about half each
