"""Build the PPD VLM context bank from one process of a torchrun group (or alone) and write what it saw;
used by tests/test_vlm_backbone.py. Not a test module itself.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/vlm_context_worker.py DATA VLM ROOT OUT.json
"""

from __future__ import annotations

import json
import os
import sys


def main(data: str, vlm: str, root: str, out: str) -> None:
    import torch
    from accelerate import PartialState

    from diffpref.models.builders import tiny_sd15_pipeline
    from diffpref.personalize.backbones import VLMBackbone
    from diffpref.personalize.vlm_context import build_vlm_context_bank
    from diffpref.training.cache import build_preference_cache
    from diffpref.training.config import TrainConfig

    torch.set_num_threads(1)
    state = PartialState(cpu=True)  # joins torchrun's group (gloo on CPU) when started by it
    cfg = TrainConfig(method="ppd", data_path=data, output_dir=root, ppd_backbone=vlm, ppd_shots_max=3,
                      ppd_vlm_subsets=3, ppd_vlm_image_size=32, ppd_vlm_max_new_tokens=2)
    cache = build_preference_cache(tiny_sd15_pipeline(seed=0), data, os.path.join(root, "cache"), progress=False)
    backbone = VLMBackbone.from_pretrained(vlm, max_new_tokens=2, image_size=32)
    calls = []
    embed = backbone.embed_examples
    backbone.embed_examples = lambda examples: calls.append(len(examples)) or embed(examples)
    bank = build_vlm_context_bank(cache, backbone, cfg, state, progress=False)
    counts = [torch.tensor([len(calls)]) for _ in range(state.num_processes)]  # sets each process embedded
    if state.num_processes > 1:
        torch.distributed.all_gather(counts, torch.tensor([len(calls)]))
    if state.is_main_process:
        [folder] = [p for p in os.scandir(cache.path) if p.name.startswith("vlm-context-")]
        with open(out, "w") as handle:
            json.dump({"bank": os.path.join(folder.path, "bank.safetensors"), "sets_per_rank": [int(c) for c in counts],
                       "sets": len(bank.set_user)}, handle)
    state.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:5])
