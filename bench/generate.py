"""Images per second of the personalized (PPD) pipeline against the base pipeline, and user-embedding time.

    python bench/generate.py --json                                  # embedded model + adapter, CPU
    python bench/generate.py --json --batch-size 16 --steps 20 --device cuda

"base" is ``load_pipeline(model)`` as ``diffpref generate`` runs it; "personalized" is a second copy
of the same model wrapped by ``PersonalizedPipeline.from_base(..., adapter)`` as ``diffpref generate
--users`` builds it, given the tokens of one user embedded from k = 4 examples. Both generate the
same batch (prompts, seeds, steps, guidance) through ``diffpref.generate.generate_images``, VAE
decoding included. The base needs its own copy of the model because installing the adapter changes
the UNet's cross-attention processors in place.

Timing: after warm-up, the two pipelines' batches alternate in ABBA order, so background load and
clock drift hit both alike; images/s = batch_size / median batch time. ``embed_user_k4_ms`` is the
median time of ``embed_user`` (frozen CLIP backbone + encoder head) on 4 examples, uncached.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read at import time by diffusers/transformers: set it first
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_timing import device_label, time_abba  # noqa: E402  (beside this script)

TARGET_OVERHEAD = 0.05
SHOTS = 4


def world_examples(k: int, seed: int = 0):
    """k choices of a simulated user who likes red objects: a red render preferred over a blue one."""
    from diffpref.personalize.backbones import UserExample
    from diffpref.world.captions import caption_for
    from diffpref.world.render import render, sample_attributes

    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(k):
        liked = sample_attributes(rng, color="red")
        disliked = sample_attributes(rng, color="blue", shape=liked.shape)
        examples.append(UserExample(caption_for(shape=liked.shape), render(liked), render(disliked)))
    return examples


def bench_prompts(n: int, seed: int = 0) -> list[str]:
    from diffpref.world.captions import sample_prompt

    rng = np.random.default_rng(seed)
    return [sample_prompt(rng) for _ in range(n)]


def run(args) -> dict:
    from diffpref.generate import default_guidance, generate_images
    from diffpref.models.loading import load_pipeline
    from diffpref.personalize.encoder import embed_user
    from diffpref.personalize.pipeline import PersonalizedPipeline

    device = torch.device(args.device)
    base = load_pipeline(args.model, device=args.device)
    personalized = PersonalizedPipeline.from_base(load_pipeline(args.model, device=args.device), args.adapter)
    personalized.set_progress_bar_config(disable=True)

    # The user: tokens from k = 4 examples, embedded once, as `diffpref user embed` does.
    examples = world_examples(SHOTS, args.seed)
    tokens = personalized.embed_user(examples)  # also loads the backbone, outside the timing
    # One row per image, as `diffpref generate --users` stacks them.
    user_embedding = tokens.unsqueeze(0).expand(args.batch_size, -1, -1)

    guidance = default_guidance(base) if args.guidance_scale is None else args.guidance_scale
    prompts = bench_prompts(args.batch_size, args.seed)
    seeds = [args.seed + i for i in range(args.batch_size)]

    def generate(pipe, **user):
        return lambda: generate_images(pipe, prompts, seeds, args.steps, guidance, **user)

    variants = {"base": generate(base),
                "personalized": generate(personalized, user_embedding=user_embedding, user_scale=args.user_scale)}
    times = time_abba(variants, args.warmup, args.repeats, device)

    def embed_once():
        embed_user(personalized.user_encoder, personalized.backbone, examples)  # no cache: the real cost

    embed_times = time_abba({"embed": embed_once}, args.warmup, args.repeats, device)["embed"]

    base_ips = args.batch_size / statistics.median(times["base"])
    personal_ips = args.batch_size / statistics.median(times["personalized"])
    overhead = base_ips / personal_ips - 1
    return {
        "config": str(args.model), "adapter": str(args.adapter), "batch_size": args.batch_size, "steps": args.steps,
        "guidance_scale": guidance, "user_scale": args.user_scale,
        "base_images_per_s": round(base_ips, 3), "personalized_images_per_s": round(personal_ips, 3),
        "overhead": round(overhead, 4), "target_overhead": TARGET_OVERHEAD,
        "embed_user_k4_ms": round(1000 * statistics.median(embed_times), 2),
        "device": device_label(device),
        "dtype": str(base.unet.dtype).removeprefix("torch."),
        "base_batch_s": [round(x, 4) for x in times["base"]],
        "personalized_batch_s": [round(x, 4) for x in times["personalized"]],
        "embed_user_k4_ms_all": [round(1000 * x, 2) for x in embed_times],
        "timing": "interleaved ABBA, one process",
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print JSON on one line (the only output format)")
    parser.add_argument("--model", default="embedded", help="base model: embedded, a diffusers folder or a hub id")
    parser.add_argument("--adapter", default="embedded-ppd", help="PPD adapter trained for --model")
    parser.add_argument("--batch-size", type=int, default=16, help="images per generation call")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="classifier-free guidance (default: the model's, 7.5)")
    parser.add_argument("--user-scale", type=float, default=1.0, help="scale of the user branch (> 0)")
    parser.add_argument("--repeats", type=int, default=5, help="timed batches per pipeline (median taken; >= 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches per pipeline first (>= 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.repeats < 5 or args.warmup < 1:
        parser.error(f"--repeats {args.repeats} / --warmup {args.warmup}: use at least 5 timed and 1 warm-up batch")
    if args.batch_size < 1 or args.steps < 1:
        parser.error(f"--batch-size {args.batch_size} and --steps {args.steps} must be >= 1")
    if not args.user_scale > 0:
        parser.error(f"--user-scale {args.user_scale}: must be > 0 (0 skips the user branch: that is the base)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
