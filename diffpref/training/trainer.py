"""The one training loop shared by every preference objective (DPO, InPO, KTO, MaPO, SFT, and registered ones).

    accelerate launch train/train.py --config configs/embedded_dpo.yaml [key=value ...]
    diffpref train --config configs/embedded_dpo.yaml [key=value ...]

``train(cfg, conditioner, evaluator)``: encode the data once into a latent/text-embedding cache (the
VAE and text encoders are then dropped), make the weights trainable (``step.prepare_training``), and
loop ``step.training_step`` to ``max_train_steps``, logging every step (``history.jsonl`` grows as
training goes), checkpointing, and exporting a stock-loadable LoRA, a diffusers UNet, or what the
conditioner exports. The trainer knows no conditioner or evaluator in particular: the caller builds
them (``diffpref.launch.build_parts``). An evaluator has ``attach(unet, pipeline_class, resolution)``,
called once on the main process, and ``__call__(step) -> dict[str, float]``, logged with the step.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffpref.training import randomness
from diffpref.training.checkpoint import (
    assert_finite,
    load_trainer_state,
    resolve_resume,
    save_checkpoint,
)
from diffpref.training.config import TrainConfig
from diffpref.training.objectives import NoiseSchedule, get_objective
from diffpref.training.step import (  # noqa: F401  (NonFiniteLossError, adapters_disabled: re-exported)
    NonFiniteLossError,
    StepParts,
    adapters_disabled,
    gathered_weights,
    prepare_training,
    sharded,
    training_step,
    uses_deepspeed,
    whole_models_on_load,
)


@dataclass
class Progress:
    """All the state a resumed run needs besides the weights: data order and noise follow from the step."""

    global_step: int = 0
    skipped_steps: int = 0
    extra_forward_passes: int = 0

    def state(self) -> dict:
        return asdict(self)


class _StepCounter:
    """The LR schedule's position, checkpointed by accelerate alongside the optimizer."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def state_dict(self):
        return self.scheduler.state_dict()

    def load_state_dict(self, state):
        self.scheduler.load_state_dict(state)


class History:
    """``history.jsonl``: one line per optimizer step, written (and flushed) as the step ends.

    A resumed run first drops the lines after its checkpoint's step: they will be trained again."""

    def __init__(self, path: Path, resume_step: int, enabled: bool):
        self.path, self.enabled, self.last = path, enabled, {}
        if not enabled:
            return
        kept = []
        if resume_step and path.exists():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
        path.write_text("".join(line + "\n" for line in kept))

    def append(self, row: dict) -> None:
        self.last = row
        if self.enabled:
            with self.path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
                fh.flush()


def _register_trainable_state_hooks(accelerator):
    """Checkpoints hold the trainable parameters only: a LoRA or adapter run saves megabytes, not a UNet copy.

    Not under FSDP or ZeRO-3: there each process holds a shard, and accelerate's own ``save_state`` /
    ``load_state`` write and read the sharded (or gathered, per the plugin's state_dict_type) model and
    optimizer states; these hooks, which read whole parameters, would save shards under wrong shapes.
    Nor under DeepSpeed (any stage): its engine's checkpoint holds model and optimizer, and accelerate gives
    the load hook no model, so the hook could not restore the trainable weights."""
    if sharded(accelerator) or uses_deepspeed(accelerator):
        return
    from safetensors.torch import load_file, save_file

    def trainable(models):
        return {f"{i}.{name}": p for i, model in enumerate(models)
                for name, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            state = {k: v.detach().float().contiguous().cpu() for k, v in trainable(models).items()}
            save_file(state, str(Path(output_dir) / "trainable.safetensors"))
        while weights:
            weights.pop()

    def load_hook(models, input_dir):
        state = load_file(str(Path(input_dir) / "trainable.safetensors"))
        params = trainable(models)
        if state.keys() != params.keys():
            raise RuntimeError(f"checkpoint {input_dir} does not match this run's trainable parameters "
                               f"({len(state)} saved vs {len(params)} here): was it made with another config?")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(state[name].to(param.dtype))
        while models:
            models.pop()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# ----------------------------------------------------------------------------- set-up
def build_cache(cfg: TrainConfig, pipe, accelerator):
    from diffpref.training.cache import build_preference_cache, build_rating_cache

    cache_root = Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.output_dir).parent / ".cache" / "diffpref"
    kwargs = dict(resolution=cfg.resolution, tie_policy=cfg.tie_policy, progress=accelerator.is_local_main_process,
                  batch_size=cfg.cache_batch_size, random_flip=cfg.random_flip)
    # Every process encodes its own share of the data (diffpref.training.cache.builder).
    if get_objective(cfg.method).data == "ratings":
        from_pairs = not str(cfg.data_path).endswith(".jsonl") or _jsonl_holds_pairs(cfg.data_path)
        return build_rating_cache(pipe, cfg.data_path, cache_root, from_pairs=from_pairs, **kwargs)
    return build_preference_cache(pipe, cfg.data_path, cache_root, **kwargs)


