"""One optimizer step, the code that ``train`` loops over and ``bench/train_step.py`` times.

    parts = prepare_training(cfg, accelerator, unet, cache, schedule)   # trainable weights, optimizer, models
    result = training_step(parts, step)                                 # one optimizer step; logs in result.metrics

``prepare_training`` makes the weights trainable (LoRA adapters, a conditioner's layers, or the full
UNet with a frozen reference copy), builds the optimizer and passes the models through
``accelerator.prepare``. ``training_step`` then draws each micro-batch from the cache with noise,
timesteps and prompt dropout that are a function of (seed, step, position) only (so resumed and
multi-process runs reproduce one uninterrupted run), conditions it, runs the registered objective
and steps the optimizer and the learning-rate schedule.

A conditioner (e.g. ``diffpref.personalize.training.PPDConditioner``) is any object with
``setup(cfg, unet, cache, accelerator, tokenizer) -> param groups``, ``modules``, ``bind(modules)``,
``condition(prompt_embeds, indices, generators) -> prompt_embeds``, ``without_user(prompt_embeds)``
and ``export(unet, output_dir)``; this module calls all but the last.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from diffpref.training import randomness
from diffpref.training.conditioning import added_cond_kwargs
from diffpref.training.objectives import (
    Denoiser,
    NoiseSchedule,
    Objective,
    ObjectiveInputs,
    ObjectiveOutput,
    get_objective,
    inversion_points,
)


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


@dataclass
class StepParts:
    """What a training step needs; built once by ``prepare_training``."""

    cfg: Any                                # TrainConfig
    accelerator: Any
    cache: Any                              # a PreferenceCache / RatingCache (or any indexable of such items)
    schedule: NoiseSchedule
    objective: Objective
    models: list[torch.nn.Module]           # prepared: the UNet, then the conditioner's modules
    raw_unet: torch.nn.Module               # the UNet unwrapped (adapters switch, export, evaluation)
    params: list[torch.nn.Parameter]        # every trainable parameter (gradient clipping, finiteness checks)
    optimizer: Any
    lr_scheduler: Any
    policy: Denoiser
    reference: Denoiser | None
    timestep_high: int                      # timesteps are drawn from [cfg.timestep_min, timestep_high)
    conditioner: Any = None
    reference_unet: torch.nn.Module | None = None  # full fine-tuning: the frozen copy
    inversion_points: torch.Tensor | None = None  # InPO: its timestep grid; every t is one of these points
    inversion: Any = None                   # InPO: the InversionCache x_t is read from (None: invert every step)
    inversion_build_s: float = 0.0          # seconds spent building (or opening) the inversion cache


@dataclass
class StepResult:
    metrics: dict[str, float] = field(default_factory=dict)  # loss, objective metrics, grad_norm, lr(s)
    skipped: int = 0                        # micro-steps skipped for a non-finite loss (nan_policy=skip)
    extra_forward_passes: int = 0


# ----------------------------------------------------------------------------- set-up
def lr_lambda(cfg):
    """The learning-rate factor of optimizer step ``step``: linear warm-up, then constant, linear or cosine."""
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


def make_optimizer(cfg, param_groups: list[dict]):
    """The optimizer of ``cfg.optimizer`` over ``param_groups`` (a group's own "lr" overrides learning_rate).

    ``adafactor`` is the official Diffusion-DPO SDXL setting (SalesforceAIResearch/DiffusionDPO train.py:
    ``transformers.Adafactor(lr=..., weight_decay=..., clip_threshold=1.0, scale_parameter=False,
    relative_step=False)``): the learning rate comes from the config and its schedule, not Adafactor's own
    relative step, and it keeps factored second moments only, so a full SDXL UNet fits in far less memory
    than AdamW's two fp32 moments.
    """
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(param_groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, clip_threshold=1.0,
                         scale_parameter=False, relative_step=False, warmup_init=False)
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise RuntimeError("optimizer=adamw8bit needs bitsandbytes (pip install 'diffpref[gpu]') and a CUDA GPU") from exc
        cls = bnb.optim.AdamW8bit
    else:
        cls = torch.optim.AdamW
    return cls(param_groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)


def add_lora(unet, cfg) -> None:
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian",
                                target_modules=[m.strip() for m in cfg.lora_target_modules.split(",") if m.strip()]))


def sharded(accelerator) -> bool:
    """Whether the prepared models hold only a shard of their weights on this process (FSDP, or
    DeepSpeed ZeRO stage 3): then only the prepared model's forward, ``accelerator.get_state_dict`` and
    ``gathered_weights`` see whole weights."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return True
    if kind == DistributedType.DEEPSPEED:
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return False


@contextlib.contextmanager
def gathered_weights(accelerator, models):
    """Inside, the unwrapped ``models`` hold their whole weights on every process (read-only: changes
    are not written back). Every process must enter it: gathering is collective. One process, DDP and
    ZeRO-1/2: nothing to do."""
    from accelerate.utils import DistributedType

    with contextlib.ExitStack() as stack:
        if accelerator.distributed_type == DistributedType.FSDP:
            if getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1) == 2:
                from torch.distributed.fsdp import FSDPModule

                shards = [m for model in models for m in model.modules() if isinstance(m, FSDPModule)]
                for module in shards:
                    module.unshard()
                stack.callback(lambda: [m.reshard() for m in shards])
            else:
                from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

                for model in models:
                    if isinstance(model, FSDP):
                        stack.enter_context(FSDP.summon_full_params(model, writeback=False))
        elif sharded(accelerator):  # DeepSpeed ZeRO-3
            import deepspeed

            params = [p for model in models for p in model.parameters()]
            stack.enter_context(deepspeed.zero.GatheredParameters(params, modifier_rank=None))
        yield


