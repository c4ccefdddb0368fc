"""The full-size lane: the true SD1.5 / SDXL architectures (random weights) through the trainer, on a CPU.

    python bench/real_arch.py --json --model sd15 --method dpo --resolution 256     # one case, one JSON line
    python bench/real_arch.py --json --cases sd15:dpo,sd15:inpo,sd15:ppd,sdxl:dpo   # each in its own process
    python bench/real_arch.py --json --tiny --cases sd15:dpo,sdxl:ppd               # tiny shapes (tests)

Each case builds the pipeline of the real architecture (``bench/train_step.py`` writes out the diffusers
configs of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-xl-base-1.0; nothing is
downloaded, the weights are random), loads the shipped recipe ``configs/<model>_<method>.yaml`` with
``load_config`` and the lane's overrides (reduced resolution, one pair per step, no accumulation, LoRA
rank 8 for DPO/InPO; PPD as shipped: user encoder + user projections), encodes the pairs with the
trainer's cache, and runs ``prepare_training`` + ``training_step`` (the code ``train`` loops over).

Reported per case: s/step (steps after the first), peak RSS of the process (``ru_maxrss``: the whole
case, building included), the loss at step 0 and its distance from log 2 (every objective starts at the
base model, so the loss must be log 2 there: DPO/InPO with a zero-initialised LoRA B, PPD with zero
user value projections), and for LoRA whether the exported file loads with the stock
``load_lora_weights`` into the same weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

LANE_LORA_RANK = 8
LOG2_FP32 = torch.tensor(math.log(2)).item()  # the loss is an fp32 scalar: log 2 exactly is this number


def overrides(model: str, method: str, workdir: Path, manifest: Path, resolution: int, steps: int,
              precision: str, backbone: str | None) -> list[str]:
    """The lane's changes to the shipped recipe: smaller images and batch, nothing else of the recipe."""
    out = [f"data_path={manifest}", f"output_dir={workdir / 'out'}", f"cache_dir={workdir / 'cache'}",
           f"resolution={resolution}", f"max_train_steps={steps}", "train_batch_size=1",
           "gradient_accumulation_steps=1", "report_to=none", f"mixed_precision={precision}",
           "checkpointing_steps=0", "lr_warmup_steps=0", "model=unused"]
    if method == "ppd":
        out.append(f"ppd_backbone={backbone}")
    else:
        out.append(f"lora_rank={LANE_LORA_RANK}")
    return out


def tiny_pipeline(model: str):
    from diffpref.models.builders import tiny_sd15_pipeline, tiny_sdxl_pipeline

    return (tiny_sdxl_pipeline if model == "sdxl" else tiny_sd15_pipeline)(seed=0)


def run_case(model: str, method: str, resolution: int, steps: int, precision: str, tiny: bool, workdir: Path) -> dict:
    from accelerate import Accelerator
    from train_step import build_components, make_pipeline, ppd_backbone, write_pairs

    from diffpref.config import load_config
    from diffpref.launch import build_parts
    from diffpref.training.config import TrainConfig
    from diffpref.training.objectives import NoiseSchedule
    from diffpref.training.step import prepare_training, training_step
    from diffpref.training.trainer import build_cache, export_weights

    started = time.perf_counter()
    torch.manual_seed(0)
    if tiny:
        pipe = tiny_pipeline(model)
        backbone = "embedded"
    else:
        pipe = make_pipeline(model, build_components(model, workdir))
        backbone = ppd_backbone(model, workdir) if method == "ppd" else None
    manifest, _ = write_pairs(workdir, 8, resolution)  # 4 users x 2 pairs: PPD draws a user's other pair
    recipe = ROOT / "configs" / f"{model}_{method}.yaml"
    cfg = load_config(TrainConfig, recipe, overrides(model, method, workdir, manifest, resolution, steps, precision,
                                                     backbone))
    accelerator = Accelerator(cpu=True, mixed_precision=cfg.mixed_precision)
    cache = build_cache(cfg, pipe, accelerator)
    schedule = NoiseSchedule(pipe.scheduler.alphas_cumprod.clone(), pipe.scheduler.config.get("prediction_type", "epsilon"))
    conditioner, _ = build_parts(cfg)
    parts = prepare_training(cfg, accelerator, pipe.unet, cache, schedule, conditioner, pipe.tokenizer)
    build_s = time.perf_counter() - started

    losses, times = [], []
    for step in range(steps):
        t0 = time.perf_counter()
        with accelerator.autocast():
            result = training_step(parts, step)
        times.append(time.perf_counter() - t0)
        losses.append(result.metrics["loss"])

    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lora = {}
    if conditioner is not None:
        conditioner.export(parts.raw_unet, out_dir)
        lora["ppd_adapter_files"] = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file())
    else:
        lora = stock_lora_roundtrip(pipe, parts.raw_unet, export_weights(parts.raw_unet, type(pipe), cfg, out_dir))
    timed = times[1:] or times
    return {"model": model, "method": method, "tiny": tiny, "resolution": resolution, "precision": precision,
            "recipe": str(recipe.relative_to(ROOT)), "lora_rank": cfg.lora_rank, "conditioning": cfg.conditioning,
            "gradient_checkpointing": cfg.gradient_checkpointing, "steps": steps,
            "s_per_step": round(sum(timed) / len(timed), 2), "step_s": [round(t, 2) for t in times],
            "build_s": round(build_s, 1), "peak_rss_gb": round(peak_rss_gb(), 2),
            "loss_step0": losses[0], "loss_step0_is_log2": losses[0] == LOG2_FP32,
            "loss_step0_minus_log2": losses[0] - math.log(2), "losses": losses,
            "torch_threads": torch.get_num_threads(), **lora}


