"""The one training loop shared by every preference objective (DPO, InPO, KTO, MaPO, SFT).

    accelerate launch train/train.py --config configs/embedded_dpo.yaml [key=value ...]
    diffpref train --config configs/embedded_dpo.yaml [key=value ...]

Steps: encode the data once into a latent/text-embedding cache (the VAE and text encoders are
then dropped), wrap the UNet with LoRA or keep a frozen reference copy, and run optimizer steps
in which every sample's noise and timestep are a function of (seed, step, position), so resumed
and multi-process runs reproduce a single uninterrupted run.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from dataclasses import asdict
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
from diffpref.training.objectives import NoiseSchedule, kto, paired_preference


class NonFiniteLossError(FloatingPointError):
    pass


@contextlib.contextmanager
def adapters_disabled(unet):
    """The LoRA reference pass: the same UNet with its adapters off, always switched back on."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def _lr_lambda(cfg: TrainConfig):
    def factor(step: int) -> float:
        if step < cfg.lr_warmup_steps:
            return (step + 1) / cfg.lr_warmup_steps
        if cfg.lr_scheduler == "constant":
            return 1.0
        progress = (step - cfg.lr_warmup_steps) / max(1, cfg.max_train_steps - cfg.lr_warmup_steps)
        if cfg.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