def timestep_high(cfg, num_train_timesteps: int) -> int:
    high = num_train_timesteps if cfg.timestep_max is None else cfg.timestep_max
    if high > num_train_timesteps or cfg.timestep_min >= high:
        raise ValueError(f"timesteps [{cfg.timestep_min}, {high}) do not fit the scheduler's "
                         f"{num_train_timesteps} training timesteps: need 0 <= timestep_min < timestep_max <= "
                         f"{num_train_timesteps}")
    return high


def prepare_training(cfg, accelerator, unet, cache, schedule: NoiseSchedule, conditioner=None, tokenizer=None,
                     weight_dtype: torch.dtype | None = None) -> StepParts:
    """Trainable weights, optimizer and models of a run; ``weight_dtype`` (default: the accelerator's mixed
    precision) is the dtype of the frozen weights: trainable ones stay fp32."""
    from accelerate.utils import set_seed

    if cfg.conditioning != "none" and conditioner is None:
        raise ValueError(f"conditioning={cfg.conditioning!r} needs its conditioner: build it with "
                         "diffpref.launch.build_parts(cfg) and pass it to train()")
    objective = get_objective(cfg.method)
    high = timestep_high(cfg, len(schedule.alphas_cumprod))  # before any work: a bad range fails at once
    if weight_dtype is None:
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    if cfg.attention == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    set_seed(cfg.seed)  # random inits (LoRA, a conditioner's head) must not depend on what ran before in this process
    reference_unet, groups = None, None
    if cfg.lora_rank == 0 and conditioner is None:  # full fine-tuning: the reference is a frozen copy
        unet.requires_grad_(True)
        if objective.uses_reference:
            reference_unet = copy.deepcopy(unet).requires_grad_(False).eval().to(weight_dtype)
    else:
        unet.to(dtype=weight_dtype).requires_grad_(False)
        if cfg.lora_rank > 0:
            add_lora(unet, cfg)
        if conditioner is not None:
            with whole_models_on_load(accelerator):  # a VLM backbone (transformers) loads whole
                groups = conditioner.setup(cfg, unet, cache, accelerator, tokenizer)
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # trainable weights stay fp32 under mixed precision
    if groups is None:
        groups = [{"params": [p for p in unet.parameters() if p.requires_grad]}]
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = make_optimizer(cfg, groups)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    own_modules = list(conditioner.modules) if conditioner is not None else []
    if uses_deepspeed(accelerator):
        models, optimizer = _prepare_deepspeed(cfg, accelerator, unet, own_modules, optimizer, conditioner, weight_dtype)
        raw_unet = accelerator.unwrap_model(models[0]).unet
    else:
        *models, optimizer = accelerator.prepare(unet, *own_modules, optimizer)
        if conditioner is not None:
            conditioner.bind(models[1:])
        raw_unet = accelerator.unwrap_model(models[0])
    if reference_unet is not None and accelerator.distributed_type == _distributed_type("FSDP"):
        # FSDP shards the frozen copy too (each rank holds 1/N of it); one process keeps it as it is.
        # DeepSpeed builds one engine per Accelerator, so there the copy stays whole, unprepared, on each GPU
        # in the training dtype (docs/distributed.md gives the memory cost).
        reference_unet = accelerator.prepare(reference_unet)
    policy, reference = _denoisers(cfg, accelerator, models[0], raw_unet, reference_unet, conditioner,
                                   objective.uses_reference, cache.resolution, weight_dtype)
    return StepParts(cfg=cfg, accelerator=accelerator, cache=cache, schedule=schedule, objective=objective,
                     models=models, raw_unet=raw_unet, params=[p for g in groups for p in g["params"]],
                     optimizer=optimizer, lr_scheduler=lr_scheduler, policy=policy, reference=reference,
                     timestep_high=high, conditioner=conditioner,
                     reference_unet=reference_unet,
                     inversion_points=inversion_points(cfg, len(schedule.alphas_cumprod)) if objective.inverts else None)