def stock_lora_roundtrip(pipe, unet, path: Path) -> dict:
    """The exported LoRA through diffusers' own ``load_lora_weights``: same tensors as trained?"""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    trained = {k: v.detach().clone() for k, v in get_peft_model_state_dict(unet).items()}  # fp32 (trainable)
    unet.delete_adapters(["default"])
    pipe.unet = unet
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="loaded")
    loaded = {k: v.detach() for k, v in get_peft_model_state_dict(pipe.unet, adapter_name="loaded").items()}
    same_keys = loaded.keys() == trained.keys()
    # diffusers gives the loaded adapter the UNet's dtype (bf16 here): the trained weights rounded to it
    diff = max(((loaded[k].float() - trained[k].to(loaded[k].dtype).float()).abs().max().item()
                for k in trained if k in loaded), default=math.inf)
    return {"lora_file": path.name, "lora_tensors": len(load_file(str(path))), "stock_load_same_keys": same_keys,
            "stock_load_dtype": str(next(iter(loaded.values())).dtype).removeprefix("torch.") if loaded else None,
            "stock_load_max_abs_diff": diff}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("sd15", "sdxl"), default="sd15")
    p.add_argument("--method", choices=("dpo", "inpo", "ppd"), default="dpo")
    p.add_argument("--cases", default="", help="model:method,... each run in its own process (peak RSS per case)")
    p.add_argument("--resolution", type=int, default=0, help="default: 256 (tiny: 64)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--precision", choices=("bf16", "no"), default="bf16", help="mixed precision (CPU autocast bf16)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes of the same code path (tests)")
    p.add_argument("--json", action="store_true", help="one JSON line per case on stdout")
    p.add_argument("--timeout", type=int, default=1200, help="seconds per case (--cases)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    resolution = args.resolution or (64 if args.tiny else 256)
    if args.cases:
        failed = 0
        for case in args.cases.split(","):
            model, method = case.split(":")
            cmd = [sys.executable, __file__, "--model", model, "--method", method, "--resolution", str(resolution),
                   "--steps", str(args.steps), "--precision", args.precision, "--json"] + (["--tiny"] if args.tiny else [])
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                line = proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 else json.dumps(
                    {"model": model, "method": method, "failed": proc.stderr.strip().splitlines()[-1:],
                     "rc": proc.returncode})
            except subprocess.TimeoutExpired:
                line = json.dumps({"model": model, "method": method, "failed": f"timeout {args.timeout}s"})
            failed += "failed" in json.loads(line)
            print(line, flush=True)
        return 1 if failed else 0
    with tempfile.TemporaryDirectory(prefix="real_arch_") as tmp:
        result = run_case(args.model, args.method, resolution, args.steps, args.precision, args.tiny, Path(tmp))
    print(json.dumps(result) if args.json else result, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