def _jsonl_holds_pairs(path) -> bool:
    with open(path) as fh:
        for line in fh:
            if line.strip():
                return "image_0" in json.loads(line)
    return True


def _accelerator(cfg: TrainConfig):
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    output_dir = Path(cfg.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, mixed_precision=cfg.mixed_precision,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.process_group_timeout))],
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # No GPU: say so, or accelerate (1.15) leaves torchrun's processes unjoined, each training alone
        # (DistributedType.NO); with cpu=True they form one gloo group (MULTI_CPU). One process: the same.
        cpu=not torch.cuda.is_available(),
    )
    _check_engine(accelerator)
    return accelerator


def _check_engine(accelerator) -> None:
    """A launcher's FSDP/DeepSpeed request that accelerate did not honour fails here, not as a silent DDP run
    (accelerate 1.15 runs FSDP only on GPU-like devices: docs/distributed.md)."""
    import os

    from accelerate.utils import DistributedType

    for env, kind in (("ACCELERATE_USE_FSDP", DistributedType.FSDP), ("ACCELERATE_USE_DEEPSPEED", DistributedType.DEEPSPEED)):
        if os.environ.get(env, "false").lower() == "true" and accelerator.distributed_type != kind:
            raise RuntimeError(f"{env}=true (an accelerate config asked for {kind.value}), but accelerate runs "
                               f"{accelerator.distributed_type.value} with {accelerator.num_processes} process(es) on "
                               f"{accelerator.device}: {kind.value} needs GPUs. On CPUs launch with torchrun "
                               "(processes join one gloo group) or configs/accelerate/ddp.yaml; see docs/distributed.md")


def _load(cfg: TrainConfig, accelerator, conditioner) -> tuple[StepParts, type]:
    """Load the model, encode the data once (the VAE and text encoders are not needed after this) and
    make the weights trainable; returns (step parts, the pipeline class)."""
    from diffpref.models.loading import load_pipeline

    with whole_models_on_load(accelerator):  # ZeRO-3: the frozen encoders load whole, not partitioned
        pipe = load_pipeline(cfg.model, device=str(accelerator.device), dtype=torch.float32)
    cache = build_cache(cfg, pipe, accelerator)
    schedule = NoiseSchedule(pipe.scheduler.alphas_cumprod.clone(), pipe.scheduler.config.get("prediction_type", "epsilon"))
    unet, pipeline_class, tokenizer = pipe.unet, type(pipe), pipe.tokenizer
    del pipe
    reference = None
    if cfg.caches_inversion:  # identify the reference before adapters are added to the UNet
        from diffpref.training.cache.inversion import reference_identity

        reference = reference_identity(unet, {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            accelerator.mixed_precision, torch.float32))
    parts = prepare_training(cfg, accelerator, unet, cache, schedule, conditioner, tokenizer)
    if reference is not None:
        parts.inversion = build_inversion(cfg, parts, reference, accelerator)
    return parts, pipeline_class


def build_inversion(cfg: TrainConfig, parts: StepParts, reference: dict, accelerator):
    """InPO: the reference's inversions of every cached image along the grid, computed once (or reused)."""
    from diffpref.training.cache.inversion import build_inversion_cache

    started = time.time()
    inversion = build_inversion_cache(parts, reference, parts.inversion_points, batch_size=cfg.cache_batch_size,
                                      progress=accelerator.is_local_main_process)
    parts.inversion_build_s = time.time() - started  # one-time: summary.json reports it beside train_s
    return inversion


def _resume(cfg: TrainConfig, accelerator) -> Progress:
    resume_path = resolve_resume(cfg.resume_from, Path(cfg.output_dir))
    if resume_path is None:
        return Progress()
    accelerator.load_state(str(resume_path))
    state = load_trainer_state(resume_path)
    progress = Progress(state["global_step"], state.get("skipped_steps", 0), state.get("extra_forward_passes", 0))
    accelerator.print(f"resumed from {resume_path} at step {progress.global_step}")
    return progress


def _write_run_config(cfg: TrainConfig, accelerator) -> None:
    if not accelerator.is_main_process:
        return
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    if cfg.report_to != "none":
        accelerator.init_trackers("diffpref", config={k: v for k, v in asdict(cfg).items()
                                                      if isinstance(v, (int, float, str, bool))})