def _distributed_type(name: str):
    from accelerate.utils import DistributedType

    return DistributedType[name]


def uses_deepspeed(accelerator) -> bool:
    return accelerator.distributed_type == _distributed_type("DEEPSPEED")


def mixed_precision_autocast(accelerator, weight_dtype: torch.dtype):
    """Per-op casting of fp32 inputs for models held in ``weight_dtype``. accelerate's own ``autocast`` does
    it, except under DeepSpeed, where it does nothing: the engine holds its model in bf16/fp16 and casts no
    inputs (bf16), so a fp32 latent would meet bf16 weights. There torch's autocast does the casting."""
    if uses_deepspeed(accelerator) and weight_dtype != torch.float32:
        return torch.autocast(accelerator.device.type, dtype=weight_dtype)
    return accelerator.autocast()


@contextlib.contextmanager
def whole_models_on_load(accelerator):
    """Models loaded inside hold their whole weights. Under ZeRO-3, accelerate 1.15 registers its DeepSpeed
    config with transformers whatever ``zero3_init_flag`` says, and transformers then builds every model it
    loads partitioned (``deepspeed.zero.Init``): the frozen text encoder that encodes the cache would hold
    empty weights (measured: "Sequence length must be less than max_position_embeddings (got 16 and 0)")."""
    if not uses_deepspeed(accelerator):
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


class PreparedParts(torch.nn.Module):
    """The one model DeepSpeed trains: accelerate builds one engine (and one optimizer) per Accelerator, so
    the UNet and a conditioner's modules (PPD: the user encoder) become children of this module. Every call
    goes through the engine's forward, ``part`` naming the child (-1: the UNet), so that ZeRO-3 gathers
    and releases the weights as for any model; export and evaluation read the children themselves."""

    def __init__(self, unet: torch.nn.Module, modules: list[torch.nn.Module], weight_dtype: torch.dtype):
        super().__init__()
        self.unet = unet
        self.own = torch.nn.ModuleList(modules)
        self.weight_dtype = weight_dtype

    def forward(self, *args, part: int = -1, **kwargs):
        module = self.unet if part < 0 else self.own[part]
        if self.weight_dtype == torch.float32:
            return module(*args, **kwargs)
        device = next(iter(module.parameters())).device
        with torch.autocast(device.type, dtype=self.weight_dtype):  # the conditioner's fp32 inputs (see above)
            return module(*args, **kwargs)


class PartCall:
    """What a conditioner binds to under DeepSpeed: calling it runs its module through the engine;
    ``module`` is the module itself (for its own methods and export)."""

    def __init__(self, engine, part: int, module: torch.nn.Module):
        self.engine, self.part, self.module = engine, part, module

    def __call__(self, *args, **kwargs):
        return self.engine(*args, part=self.part, **kwargs)


def deepspeed_settings(cfg, deepspeed_config: dict) -> dict:
    """The DeepSpeed config entries that follow the diffpref config, filled where the accelerate config left
    them "auto" (or absent): the trainer passes accelerate no DataLoader, from which it would take the micro
    batch, and accelerate would clip gradients at 1.0 whatever ``max_grad_norm`` says."""
    wanted = {"train_micro_batch_size_per_gpu": cfg.train_batch_size,
              "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
              "gradient_clipping": float(cfg.max_grad_norm)}  # DeepSpeed: 0 = no clipping, as in diffpref
    for key, value in wanted.items():
        given = deepspeed_config.get(key, "auto")
        if given == "auto":
            deepspeed_config[key] = value
        elif given != value:
            raise ValueError(f"the DeepSpeed config sets {key}={given!r} but the diffpref config gives {value!r}: "
                             f"set it to \"auto\" in the accelerate/DeepSpeed config (the trainer fills it in)")
    return deepspeed_config