class _StepCounter:
    """The LR schedule's position, checkpointed by accelerate alongside the optimizer."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def state_dict(self):
        return self.scheduler.state_dict()

    def load_state_dict(self, state):
        self.scheduler.load_state_dict(state)


def _make_optimizer(cfg: TrainConfig, params):
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise RuntimeError("optimizer=adamw8bit needs bitsandbytes (pip install 'diffpref[gpu]') and a CUDA GPU") from exc
        cls = bnb.optim.AdamW8bit
    else:
        cls = torch.optim.AdamW
    return cls(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)


def _add_lora(unet, cfg: TrainConfig):
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian",
                                target_modules=[m.strip() for m in cfg.lora_target_modules.split(",") if m.strip()]))


def _register_trainable_state_hooks(accelerator):
    """Checkpoints hold the trainable parameters only: a LoRA or PPD run saves megabytes, not a UNet copy."""
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


def _collate(items: list[dict], empty_cond: dict, drop: torch.Tensor) -> dict:
    batch = {}
    for key in items[0]:
        batch[key] = torch.stack([torch.as_tensor(item[key]) for item in items])
    cond = {k: batch.pop(k) for k in ("prompt_embeds", "pooled_prompt_embeds") if k in batch}
    # Prompt dropout: some samples see the empty prompt, so guidance still has an unconditional branch.
    for key, value in cond.items():
        empty = empty_cond[key].to(value.dtype).expand_as(value)
        mask = drop.view(-1, *([1] * (value.dim() - 1)))
        cond[key] = torch.where(mask, empty, value)
    batch["cond"] = cond
    return batch


def _to_device(batch: dict, device, dtype) -> dict:
    out = {}
    for key, value in batch.items():
        if isinstance(value, dict):
            out[key] = _to_device(value, device, dtype)
        elif value.is_floating_point():
            out[key] = value.to(device=device, dtype=torch.float32 if key in ("label", "liked") else dtype)
        else:
            out[key] = value.to(device)
    return out


def build_cache(cfg: TrainConfig, pipe, accelerator):
    from diffpref.training.cache import build_preference_cache, build_rating_cache

    cache_root = Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.output_dir).parent / ".cache" / "diffpref"
    kwargs = dict(resolution=cfg.resolution, tie_policy=cfg.tie_policy, progress=accelerator.is_local_main_process)
    # Encode on the main process first; the others then find the finished cache under the same key.
    with accelerator.main_process_first():
        if cfg.method == "kto":
            from_pairs = not str(cfg.data_path).endswith(".jsonl") or _jsonl_holds_pairs(cfg.data_path)
            return build_rating_cache(pipe, cfg.data_path, cache_root, from_pairs=from_pairs, **kwargs)
        return build_preference_cache(pipe, cfg.data_path, cache_root, **kwargs)


def _jsonl_holds_pairs(path) -> bool:
    with open(path) as fh:
        for line in fh:
            if line.strip():
                return "image_0" in json.loads(line)
    return True


def train(cfg: TrainConfig) -> dict:
    """Run training to ``max_train_steps`` (resuming if asked); returns the run summary."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    from diffpref.models.loading import check_attention, load_pipeline
    from diffpref.training.conditioning import added_cond_kwargs

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    output_dir = Path(cfg.output_dir)
    log_with = None if cfg.report_to == "none" else cfg.report_to
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, mixed_precision=cfg.mixed_precision,
        log_with=log_with, project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    check_attention(cfg.attention)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    # 1. Load the model and encode the data once; the VAE and text encoders are not needed after this.
    pipe = load_pipeline(cfg.model, device=str(accelerator.device), dtype=torch.float32)
    cache = build_cache(cfg, pipe, accelerator)
    resolution = cache.resolution
    unet, pipeline_class, tokenizer = pipe.unet, type(pipe), pipe.tokenizer
    schedule = NoiseSchedule(pipe.scheduler.alphas_cumprod.clone(), pipe.scheduler.config.get("prediction_type", "epsilon"))
    num_train_timesteps = int(pipe.scheduler.config.num_train_timesteps)
    timestep_high = num_train_timesteps if cfg.timestep_max is None else cfg.timestep_max
    if timestep_high > num_train_timesteps or cfg.timestep_min >= timestep_high:
        raise ValueError(f"timesteps [{cfg.timestep_min}, {timestep_high}) do not fit the scheduler's "
                         f"{num_train_timesteps} training timesteps: need 0 <= timestep_min < timestep_max <= "
                         f"{num_train_timesteps}")
    del pipe

    # 2. Trainable weights: LoRA adapters (reference = adapters off) or the full UNet (reference = frozen copy).
    if cfg.attention == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    set_seed(cfg.seed)  # random inits (LoRA, PPD head) must not depend on what ran before in this process
    reference_unet, user = None, None
    if cfg.is_full_finetune:
        unet.requires_grad_(True)
        reference_unet = copy.deepcopy(unet).requires_grad_(False).eval().to(weight_dtype) if cfg.uses_reference else None
    else:
        unet.to(dtype=weight_dtype).requires_grad_(False)
        if cfg.is_lora:
            _add_lora(unet, cfg)
        if cfg.method == "ppd":
            user = _setup_ppd(cfg, unet, cache, accelerator, tokenizer)
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # trainable weights stay fp32 under mixed precision
    _register_trainable_state_hooks(accelerator)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    models = [unet] + ([user.encoder] if user else [])
    params = [p for m in models for p in m.parameters() if p.requires_grad]
    if user is not None and cfg.ppd_attention_lr is not None:
        # The user projections start as (scaled) copies of the UNet's own; at the head's learning rate Adam
        # would move each of their small weights by more than its size within a few hundred steps.
        unet_params = [p for p in unet.parameters() if p.requires_grad]
        head_params = [p for p in user.encoder.parameters() if p.requires_grad]
        optimizer = _make_optimizer(cfg, [{"params": unet_params, "lr": cfg.ppd_attention_lr}, {"params": head_params}])
    else:
        optimizer = _make_optimizer(cfg, params)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    *models, optimizer = accelerator.prepare(*models, optimizer)
    unet = models[0]
    if user:
        user.encoder = models[1]
    accelerator.register_for_checkpointing(_StepCounter(lr_scheduler))
    raw_unet = accelerator.unwrap_model(unet)

    def denoiser(model):
        def run(x, t, cond):
            extra = added_cond_kwargs(raw_unet, cond, resolution, x.shape[0])
            with accelerator.autocast():  # mixed precision: fp32 inputs are cast per op
                return model(x, t, encoder_hidden_states=cond["prompt_embeds"], added_cond_kwargs=extra).sample.float()
        return run

    policy = denoiser(unet)
    if cfg.is_full_finetune:
        reference = denoiser(reference_unet) if reference_unet is not None else None
    else:
        def reference(x, t, cond):
            # The reference is the base model: adapters off and, for PPD, no user (zero tokens add nothing).
            if user:
                cond = {**cond, "prompt_embeds": user.without_user(cond["prompt_embeds"])}
            with adapters_disabled(raw_unet) if cfg.is_lora else contextlib.nullcontext():
                return denoiser(raw_unet)(x, t, cond)

    # 3. Resume: the step count is all the state the data order and the noise need.
    global_step, skipped_steps = 0, 0
    resume_path = resolve_resume(cfg.resume_from, output_dir)
    if resume_path is not None:
        accelerator.load_state(str(resume_path))
        state = load_trainer_state(resume_path)
        global_step, skipped_steps = state["global_step"], state.get("skipped_steps", 0)
        accelerator.print(f"resumed from {resume_path} at step {global_step}")

    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
        tracker_cfg = {k: v for k, v in asdict(cfg).items() if isinstance(v, (int, float, str, bool))}
        if log_with:
            accelerator.init_trackers("diffpref", config=tracker_cfg)

    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = cfg.train_batch_size * world
    local = randomness.local_slice(global_batch, rank, world)
    randomness.batches_per_epoch(len(cache), global_batch)  # fails early, with advice, on too little data
    empty_cond = cache.empty_prompt_cond
    evaluator = _make_evaluator(cfg, accelerator, raw_unet, pipeline_class, resolution)
    history: list[dict] = []
    extra_passes = 0
    eval_seconds = 0.0  # intermediate evaluations, so that training time can be reported without them
    started = time.time()
    bar = tqdm(total=cfg.max_train_steps, initial=global_step, desc=f"train {cfg.method}",
               disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    while global_step < cfg.max_train_steps:
        step_metrics: list[dict] = []
        for micro in range(cfg.gradient_accumulation_steps):
            micro_step = global_step * cfg.gradient_accumulation_steps + micro
            indices = randomness.global_batch_indices(micro_step, len(cache), global_batch, cfg.seed)[local]
            positions = range(local.start, local.stop)
            gens = randomness.sample_generators(micro_step, positions, cfg.seed)
            t = randomness.per_sample_timesteps(gens, timestep_high, cfg.timestep_min)
            drop = randomness.per_sample_uniform(gens) < cfg.prompt_dropout
            items = [cache[int(i)] for i in indices]
            latent_shape = tuple((items[0].get("latents_0", items[0].get("latents"))).shape)
            noise = randomness.per_sample_noise(gens, latent_shape)
            batch = _to_device(_collate(items, empty_cond, drop), accelerator.device, torch.float32)
            noise, t = noise.to(accelerator.device), t.to(accelerator.device)
            with accelerator.accumulate(*models):
                aux_loss, aux_metrics = None, {}
                if user:
                    batch["cond"]["prompt_embeds"], aux_loss, aux_metrics = user.condition(
                        batch["cond"]["prompt_embeds"], indices, gens)
                if cfg.method == "kto":
                    out = kto(batch, policy, reference, schedule, noise, t, cfg.beta,
                              cfg.kto_desirable_weight, cfg.kto_undesirable_weight)
                else:
                    inversion_gen = torch.Generator().manual_seed(randomness.mix(cfg.seed, micro_step, rank, 0x1A0))
                    method = "dpo" if cfg.method == "ppd" else cfg.method  # PPD: Diffusion-DPO given the user
                    out = paired_preference(batch, policy, reference, schedule, noise, t, cfg.beta, method,
                                            cfg.inversion_steps, cfg.inversion_eta, inversion_gen, cfg.inversion_model)
                loss = out.loss.mean()
                if aux_loss is not None:
                    loss = loss + aux_loss.mean()
                    out.metrics.update(aux_metrics)
                finite = accelerator.gather(torch.isfinite(loss.detach()).float().reshape(1)).min() > 0
                if not finite:
                    if cfg.nan_policy == "stop":
                        raise NonFiniteLossError(
                            f"non-finite loss at step {global_step} (method={cfg.method}, beta={cfg.beta}, "
                            f"lr={cfg.learning_rate}); lower the learning rate or beta, or set nan_policy=skip")
                    optimizer.zero_grad(set_to_none=True)
                    skipped_steps += 1
                    continue
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            extra_passes += out.extra_forward_passes
            # Every process saw an equal share of the batch, so the mean of the local means is the global mean.
            local_values = torch.tensor([loss.detach().item(), *out.metrics.values()], device=accelerator.device)
            reduced = accelerator.gather(local_values.reshape(1, -1)).mean(0).tolist()
            metrics = dict(zip(["loss", *out.metrics], reduced))
            if grad_norm is not None:
                metrics["grad_norm"] = float(grad_norm)
            step_metrics.append(metrics)
        lr_scheduler.step()
        global_step += 1
        logs = {k: sum(m.get(k, 0.0) for m in step_metrics) / max(1, len(step_metrics))
                for k in (step_metrics[0] if step_metrics else {})}
        rates = lr_scheduler.get_last_lr()  # [user projections, head] when ppd_attention_lr splits them
        logs.update(lr=rates[-1], extra_forward_passes=extra_passes, skipped_steps=skipped_steps)
        if len(rates) > 1:
            logs["attention_lr"] = rates[0]
        if evaluator and cfg.eval_every and global_step % cfg.eval_every == 0 and global_step < cfg.max_train_steps:
            eval_started = time.time()
            logs.update(evaluator(global_step))
            eval_seconds += time.time() - eval_started
        accelerator.log(logs, step=global_step)
        history.append({"step": global_step, **logs})
        bar.update(1)
        bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items() if k in ("loss", "implicit_acc", "win_rate_vs_base")})
        if cfg.checkpointing_steps and global_step % cfg.checkpointing_steps == 0 and global_step < cfg.max_train_steps:
            assert_finite(params)
            save_checkpoint(accelerator, output_dir, global_step,
                            {"global_step": global_step, "skipped_steps": skipped_steps}, cfg.checkpoints_total_limit)
    bar.close()

    # 4. Final weights: a stock-loadable LoRA (with its alpha) or a diffusers UNet folder.
    assert_finite(params)
    save_checkpoint(accelerator, output_dir, global_step, {"global_step": global_step, "skipped_steps": skipped_steps},
                    cfg.checkpoints_total_limit)
    wall_clock = time.time() - started
    summary = {"method": cfg.method, "steps": global_step, "wall_clock_s": round(wall_clock, 1),
               "train_s": round(wall_clock - eval_seconds, 1), "eval_s": round(eval_seconds, 1),
               "skipped_steps": skipped_steps, "extra_forward_passes": extra_passes, "pairs": len(cache),
               "final": history[-1] if history else {}}
    if evaluator:
        summary["eval"] = evaluator(global_step)
        accelerator.log(summary["eval"], step=global_step)
    if accelerator.is_main_process:
        if user:
            user.export(raw_unet, output_dir)
        else:
            export_weights(raw_unet, pipeline_class, cfg, output_dir)
        (output_dir / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
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


def _setup_ppd(cfg: TrainConfig, unet, cache, accelerator, tokenizer):
    from diffpref.personalize.training import PPDConditioner

    return PPDConditioner.build(cfg, unet, cache, accelerator, tokenizer=tokenizer)


def _make_evaluator(cfg: TrainConfig, accelerator, unet, pipeline_class, resolution):
    """Oracle win rate against the base model, when the data came from the world and has users."""
    users_file = Path(cfg.eval_users) if cfg.eval_users else Path(cfg.data_path).parent / "users.json"
    if cfg.method == "ppd" or not users_file.exists() or not accelerator.is_main_process:
        return None
    from diffpref.experiments.preference_eval import TrainingEvaluator

    return TrainingEvaluator(cfg, unet, users_file)