# ----------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig, conditioner=None, evaluator=None) -> dict:
    """Run training to ``max_train_steps`` (resuming if asked); returns the run summary.

    ``conditioner``: extra conditioning of the UNet with its own trainable modules (e.g. PPD's user
    tokens), or None. ``evaluator``: called every ``eval_every`` steps and at the end, or None."""
    from diffpref.models.loading import check_attention

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    accelerator = _accelerator(cfg)
    check_attention(cfg.attention)
    parts, pipeline_class = _load(cfg, accelerator, conditioner)
    _register_trainable_state_hooks(accelerator)
    accelerator.register_for_checkpointing(_StepCounter(parts.lr_scheduler))
    progress = _resume(cfg, accelerator)
    _write_run_config(cfg, accelerator)
    randomness.batches_per_epoch(len(parts.cache), cfg.train_batch_size * accelerator.num_processes)  # fails early
    if evaluator is not None and sharded(accelerator):
        # The evaluator samples with the unwrapped UNet on the main process alone: under FSDP/ZeRO-3 that
        # process holds a shard. Evaluate the exported weights afterwards (diffpref eval) instead.
        accelerator.print("evaluation during training is off under FSDP/ZeRO-3 (sharded weights); "
                          "evaluate the exported weights with `diffpref eval`")
        evaluator = None
    if evaluator is not None and accelerator.is_main_process:
        evaluator.attach(parts.raw_unet, pipeline_class, parts.cache.resolution)
    else:
        evaluator = None  # the main process alone evaluates
    history = History(Path(cfg.output_dir) / "history.jsonl", progress.global_step, accelerator.is_main_process)

    eval_seconds = 0.0  # intermediate evaluations, so that training time can be reported without them
    started = time.time()
    label = cfg.method + (f"+{cfg.conditioning}" if cfg.conditioning != "none" else "")
    bar = tqdm(total=cfg.max_train_steps, initial=progress.global_step, desc=f"train {label}",
               disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    while progress.global_step < cfg.max_train_steps:
        result = training_step(parts, progress.global_step)
        progress.global_step += 1
        progress.skipped_steps += result.skipped
        progress.extra_forward_passes += result.extra_forward_passes
        logs = {**result.metrics, "extra_forward_passes": progress.extra_forward_passes,
                "skipped_steps": progress.skipped_steps}
        if evaluator and _evaluates_at(cfg, progress.global_step):
            # training seconds so far (evaluations left out): time-to-quality reads it (bench/time_to_quality.py)
            logs["train_s"] = round(time.time() - started - eval_seconds, 3)
            eval_started = time.time()
            logs.update(evaluator(progress.global_step))
            eval_seconds += time.time() - eval_started
        accelerator.log(logs, step=progress.global_step)
        history.append({"step": progress.global_step, **logs})
        bar.update(1)
        bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items() if k in ("loss", "implicit_acc", "win_rate_vs_base")})
        if cfg.checkpointing_steps and progress.global_step % cfg.checkpointing_steps == 0 \
                and progress.global_step < cfg.max_train_steps:
            _checkpoint(cfg, parts, progress)
    bar.close()
    return _finish(cfg, parts, progress, pipeline_class, evaluator, history, time.time() - started, eval_seconds)


def _evaluates_at(cfg: TrainConfig, step: int) -> bool:
    """Intermediate evaluations: every eval_every steps before the last (the last is evaluated by _finish)."""
    return bool(cfg.eval_every) and step % cfg.eval_every == 0 and step < cfg.max_train_steps


def _checkpoint(cfg: TrainConfig, parts: StepParts, progress: Progress) -> None:
    assert_finite(parts.params)
    save_checkpoint(parts.accelerator, Path(cfg.output_dir), progress.global_step, progress.state(),
                    cfg.checkpoints_total_limit)


def _finish(cfg: TrainConfig, parts: StepParts, progress: Progress, pipeline_class, evaluator, history: History,
            wall_clock: float, eval_seconds: float) -> dict:
    """The last checkpoint, the final evaluation, the exported weights and ``summary.json``."""
    accelerator, output_dir = parts.accelerator, Path(cfg.output_dir)
    _checkpoint(cfg, parts, progress)
    summary = {"method": cfg.method, "steps": progress.global_step, "wall_clock_s": round(wall_clock, 1),
               "train_s": round(wall_clock - eval_seconds, 1), "eval_s": round(eval_seconds, 1),
               "skipped_steps": progress.skipped_steps, "extra_forward_passes": progress.extra_forward_passes,
               "pairs": len(parts.cache), "final": history.last, "inversion_build_s": round(parts.inversion_build_s, 1),
               # what accelerate actually ran (a launcher's FSDP request on CPUs runs as MULTI_CPU: docs/distributed.md)
               "distributed_type": str(accelerator.distributed_type).removeprefix("DistributedType."),
               "processes": accelerator.num_processes}
    if evaluator:
        summary["eval"] = evaluator(progress.global_step)
        accelerator.log(summary["eval"], step=progress.global_step)
    # Every process gathers (FSDP/ZeRO-3: collective); the main one writes.
    with gathered_weights(accelerator, parts.models):
        if accelerator.is_main_process:
            if parts.conditioner is not None:
                parts.conditioner.export(parts.raw_unet, output_dir)
            else:
                export_weights(parts.raw_unet, pipeline_class, cfg, output_dir)
            (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def export_weights(unet, pipeline_class, cfg: TrainConfig, output_dir: Path) -> Path:
    """LoRA -> pytorch_lora_weights.safetensors (diffusers format, alpha in its metadata); full -> output_dir/unet."""
    if cfg.is_lora:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        pipeline_class.save_lora_weights(output_dir, unet_lora_layers=layers,
                                         unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
        return output_dir / "pytorch_lora_weights.safetensors"
    unet.save_pretrained(output_dir / "unet")
    return output_dir / "unet"