def _prepare_deepspeed(cfg, accelerator, unet, own_modules, optimizer, conditioner, weight_dtype):
    """([engine], optimizer): the UNet and ``own_modules`` prepared as one model (see ``PreparedParts``)."""
    deepspeed_settings(cfg, accelerator.state.deepspeed_plugin.deepspeed_config)
    engine, optimizer = accelerator.prepare(PreparedParts(unet, own_modules, weight_dtype), optimizer)
    if conditioner is not None:
        conditioner.bind([PartCall(engine, i, module) for i, module in enumerate(own_modules)])
    return [engine], optimizer


def _denoisers(cfg, accelerator, unet, raw_unet, reference_unet, conditioner, uses_reference: bool, resolution: int,
               weight_dtype: torch.dtype = torch.float32):
    """(policy, reference): ``(x_t, t, cond) -> output`` of the trained model and of the base model."""
    def denoiser(model):
        def run(x, t, cond):
            extra = added_cond_kwargs(raw_unet, cond, resolution, x.shape[0])
            with mixed_precision_autocast(accelerator, weight_dtype):  # fp32 inputs are cast per op
                return model(x, t, encoder_hidden_states=cond["prompt_embeds"], added_cond_kwargs=extra).sample.float()
        return run

    if not uses_reference:
        return denoiser(unet), None
    if reference_unet is not None:
        return denoiser(unet), denoiser(reference_unet)

    def reference(x, t, cond):
        # The base model: adapters off and, with a conditioner, no user. It runs through the prepared
        # model, so FSDP/ZeRO-3 gather the weights as for the policy pass; the adapter switch acts on the
        # same layers, which the wrapper holds. One process: the prepared model is the UNet itself.
        if conditioner is not None:
            cond = {**cond, "prompt_embeds": conditioner.without_user(cond["prompt_embeds"])}
        with adapters_disabled(raw_unet) if cfg.lora_rank > 0 else contextlib.nullcontext():
            return denoiser(unet)(x, t, cond)

    return denoiser(unet), reference


# ----------------------------------------------------------------------------- batches
def collate(items: list[dict], empty_cond: dict, drop: torch.Tensor) -> dict:
    """Cache items -> one batch; ``drop`` [B] bool replaces those samples' prompts by the empty prompt."""
    batch = {key: torch.stack([torch.as_tensor(item[key]) for item in items]) for key in items[0]}
    cond = {k: batch.pop(k) for k in ("prompt_embeds", "pooled_prompt_embeds") if k in batch}
    batch["cond_undropped"] = dict(cond)  # InPO inverts with the image's own prompt (objectives._inverted)
    batch["prompt_dropped"] = drop.clone()  # InPO's cached reference errors hold for the kept prompts only
    # Prompt dropout: some samples see the empty prompt, so guidance still has an unconditional branch.
    for key, value in cond.items():
        empty = empty_cond[key].to(value.dtype).expand_as(value)
        mask = drop.view(-1, *([1] * (value.dim() - 1)))
        cond[key] = torch.where(mask, empty, value)
    batch["cond"] = cond
    return batch


def to_device(batch: dict, device, dtype) -> dict:
    """Floats in ``dtype`` (labels and ratings always fp32), integers as they are."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, dict):
            out[key] = to_device(value, device, dtype)
        elif value.is_floating_point():
            out[key] = value.to(device=device, dtype=torch.float32 if key in ("label", "liked") else dtype)
        else:
            out[key] = value.to(device)
    return out


@dataclass
class MicroBatch:
    """This process's share of one micro-step: the batch and its noise, timesteps and random streams."""

    batch: dict
    noise: torch.Tensor
    t: torch.Tensor
    indices: torch.Tensor
    generators: list[torch.Generator]
    micro_step: int


def draw_micro_batch(parts: StepParts, micro_step: int) -> MicroBatch:
    cfg, accelerator, cache = parts.cfg, parts.accelerator, parts.cache
    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = cfg.train_batch_size * world
    local = randomness.local_slice(global_batch, rank, world)
    indices = randomness.global_batch_indices(micro_step, len(cache), global_batch, cfg.seed)[local]
    gens = randomness.sample_generators(micro_step, range(local.start, local.stop), cfg.seed)
    t = randomness.per_sample_timesteps(gens, parts.timestep_high, cfg.timestep_min)
    grid_index = None
    if parts.inversion_points is not None:
        # InPO: t's position in [timestep_min, high) picks one of the grid points >= timestep_min, each with
        # probability ~1/n (exactly when n divides the range).
        first = int((parts.inversion_points < cfg.timestep_min).sum())
        n = len(parts.inversion_points) - first
        grid_index = first + ((t - cfg.timestep_min) * n // (parts.timestep_high - cfg.timestep_min)).clamp(max=n - 1)
        t = parts.inversion_points[grid_index]
    drop = randomness.per_sample_uniform(gens) < cfg.prompt_dropout
    if getattr(cache, "random_flip", False):
        # Each image mirrored or not as a function of (seed, step, position): both orientations are cached.
        flips = randomness.flip_choices(micro_step, range(local.start, local.stop),
                                        len(cache.layout.latent_columns), cfg.seed)
        items = [cache.get(int(i), flips[k]) for k, i in enumerate(indices)]
    else:
        flips = None
        items = [cache[int(i)] for i in indices]
    if parts.inversion is not None:
        for k, (item, i) in enumerate(zip(items, indices)):
            item.update(parts.inversion.get(int(i), int(grid_index[k]), None if flips is None else flips[k].tolist()))
    noise = randomness.per_sample_noise(gens, tuple(items[0].get("latents_0", items[0].get("latents")).shape))
    batch = to_device(collate(items, cache.empty_prompt_cond, drop), accelerator.device, torch.float32)
    return MicroBatch(batch, noise.to(accelerator.device), t.to(accelerator.device), indices, gens, micro_step)


def objective_output(parts: StepParts, batch: dict, noise: torch.Tensor, t: torch.Tensor,
                     generator: torch.Generator | None = None) -> ObjectiveOutput:
    """The registered objective on an already conditioned batch."""
    return parts.objective.fn(ObjectiveInputs(batch, parts.policy, parts.reference, parts.schedule, noise, t,
                                              parts.cfg, generator))


# ----------------------------------------------------------------------------- the step
def training_step(parts: StepParts, step: int) -> StepResult:
    """Optimizer step ``step`` (0-based): its micro-steps, then the learning-rate schedule."""
    cfg, accelerator = parts.cfg, parts.accelerator
    result, micro_metrics = StepResult(), []
    for micro in range(cfg.gradient_accumulation_steps):
        mb = draw_micro_batch(parts, step * cfg.gradient_accumulation_steps + micro)
        with accelerator.accumulate(*parts.models):
            if parts.conditioner is not None:
                cond = mb.batch["cond"]
                cond["prompt_embeds"] = parts.conditioner.condition(cond["prompt_embeds"], mb.indices, mb.generators)
            inversion_gen = torch.Generator().manual_seed(
                randomness.mix(cfg.seed, mb.micro_step, accelerator.process_index, 0x1A0))
            out = objective_output(parts, mb.batch, mb.noise, mb.t, inversion_gen)
            loss = out.loss.mean()
            if not _finite_everywhere(accelerator, loss):
                if cfg.nan_policy == "stop":
                    raise NonFiniteLossError(
                        f"non-finite loss at step {step} (method={cfg.method}, beta={cfg.beta}, "
                        f"lr={cfg.learning_rate}); lower the learning rate or beta, or set nan_policy=skip")
                parts.optimizer.zero_grad(set_to_none=True)
                result.skipped += 1
                continue
            accelerator.backward(loss)
            grad_norm = None
            if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(parts.params, cfg.max_grad_norm)
            parts.optimizer.step()
            parts.optimizer.zero_grad(set_to_none=True)
        result.extra_forward_passes += out.extra_forward_passes
        micro_metrics.append(_reduced_metrics(accelerator, loss, out.metrics, grad_norm))
    parts.lr_scheduler.step()
    result.metrics = {k: sum(m.get(k, 0.0) for m in micro_metrics) / len(micro_metrics)
                      for k in (micro_metrics[0] if micro_metrics else {})}
    result.metrics.update(learning_rates(parts.optimizer, parts.lr_scheduler))
    return result


def learning_rates(optimizer, lr_scheduler) -> dict[str, float]:
    """``lr`` (the last param group's), and ``<name>_lr`` of every group that has a ``name``."""
    rates = lr_scheduler.get_last_lr()
    named = {f"{g['name']}_lr": rate for g, rate in zip(optimizer.param_groups, rates) if g.get("name")}
    return {"lr": rates[-1], **named}


def _finite_everywhere(accelerator, loss: torch.Tensor) -> bool:
    return bool(accelerator.gather(torch.isfinite(loss.detach()).float().reshape(1)).min() > 0)


def _reduced_metrics(accelerator, loss: torch.Tensor, metrics: dict, grad_norm) -> dict[str, float]:
    # Every process saw an equal share of the batch, so the mean of the local means is the global mean.
    local = torch.tensor([loss.detach().item(), *metrics.values()], device=accelerator.device)
    reduced = dict(zip(["loss", *metrics], accelerator.gather(local.reshape(1, -1)).mean(0).tolist()))
    if grad_norm is not None:
        reduced["grad_norm"] = float(grad_norm)
    return reduced
