"""Throughput and peak memory of one preference-training step: diffpref's trainer vs. a reference-style loop.

    python bench/train_step.py --json                                   # embedded model, LoRA DPO, CPU
    python bench/train_step.py --json --config sd15 --batch-pairs 8     # SD1.5 architecture, GPU
    python bench/train_step.py --json --config sd15 --lora-rank 0       # full fine-tuning
    python bench/train_step.py --flops --config sd15 --batch-pairs 8    # UNet fwd+bwd MFU (GPU)

"ours" is one optimizer step of the trainer itself: ``diffpref.training.step.prepare_training`` sets up
the bench's UNet (LoRA, or full fine-tuning with a frozen reference copy) on a real ``PreferenceCache``
(VAE latents and prompt embeddings encoded once, before training) and ``training_step`` runs the step
``diffpref.training.trainer.train`` loops over (per-sample noise/timesteps/prompt dropout, the registered
objective, AdamW with gradient clipping). Nothing of it is copied here.

"reference" is the same step written the way the Diffusion-DPO public training script does it: a
separately loaded frozen reference UNet (also for LoRA), the VAE encoding both images and the text
encoder(s) running on every step, and the DPO loss written out inline. Image decoding is left out of
both (the public scripts do it in DataLoader workers), which if anything flatters the reference loop.

``--method ppd`` (personalization): "ours" is the trainer's PPD step (DPO with ``conditioning: ppd``: the
``PPDConditioner`` that ``diffpref.launch.build_parts`` builds appends user tokens from the cached backbone
embeddings of k of the user's other pairs; the frozen base UNet gets the decoupled user cross-attention;
the user encoder head and the user projections train; reference = the same UNet with no user).
"reference" runs the VAE, the text encoder and the CLIP backbone on the context examples on every step,
and a separate frozen copy of the base UNet as the reference.

Both variants use the same UNet config, batch, optimizer and precision, and an objective check at
start-up asserts that they compute the same loss on the same latents, noise and timesteps.
Timing: both variants live in one process and their steps are interleaved (ABBA order) after warm-up,
so background load hits both alike; pairs/s = batch_pairs / median step time. Peak memory: each
variant runs in a fresh child process (see ``_memory_worker``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read at import time by diffusers/transformers: set it first
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_timing import device_label, sync, time_abba  # noqa: E402  (beside this script)

from diffpref.models.builders import WORLD_SCHEDULER_CONFIG, WORLD_UNET_CONFIG  # noqa: E402
from diffpref.training.config import DEFAULT_BETA  # noqa: E402

CONFIGS = ("embedded", "sd15", "sdxl")
METHODS = ("dpo", "inpo", "ppd")
GPU_ONLY = ("sd15", "sdxl")
BETA = {**DEFAULT_BETA, "ppd": DEFAULT_BETA["dpo"]}  # the trainer's defaults (-beta/2 form); PPD trains DPO
LEARNING_RATE = 1e-4
MAX_GRAD_NORM = 1.0
PROMPT_DROPOUT = 0.1
INVERSION_STEPS = 10
INVERSION_MODEL = "reference"  # InPO: which model inverts x0 to x_t (TrainConfig.inversion_model's default)
OBJECTIVE_TOLERANCE = 1e-3  # |loss_ours - loss_reference| on the check batch, fp32
TOKENS_TOLERANCE = 1e-4  # PPD: |user tokens from the cached embeddings - from the backbone run live|
# PPD: the trainer's defaults (TrainConfig ppd_*), the head width of configs/{embedded,sd15}_ppd.yaml, and
# the user-encoder backbone: the shipped world CLIP, or (sd15/sdxl) a random-weight open_clip ViT-H-14
# as configs/sd15_ppd.yaml uses. The data hold USERS users with one more pair each than the most shots.
PPD_HIDDEN = {"embedded": 128, "sd15": 512, "sdxl": 512}
PPD_BACKBONE = {"sd15": "ViT-H-14", "sdxl": "ViT-H-14"}
PPD_PAIRS_PER_USER = 9  # one more than TrainConfig.ppd_shots_max (8): every k can be drawn
USERS = 4  # the bench data's users (pair i belongs to user i % USERS)

# ----------------------------------------------------------------------------- architectures
# Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5), written out so nothing is downloaded.
SD15_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)
SD_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, act_fn="silu", norm_num_groups=32,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), sample_size=512, scaling_factor=0.18215,
)
CLIP_L_TEXT_CONFIG = dict(  # SD1.5's text encoder, and SDXL's first one
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)
# SDXL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0).
SDXL_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
    cross_attention_dim=2048, attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SDXL_VAE_CONFIG = {**SD_VAE_CONFIG, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
CLIP_BIGG_TEXT_CONFIG = dict(  # SDXL's second text encoder (OpenCLIP ViT-bigG/14)
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
)
RESOLUTION = {"embedded": 64, "sd15": 512, "sdxl": 1024}
UNET_CONFIG = {"embedded": WORLD_UNET_CONFIG, "sd15": SD15_UNET_CONFIG, "sdxl": SDXL_UNET_CONFIG}

# Dense bf16 peak of the cards we expect, by a substring of torch.cuda.get_device_name(); first match wins.
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
                   ("GH200", 989e12), ("A100", 312e12), ("L40S", 362e12), ("A10G", 70e12))


def resolution_of(args) -> int:
    """``--resolution``, or the config's native image size."""
    return args.resolution or RESOLUTION[args.config]


def unet_config(config: str) -> dict:
    return UNET_CONFIG[config]


def build_unet(config: str):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**unet_config(config))


def set_attention(unet, attention: str):
    """'sdpa' (diffusers' default processors) or 'xformers' (the stock switch, as the trainer's
    ``attention: xformers``; the PPD user branch installed afterwards inherits it). Returns ``unet``."""
    from diffpref.models.loading import check_attention

    check_attention(attention)  # a clear error without CUDA or xformers
    if attention == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    return unet


def build_components(config: str, workdir: Path, seed: int = 0, unet: bool = True) -> dict:
    """Random-init pipeline components of ``config`` (the architecture is all that matters for speed)."""
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from diffpref.models.builders import build_world_components
    from diffpref.models.tokenizer import load_world_tokenizer, write_world_tokenizer

    if config == "embedded":
        return build_world_components(workdir / "tokenizer", seed=seed)
    # Token ids only have to be valid; the world tokenizer padded to CLIP's 77 tokens does that offline.
    tokenizer = load_world_tokenizer(write_world_tokenizer(workdir / "tokenizer", model_max_length=77))
    torch.manual_seed(seed)
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    parts = dict(tokenizer=tokenizer, unet=build_unet(config) if unet else None, scheduler=DDIMScheduler(**WORLD_SCHEDULER_CONFIG),
                 text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT_CONFIG, **special)))
    if config == "sd15":
        parts["vae"] = AutoencoderKL(**SD_VAE_CONFIG)
    else:
        parts["vae"] = AutoencoderKL(**SDXL_VAE_CONFIG)
        parts["tokenizer_2"] = tokenizer
        parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG_TEXT_CONFIG, **special))
    return parts


def make_pipeline(config: str, parts: dict):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if config == "sdxl":
        return StableDiffusionXLPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"],
                                         text_encoder_2=parts["text_encoder_2"], tokenizer=parts["tokenizer"],
                                         tokenizer_2=parts["tokenizer_2"], unet=parts["unet"],
                                         scheduler=parts["scheduler"], force_zeros_for_empty_prompt=False)
    return StableDiffusionPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=parts["tokenizer"],
                                   unet=parts["unet"], scheduler=parts["scheduler"], safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


# ----------------------------------------------------------------------------- data
def write_pairs(workdir: Path, n_pairs: int, resolution: int, seed: int = 0) -> tuple[Path, list[str]]:
    """Random images and world-vocabulary prompts as a JSONL pair manifest (image 0 always preferred)."""
    from PIL import Image

    from diffpref.world.captions import caption_vocabulary

    rng = np.random.default_rng(seed)
    words = caption_vocabulary()
    images_dir = workdir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    lines, prompts = [], []
    for i in range(n_pairs):
        prompt = " ".join(rng.choice(words, size=6))
        names = []
        for side in (0, 1):
            name = f"{i:05d}_{side}.png"
            Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)).save(images_dir / name)
            names.append(f"images/{name}")
        lines.append(json.dumps({"prompt": prompt, "image_0": names[0], "image_1": names[1], "label": 1.0,
                                 "user_id": f"u{i % USERS}"}))
        prompts.append(prompt)
    manifest = workdir / "pairs.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest, prompts


def reference_inputs(manifest: Path, prompts: list[str], parts: dict, resolution: int) -> dict:
    """What the public scripts' DataLoader yields: pixel_values [N, 6, H, W] (winner|loser) and input_ids."""
    from PIL import Image

    from diffpref.training.conditioning import images_to_tensor

    pixels = []
    for line in manifest.read_text().splitlines():
        record = json.loads(line)
        images = [Image.open(manifest.parent / record[k]) for k in ("image_0", "image_1")]
        pixels.append(images_to_tensor(images, resolution).reshape(6, resolution, resolution))
    tokenizer = parts["tokenizer"]
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return {"pixel_values": torch.stack(pixels), "input_ids": ids}


def ppd_backbone(config: str, workdir: Path) -> str:
    """The ``ppd_backbone`` of the bench run: 'embedded' (the shipped world CLIP), or for sd15/sdxl an
    open_clip ``local-dir`` folder holding the real architecture with random weights (nothing downloaded)."""
    if config == "embedded":
        return "embedded"
    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from safetensors.torch import save_file

    name = PPD_BACKBONE[config]
    folder = workdir / f"open_clip-{name}"
    folder.mkdir(parents=True, exist_ok=True)
    model_cfg = open_clip.get_model_config(name)
    preprocess_cfg = {"size": model_cfg["vision_cfg"]["image_size"], "mean": list(OPENAI_DATASET_MEAN),
                      "std": list(OPENAI_DATASET_STD), "interpolation": "bicubic", "resize_mode": "shortest"}
    local_dir = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    (folder / "open_clip_config.json").write_text(json.dumps(local_dir))
    torch.manual_seed(0)
    model = open_clip.create_model(name)  # no pretrained tag: random weights
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()},
              str(folder / "open_clip_model.safetensors"))
    return str(folder)


def load_ppd_backbone(backbone: str, device):
    from diffpref.personalize.backbones import OpenClipBackbone

    return OpenClipBackbone.from_pretrained(None if backbone == "embedded" else backbone, device=str(device))


def ppd_reference_inputs(manifest: Path, backbone) -> dict:
    """What a public PPD script's DataLoader would yield for the context examples: every pair's two images
    CLIP-preprocessed [N, 2, 3, S, S], its prompt tokenized for CLIP, its label and its user."""
    from PIL import Image

    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    pixels = torch.stack([torch.stack([backbone.preprocess(Image.open(manifest.parent / r[k]).convert("RGB"))
                                       for k in ("image_0", "image_1")]) for r in records])
    users = sorted({r["user_id"] for r in records})
    return {"clip_pixels": pixels, "clip_ids": backbone.tokenizer([r["prompt"] for r in records]),
            "label": torch.tensor([float(r["label"]) for r in records]),
            "user_index": torch.tensor([users.index(r["user_id"]) for r in records])}


# ----------------------------------------------------------------------------- precision, LoRA
def _lora_config(rank: int):
    from peft import LoraConfig

    # The trainer's defaults: alpha = rank, attention projections, gaussian init.
    return LoraConfig(r=rank, lora_alpha=float(rank), init_lora_weights="gaussian",
                      target_modules=["to_q", "to_k", "to_v", "to_out.0"])


def _add_lora(unet, rank: int, seed: int):
    unet.requires_grad_(False)
    torch.manual_seed(seed)  # both variants get the same adapter initialisation
    unet.add_adapter(_lora_config(rank))
    return unet


def _cast_frozen(unet, dtype):
    """The trainer's mixed-precision layout: frozen weights in ``dtype``, trainable weights fp32."""
    if dtype == torch.float32:
        return
    unet.to(dtype=dtype)
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def _autocast(device: torch.device, dtype):
    if device.type == "cuda" and dtype != torch.float32:
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


class ReferenceOptimizer:
    """The reference-style loop's own optimizer step (ours is the trainer's, in ``training_step``)."""

    name: str
    policy_unet: torch.nn.Module

    def finalize(self, dtype):
        """Switch to the training precision and make the optimizer (after the objective check, which runs fp32)."""
        self.dtype = dtype
        self._cast(dtype)
        self.params = [p for m in self.trainable_modules() for p in m.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=LEARNING_RATE)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1.0)
        for module in self.trainable_modules():
            module.train()
        self.step_index = 0

    def trainable_modules(self) -> list[torch.nn.Module]:
        return [self.policy_unet]

    def _optimizer_step(self, loss):
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_index += 1
        return grad_norm


# ----------------------------------------------------------------------------- ours
class TrainerStep:
    """One optimizer step of ``diffpref.training.trainer.train``: its own ``prepare_training`` and
    ``training_step`` (single process), on the bench's UNet and cache."""

    name = "ours"

    def __init__(self, cfg, unet, cache, schedule, device, conditioner=None):
        from accelerate import Accelerator

        from diffpref.training.step import prepare_training

        # Mixed precision is the bench's own (``finalize``): the objective check runs first, in fp32.
        self.accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="no")
        self.cfg, self.device, self.dtype, self.step_index = cfg, device, torch.float32, 0
        self.parts = prepare_training(cfg, self.accelerator, unet.to(device), cache, schedule, conditioner,
                                      weight_dtype=torch.float32)
        self.conditioner, self.is_lora = conditioner, cfg.lora_rank > 0

    @property
    def policy_unet(self):
        return self.parts.raw_unet

    def trainable_modules(self) -> list[torch.nn.Module]:
        return [self.accelerator.unwrap_model(m) for m in self.parts.models]

    def finalize(self, dtype):
        """The trainer's mixed-precision layout: frozen weights in ``dtype``, trainable weights fp32."""
        self.dtype = dtype
        if self.parts.reference_unet is not None:
            self.parts.reference_unet.to(dtype)
        else:
            _cast_frozen(self.policy_unet, dtype)

    def objective(self, batch, noise, t):
        from diffpref.training.step import objective_output

        return objective_output(self.parts, batch, noise, t)

    def step(self) -> float:
        from diffpref.training.step import training_step

        with _autocast(self.device, self.dtype):  # what accelerate's mixed precision does in the trainer
            result = training_step(self.parts, self.step_index)
        self.step_index += 1
        return result.metrics["loss"]


def train_config(args, data_path: str, ppd: dict | None = None):
    """The trainer's config of the bench run: its defaults, with the bench's batch, rank and backend."""
    from diffpref.training.config import TrainConfig

    common = dict(data_path=data_path, train_batch_size=args.batch_pairs, learning_rate=LEARNING_RATE,
                  max_grad_norm=MAX_GRAD_NORM, prompt_dropout=PROMPT_DROPOUT, inversion_steps=INVERSION_STEPS,
                  inversion_model=INVERSION_MODEL, attention=args.attention, report_to="none", seed=0,
                  gradient_checkpointing=args.gradient_checkpointing)
    if args.method == "ppd":  # DPO plus user conditioning, no LoRA (as configs/*_ppd.yaml)
        return TrainConfig(method="dpo", conditioning="ppd", lora_rank=0, ppd_backbone=ppd["backbone"],
                           ppd_hidden=PPD_HIDDEN[args.config], **common)
    return TrainConfig(method=args.method, lora_rank=args.lora_rank, **common)


# ----------------------------------------------------------------------------- reference style
class ReferenceStyleStep(ReferenceOptimizer):
    """A Diffusion-DPO-style training step: frozen ref UNet copy, VAE and text encoder(s) on every step."""

    name = "reference"

    def __init__(self, unet, reference_unet, parts: dict, data: dict, method: str, lora_rank: int,
                 batch_pairs: int, resolution: int, device, seed: int = 0):
        from diffusers import DDPMScheduler

        self.method, self.batch_pairs, self.resolution, self.device = method, batch_pairs, resolution, device
        self.dtype = torch.float32
        self.is_lora = lora_rank > 0
        self.vae = parts["vae"].to(device).requires_grad_(False).eval()
        self.text_encoders = [parts[k].to(device).requires_grad_(False).eval()
                              for k in ("text_encoder", "text_encoder_2") if parts.get(k) is not None]
        self.noise_scheduler = DDPMScheduler.from_config(parts["scheduler"].config)
        self.pixel_values, self.input_ids = data["pixel_values"], data["input_ids"]
        unet = unet.to(device)
        self.policy_unet = _add_lora(unet, lora_rank, seed) if self.is_lora else unet.requires_grad_(True)
        self.ref_unet = reference_unet.to(device).requires_grad_(False).eval()
        self.sdxl = len(self.text_encoders) == 2

    def _cast(self, dtype):
        if self.is_lora:
            _cast_frozen(self.policy_unet, dtype)
        self.ref_unet.to(dtype)
        self.vae.to(dtype)
        for encoder in self.text_encoders:
            encoder.to(dtype)

    @torch.no_grad()
    def encode_prompt(self, input_ids):
        if not self.sdxl:
            return self.text_encoders[0](input_ids.to(self.device))[0], None
        embeds = []
        for encoder in self.text_encoders:
            out = encoder(input_ids.to(self.device), output_hidden_states=True)
            pooled = out[0]  # the second encoder's projected pooled output is the one kept
            embeds.append(out.hidden_states[-2])
        size = self.resolution
        add_time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=self.device, dtype=pooled.dtype)
        return torch.cat(embeds, dim=-1), {"text_embeds": pooled, "time_ids": add_time_ids.repeat(len(input_ids), 1)}

    def dpo_loss(self, latents, noise, timesteps, encoder_hidden_states, added_cond_kwargs, beta,
                 ref_encoder_hidden_states=None):
        """The public script's loss: latents/noise/timesteps are [2B] with winners first.

        ``ref_encoder_hidden_states``: the reference UNet's text conditioning when it differs from the
        policy's (PPD: the policy also reads the user tokens, the reference is the plain base model)."""
        if ref_encoder_hidden_states is None:
            ref_encoder_hidden_states = encoder_hidden_states
        if self.method == "inpo":
            from diffpref.inversion import ddim_invert, fixed_grid, grid_prefix

            # The public script inverts with the model being trained; diffpref's trainer inverts with the
            # frozen reference by default (TrainConfig.inversion_model). Both loops invert with the same
            # model so that they compute one objective (the objective check) at the same cost (one
            # no-grad UNet pass per inversion step either way).
            inverter = self.ref_unet if INVERSION_MODEL == "reference" else self.policy_unet
            # Along the public code's fixed 10-point grid, as the trainer (whose t are grid points) does.
            points = fixed_grid(INVERSION_STEPS, self.noise_scheduler.config.num_train_timesteps).to(timesteps.device)
            index = torch.searchsorted(points, timesteps)
            if not torch.equal(points[index.clamp(max=len(points) - 1)], timesteps):
                raise ValueError(f"InPO timesteps must be points of the grid {points.tolist()}, got {timesteps.tolist()}")
            with torch.no_grad(), _autocast(self.device, self.dtype):
                inv = ddim_invert(lambda x, s: inverter(x, s, encoder_hidden_states,
                                                            added_cond_kwargs=added_cond_kwargs).sample.float(),
                                  latents.float(), timesteps, self.noise_scheduler.alphas_cumprod,
                                  num_steps=INVERSION_STEPS, grid=grid_prefix(points, index))
            noisy_latents, target = inv.x_t, inv.eps_star
        else:
            noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)
            target = noise
        with _autocast(self.device, self.dtype):
            model_pred = self.policy_unet(noisy_latents, timesteps, encoder_hidden_states,
                                          added_cond_kwargs=added_cond_kwargs).sample
        model_losses = (model_pred.float() - target.float()).pow(2).mean(dim=[1, 2, 3])
        model_losses_w, model_losses_l = model_losses.chunk(2)
        model_diff = model_losses_w - model_losses_l
        with torch.no_grad(), _autocast(self.device, self.dtype):
            ref_pred = self.ref_unet(noisy_latents, timesteps, ref_encoder_hidden_states,
                                     added_cond_kwargs=added_cond_kwargs).sample.detach()
            ref_losses = (ref_pred.float() - target.float()).pow(2).mean(dim=[1, 2, 3])
            ref_losses_w, ref_losses_l = ref_losses.chunk(2)
            ref_diff = ref_losses_w - ref_losses_l
        scale_term = -0.5 * beta
        inside_term = scale_term * (model_diff - ref_diff)
        implicit_acc = (inside_term > 0).sum().float() / inside_term.size(0)
        loss = -1 * F.logsigmoid(inside_term).mean()
        return loss, implicit_acc

    def step(self) -> float:
        bsz = self.batch_pairs
        idx = torch.randperm(len(self.pixel_values))[:bsz]
        pixel_values = self.pixel_values[idx].to(self.device)
        feed_pixel_values = torch.cat(pixel_values.chunk(2, dim=1))  # [2B, 3, H, W]: winners, then losers
        with torch.no_grad():
            latents = self.vae.encode(feed_pixel_values.to(self.dtype)).latent_dist.sample()
            latents = latents * self.vae.config.scaling_factor
        noise = torch.randn_like(latents)
        noise = noise.chunk(2)[0].repeat(2, 1, 1, 1)  # winner and loser share the noise
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (bsz,), device=self.device)
        if self.method == "inpo":  # InPO trains at its inversion grid's points
            from diffpref.inversion import fixed_grid

            points = fixed_grid(INVERSION_STEPS, self.noise_scheduler.config.num_train_timesteps).to(self.device)
            timesteps = points[torch.randint(0, len(points), (bsz,), device=self.device)]
        timesteps = timesteps.repeat(2).long()
        encoder_hidden_states, added = self.encode_prompt(self.input_ids[idx])
        encoder_hidden_states, ref_encoder_hidden_states = self.condition(encoder_hidden_states, idx)
        encoder_hidden_states = encoder_hidden_states.repeat(2, 1, 1)
        if ref_encoder_hidden_states is not None:
            ref_encoder_hidden_states = ref_encoder_hidden_states.repeat(2, 1, 1)
        if added is not None:
            added = {k: v.repeat(2, 1) for k, v in added.items()}
        loss, implicit_acc = self.dpo_loss(latents, noise, timesteps, encoder_hidden_states, added, BETA[self.method],
                                           ref_encoder_hidden_states)
        grad_norm = self._optimizer_step(loss)
        return float(loss.item()) + 0.0 * float(implicit_acc) + 0.0 * float(grad_norm)

    def condition(self, encoder_hidden_states, idx):
        """(policy conditioning, reference conditioning or None when it is the same)."""
        return encoder_hidden_states, None


class ReferenceStylePPDStep(ReferenceStyleStep):
    """PPD written as public code would: the VAE, the text encoder and the CLIP backbone (on each sample's
    context examples) run on every step, and the reference is a separate frozen copy of the base UNet."""

    def __init__(self, unet, reference_unet, parts: dict, data: dict, batch_pairs: int, resolution: int, device,
                 backbone, encoder, num_tokens: int, cfg, seed: int = 0):
        from diffpref.personalize.attention import install_user_attention

        super().__init__(unet, reference_unet, parts, data, "ppd", 0, batch_pairs, resolution, device, seed)
        self.policy_unet.requires_grad_(False)
        install_user_attention(self.policy_unet, num_tokens, blocks=cfg.ppd_blocks if cfg.ppd_blocks == "all"
                               else [b.strip() for b in cfg.ppd_blocks.split(",") if b.strip()])
        self.clip = backbone.model.to(device)  # frozen, eval
        self.encoder = encoder.to(device)
        self.num_tokens, self.cfg = num_tokens, cfg
        # What the public scripts' DataLoader yields (decoded, CLIP-preprocessed, tokenized): free for this loop.
        self.clip_pixels, self.clip_ids = data["clip_pixels"], data["clip_ids"]
        self.label, self.user_index = data["label"], data["user_index"]

    def trainable_modules(self):
        return [self.policy_unet, self.encoder]

    def _cast(self, dtype):
        _cast_frozen(self.policy_unet, dtype)
        self.ref_unet.to(dtype)
        self.vae.to(dtype)
        self.clip.to(dtype)
        for encoder in self.text_encoders:
            encoder.to(dtype)

    def sample_context(self, idx) -> list[torch.Tensor]:
        """k in [shots_min, shots_max] of each sample's user's other pairs (as the trainer draws them)."""
        rows = []
        for row in idx.tolist():
            others = _other_pairs(self.user_index, row)  # never the pair being trained on
            k = min(int(torch.randint(self.cfg.ppd_shots_min, self.cfg.ppd_shots_max + 1, (1,))), len(others))
            rows.append(others[torch.randperm(len(others))[:k]])
        return rows

    def user_tokens(self, context: list[torch.Tensor]) -> torch.Tensor:
        """The backbone on every context example (prompt, preferred, rejected), then the trainable head."""
        from diffpref.personalize.backbones import example_features_from_embeddings

        flat = torch.cat(context)
        first = (self.label[flat] >= 0.5).view(-1, 1, 1, 1)
        pixels = self.clip_pixels[flat]  # (n, 2, 3, S, S)
        preferred = torch.where(first, pixels[:, 0], pixels[:, 1])
        rejected = torch.where(first, pixels[:, 1], pixels[:, 0])
        with torch.no_grad(), _autocast(self.device, self.dtype):
            images = self.clip.encode_image(torch.cat([preferred, rejected]).to(self.device, self.dtype)).float()
            text = self.clip.encode_text(self.clip_ids[flat].to(self.device)).float()
        features = example_features_from_embeddings(text, images[:len(flat)], images[len(flat):])
        k_max = max(len(c) for c in context)
        padded = features.new_zeros(len(context), k_max, features.shape[-1])
        mask = torch.zeros(len(context), k_max, dtype=torch.bool, device=features.device)
        start = 0
        for b, rows in enumerate(context):
            padded[b, :len(rows)] = features[start:start + len(rows)]
            mask[b, :len(rows)] = True
            start += len(rows)
        return self.encoder(padded, mask)

    def condition(self, encoder_hidden_states, idx):
        from diffpref.personalize.attention import concat_user_tokens

        tokens = self.user_tokens(self.sample_context(idx))
        keep = (torch.rand(len(idx)) >= self.cfg.ppd_user_dropout).to(tokens.device, tokens.dtype)
        tokens = tokens * keep.view(-1, 1, 1)  # user dropout: zero tokens = no user
        with_user = concat_user_tokens(encoder_hidden_states, tokens.to(encoder_hidden_states.dtype), self.num_tokens)
        return with_user, encoder_hidden_states


# ----------------------------------------------------------------------------- building both
def make_variant(kind: str, args, parts: dict | None, base_unet, cache, data, device, ppd: dict | None = None,
                 data_path: str = ""):
    """``ppd``: {"data_path": the pair manifest, "backbone": the ppd_backbone} for ``--method ppd``;
    ``data_path``: the pair manifest (the trainer's config names it; PPD's context bank is keyed by it)."""
    from diffusers import DDIMScheduler

    from diffpref.training.objectives import NoiseSchedule

    scheduler = parts["scheduler"] if parts else DDIMScheduler(**WORLD_SCHEDULER_CONFIG)
    cfg = train_config(args, data_path, ppd)
    if kind == "ours":
        from diffpref.launch import build_parts

        schedule = NoiseSchedule(scheduler.alphas_cumprod.clone(), scheduler.config.get("prediction_type", "epsilon"))
        conditioner, _ = build_parts(cfg)  # PPD: the trainer's PPDConditioner, as `diffpref train` builds it
        return TrainerStep(cfg, base_unet, cache, schedule, device, conditioner)
    reference_unet = copy.deepcopy(base_unet)  # "loaded twice": a separate frozen copy, even for LoRA
    if args.method == "ppd":
        from diffpref.personalize.encoder import SetUserEncoder

        backbone = load_ppd_backbone(ppd["backbone"], device)
        # The trainer's head (PPDConditioner.setup); perturb_and_share gives it ours' weights.
        encoder = SetUserEncoder(feature_dim=backbone.feature_dim, num_tokens=cfg.ppd_num_tokens,
                                 token_dim=int(base_unet.config.cross_attention_dim), hidden=cfg.ppd_hidden,
                                 layers=cfg.ppd_layers, heads=cfg.ppd_heads)
        variant = ReferenceStylePPDStep(base_unet, reference_unet, parts, data, args.batch_pairs, resolution_of(args),
                                        device, backbone, encoder, cfg.ppd_num_tokens, cfg)
    else:
        variant = ReferenceStyleStep(base_unet, reference_unet, parts, data, args.method, args.lora_rank,
                                     args.batch_pairs, resolution_of(args), device)
    if args.gradient_checkpointing:  # as the trainer's gradient_checkpointing key does for "ours"
        variant.policy_unet.enable_gradient_checkpointing()
    return variant


@torch.no_grad()
def perturb_and_share(ours: TrainerStep, reference: ReferenceStyleStep, seed: int = 1):
    """Move the trainable weights off their init (LoRA B starts at 0, so policy == reference would make the
    objective check trivial), identically in both variants."""
    gen = torch.Generator().manual_seed(seed)
    for module in ours.trainable_modules():
        for p in module.parameters():
            if p.requires_grad:
                scale = 0.02 if ours.is_lora else 1e-3 * (float(p.abs().mean()) + 1e-3)
                p.add_(scale * torch.randn(p.shape, generator=gen).to(p.device))
    for own, theirs in zip(ours.trainable_modules(), reference.trainable_modules(), strict=True):
        missing, unexpected = theirs.load_state_dict(own.state_dict(), strict=True)
        assert not missing and not unexpected


@torch.no_grad()
def objective_check(ours: TrainerStep, reference: ReferenceStyleStep, n_pairs: int = 2) -> dict:
    """Both variants' loss on the same cached latents, prompt embeddings, noise and timesteps (fp32)."""
    from diffpref.training.conditioning import added_cond_kwargs
    from diffpref.training.step import collate, to_device

    device, cache = ours.device, ours.parts.cache
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        items = [cache[i] for i in range(n_pairs)]
        batch = to_device(collate(items, cache.empty_prompt_cond, torch.zeros(n_pairs, dtype=torch.bool)),
                          device, torch.float32)
        gen = torch.Generator().manual_seed(123)
        noise = torch.randn((n_pairs, *items[0]["latents_0"].shape), generator=gen).to(device)
        t = torch.randint(0, 1000, (n_pairs,), generator=gen).to(device)
        if ours.parts.inversion_points is not None:  # InPO trains only at its grid's points (step.draw_micro_batch)
            points = ours.parts.inversion_points
            t = points[torch.randint(0, len(points), (n_pairs,), generator=gen)].to(device)
        beta = ours.cfg.beta
        cond = batch["cond"]
        embeds, ref_embeds, extra = cond["prompt_embeds"], None, {}
        if ours.conditioner is not None:
            # The same 2 context pairs per sample: ours reads their cached embeddings, the reference runs the backbone.
            from diffpref.personalize.attention import concat_user_tokens

            context = [_other_pairs(reference.user_index, i)[:2] for i in range(n_pairs)]
            features = torch.stack([ours.conditioner.bank.features(rows) for rows in context]).to(device)
            tokens_ours, tokens_reference = ours.conditioner.encoder(features), reference.user_tokens(context)
            extra["user_tokens_abs_diff"] = float((tokens_ours - tokens_reference).abs().max())
            if not extra["user_tokens_abs_diff"] <= TOKENS_TOLERANCE:
                raise AssertionError(f"user tokens differ: {extra['user_tokens_abs_diff']:.2e} > {TOKENS_TOLERANCE}")
            num_tokens = ours.conditioner.num_tokens
            cond["prompt_embeds"] = concat_user_tokens(embeds, tokens_ours, num_tokens)
            embeds, ref_embeds = concat_user_tokens(embeds, tokens_reference, num_tokens), embeds.repeat(2, 1, 1)
        loss_ours = ours.objective(batch, noise, t).loss.mean()
        latents = torch.cat([batch["latents_0"], batch["latents_1"]])
        added = added_cond_kwargs(ours.policy_unet, {k: v.repeat(2, *([1] * (v.dim() - 1))) for k, v in cond.items()},
                                  cache.resolution, 2 * n_pairs)
        loss_reference, _ = reference.dpo_loss(latents, noise.repeat(2, 1, 1, 1), t.repeat(2), embeds.repeat(2, 1, 1),
                                               added, beta, ref_embeds)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    diff = abs(float(loss_ours) - float(loss_reference))
    if not diff <= OBJECTIVE_TOLERANCE:
        raise AssertionError(f"objective mismatch: ours {float(loss_ours):.6f} vs reference "
                             f"{float(loss_reference):.6f} (|diff| {diff:.2e} > {OBJECTIVE_TOLERANCE})")
    return {"objective_loss": round(float(loss_ours), 6), "objective_abs_diff": diff, **extra}


def _other_pairs(user_index: torch.Tensor, row: int) -> torch.Tensor:
    """The rows of ``row``'s user other than ``row`` (its context candidates), in data order."""
    others = (user_index == user_index[row]).nonzero().flatten()
    return others[others != row]


def build_cache(config: str, parts: dict, workdir: Path, n_pairs: int, device, method: str = "dpo",
                resolution: int | None = None) -> tuple:
    """Write the pair data, build the trainer's cache from it (timed), and the reference loop's inputs.

    PPD: also the trainer's context bank (every pair's backbone embeddings, saved beside the latent
    cache, where ``PPDConditioner.setup`` finds it; timed with the cache) and the reference loop's
    CLIP inputs. Returns (cache, data, encode seconds, ppd set-up or None, the pair manifest)."""
    from diffpref.training.cache import build_preference_cache

    resolution = resolution or RESOLUTION[config]
    manifest, prompts = write_pairs(workdir, n_pairs, resolution)
    pipe = make_pipeline(config, parts)
    pipe.to(device)
    ppd = None
    if method == "ppd":
        ppd = {"data_path": str(manifest), "backbone": ppd_backbone(config, workdir)}
        backbone = load_ppd_backbone(ppd["backbone"], device)
    started = time.perf_counter()
    cache = build_preference_cache(pipe, manifest, workdir / "cache", resolution=resolution, progress=False)
    if ppd is not None:
        from diffpref.personalize.context import build_context_bank

        # as PPDConditioner.setup builds it (tie_policy: the trainer's default, drop)
        build_context_bank(cache, backbone, ppd["data_path"], "drop", ppd["backbone"], progress=False)
    sync(device)
    encode_s = time.perf_counter() - started
    data = reference_inputs(manifest, prompts, parts, resolution)
    if ppd is not None:
        data.update(ppd_reference_inputs(manifest, backbone))
        del backbone
    return cache, data, encode_s, ppd, str(manifest)


# ----------------------------------------------------------------------------- timing
def time_interleaved(variants: list, warmup: int, repeats: int, device) -> dict[str, list[float]]:
    """Step times per variant, rounds in ABBA order so drift and background load hit both alike."""
    def finite(name: str, loss) -> None:
        if not np.isfinite(loss):
            raise FloatingPointError(f"{name}: non-finite loss {loss}")

    return time_abba({v.name: v.step for v in variants}, warmup, repeats, device, check=finite)


# ----------------------------------------------------------------------------- memory
def _proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    """Linux >= 4.0: writing 5 to clear_refs resets VmHWM to the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _memory_worker(args) -> dict:
    """Child process: build one variant from scratch, run steps, report its peak memory.

    CUDA: ``torch.cuda.max_memory_allocated`` over the steps (reset after set-up, so it holds the
    resident weights plus optimizer state, gradients and activations at their peak).
    CPU: peak RSS (VmHWM, reset after set-up via /proc/self/clear_refs) minus the RSS this process had
    right after its imports, i.e. the same quantity: weights, optimizer state, gradients, activations,
    and the variant's data (the cache for ours, decoded pixels for the reference loop).
    """
    # Everything either variant imports, imported before the RSS baseline is read: module code is not
    # what we measure (diffusers and transformers import their model classes lazily).
    import accelerate  # noqa: F401
    import diffusers
    import peft  # noqa: F401
    import transformers

    import diffpref.inversion  # noqa: F401
    import diffpref.launch  # noqa: F401
    import diffpref.training.cache  # noqa: F401
    import diffpref.training.step  # noqa: F401

    for name in ("AutoencoderKL", "UNet2DConditionModel", "DDIMScheduler", "DDPMScheduler"):
        getattr(diffusers, name)
    for name in ("CLIPTextModel", "CLIPTextModelWithProjection", "CLIPTokenizer"):
        getattr(transformers, name)
    if args.method == "ppd":
        import open_clip  # noqa: F401

        import diffpref.personalize.training  # noqa: F401
    device = torch.device(args.device)
    rss_after_imports_kb = _proc_status_kb("VmRSS")
    spec = json.loads(Path(args.worker_dir, "spec.json").read_text())
    dtype = getattr(torch, spec["dtype"])
    if args.worker == "ours":
        from diffpref.training.cache import PreferenceCache

        cache = PreferenceCache(spec["cache"])
        variant = make_variant("ours", args, None, set_attention(build_unet(args.config), args.attention), cache, None,
                               device, spec["ppd"], spec["data_path"])
    else:
        parts = build_components(args.config, Path(args.worker_dir) / "child", unet=False)
        parts["unet"] = None
        data = torch.load(spec["data"], weights_only=True)
        variant = make_variant("reference", args, parts, set_attention(build_unet(args.config), args.attention), None,
                               data, device, spec["ppd"], spec["data_path"])
        del parts
    variant.finalize(dtype)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        setup_mb = torch.cuda.memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
    else:
        setup_mb = (_proc_status_kb("VmRSS") - rss_after_imports_kb) / 1024
    reset = _reset_peak_rss()
    # The first step allocates the optimizer state; with --sequential this process also does the timing.
    steps = args.warmup + args.repeats if args.sequential else 3
    step_times = []
    for i in range(steps):
        sync(device)
        started = time.perf_counter()
        variant.step()
        sync(device)
        if i >= args.warmup:
            step_times.append(time.perf_counter() - started)
    if device.type == "cuda":
        peak_mb, method = torch.cuda.max_memory_allocated(device) / 2**20, "cuda.max_memory_allocated"
    else:
        peak_mb = (_proc_status_kb("VmHWM") - rss_after_imports_kb) / 1024
        method = "VmHWM - VmRSS after imports" + ("" if reset else " (VmHWM not reset: includes set-up)")
    return {"variant": args.worker, "peak_mem_mb": peak_mb, "setup_mem_mb": setup_mb, "mem_method": method,
            "step_times": step_times}


def measure_memory(args, workdir: Path, cache, data, dtype, ppd: dict | None, data_path: str) -> dict[str, dict]:
    torch.save(data, workdir / "reference_data.pt")
    (workdir / "spec.json").write_text(json.dumps({"cache": str(cache.path), "data": str(workdir / "reference_data.pt"),
                                                   "dtype": str(dtype).removeprefix("torch."), "ppd": ppd,
                                                   "data_path": data_path}))
    results = {}
    for kind in ("ours", "reference"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--worker-dir", str(workdir),
               "--config", args.config, "--method", args.method, "--lora-rank", str(args.lora_rank),
               "--batch-pairs", str(args.batch_pairs), "--device", args.device, "--attention", args.attention,
               *(["--resolution", str(args.resolution)] if args.resolution else []),
               "--warmup", str(args.warmup), "--repeats", str(args.repeats)] + (["--sequential"] if args.sequential else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"memory worker {kind} failed:\n{proc.stderr[-4000:]}")
        results[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


# ----------------------------------------------------------------------------- one benchmark
def run_one(args):
    """One (config, method, rank) combination: the data are cached once, then each ``args.attentions``
    backend is timed and measured on it; yields one result per backend as it is measured."""
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with tempfile.TemporaryDirectory(prefix="diffpref_bench_") as tmp:
        workdir = Path(tmp)
        parts = build_components(args.config, workdir)
        # PPD: enough pairs per user that every number of shots can be drawn (the context never holds the pair itself)
        n_pairs = max(2 * args.batch_pairs, USERS * (PPD_PAIRS_PER_USER if args.method == "ppd" else 1))
        cache, data, encode_s, ppd, manifest = build_cache(args.config, parts, workdir, n_pairs, device, args.method,
                                                          resolution_of(args))
        base_unet = parts.pop("unet").cpu()
        _park(parts)
        for attention in args.attentions:
            one = argparse.Namespace(**{**vars(args), "attention": attention})
            unet = set_attention(copy.deepcopy(base_unet), attention)
            ours = make_variant("ours", one, parts, copy.deepcopy(unet), cache, data, device, ppd, manifest)
            reference = make_variant("reference", one, parts, unet, cache, data, device, ppd, manifest)
            perturb_and_share(ours, reference)
            check = objective_check(ours, reference)
            timings = {}
            if not args.sequential:
                for variant in (ours, reference):
                    variant.finalize(dtype)
                timings = time_interleaved([ours, reference], args.warmup, args.repeats, device)
            del ours, reference, unet
            _park(parts)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the memory workers need the card to themselves
            memory = measure_memory(one, workdir, cache, data, dtype, ppd, manifest)
            if args.sequential:
                timings = {kind: memory[kind]["step_times"] for kind in memory}
            yield _result(one, timings, memory, check, encode_s / n_pairs, n_pairs, dtype, device)


def _park(parts: dict) -> None:
    """The VAE and text encoder(s) back on the CPU: the reference loop moves them to the device when it is built."""
    for key in ("vae", "text_encoder", "text_encoder_2"):
        if parts.get(key) is not None:
            parts[key].cpu()


def _result(args, timings: dict, memory: dict, check: dict, encode_s_per_pair: float, n_pairs: int, dtype,
            device) -> dict:
    median = {k: statistics.median(v) for k, v in timings.items()}
    pairs_per_s = args.batch_pairs / median["ours"]
    ref_pairs_per_s = args.batch_pairs / median["reference"]
    peak, ref_peak = memory["ours"]["peak_mem_mb"], memory["reference"]["peak_mem_mb"]
    return {
        "config": args.config, "method": args.method, "lora_rank": args.lora_rank, "batch_pairs": args.batch_pairs,
        "attention": args.attention, "resolution": resolution_of(args),
        "device": device_label(device),
        "pairs_per_s": round(pairs_per_s, 3), "ref_pairs_per_s": round(ref_pairs_per_s, 3),
        "speedup": round(pairs_per_s / ref_pairs_per_s, 3),
        "peak_mem_mb": round(peak, 1), "ref_peak_mem_mb": round(ref_peak, 1), "memory_ratio": round(peak / ref_peak, 3),
        "step_s": [round(x, 4) for x in timings["ours"]], "ref_step_s": [round(x, 4) for x in timings["reference"]],
        "timing": "separate processes" if args.sequential else "interleaved ABBA, one process",
        # What is resident before the first step (weights, and the data): the rest of the peak is optimizer
        # state, gradients and activations, which both variants share for the trainable UNet.
        "setup_mem_mb": round(memory["ours"]["setup_mem_mb"], 1),
        "ref_setup_mem_mb": round(memory["reference"]["setup_mem_mb"], 1),
        "cache_encode_s_per_pair": round(encode_s_per_pair, 4), "mem_method": memory["ours"]["mem_method"],
        "dtype": str(dtype).removeprefix("torch."), "gradient_checkpointing": args.gradient_checkpointing, **check,
        **({"ppd_backbone": PPD_BACKBONE.get(args.config, "embedded world CLIP"), "ppd_pairs": n_pairs,
            "ppd_users": USERS} if args.method == "ppd" else {}),
    }


# ----------------------------------------------------------------------------- FLOPs / MFU
def peak_flops(device_name: str) -> float | None:
    for key, value in PEAK_BF16_FLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


def run_flops(args) -> dict:
    """Model FLOP utilisation of one UNet forward+backward (full fine-tuning, bf16 autocast on CUDA).

    FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one forward+backward (matmuls,
    convolutions and attention; elementwise ops are not counted, as is usual for MFU), then divided
    by the median measured time of the same computation and by the card's dense bf16 peak.
    """
    from torch.utils.flop_counter import FlopCounterMode

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    unet = set_attention(build_unet(args.config), args.attention).to(device).train().requires_grad_(True)
    cfg = unet.config
    n = 2 * args.batch_pairs  # winners and losers go through the UNet as one batch
    size = resolution_of(args) // (8 if args.config != "embedded" else 4)
    x = torch.randn(n, cfg.in_channels, size, size, device=device)
    t = torch.randint(0, 1000, (n,), device=device)
    tokens = 77 if args.config != "embedded" else 16
    embeds = torch.randn(n, tokens, cfg.cross_attention_dim, device=device)
    added = None
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        added = {"text_embeds": torch.randn(n, pooled, device=device),
                 "time_ids": torch.tensor([[resolution_of(args)] * 2 + [0, 0] + [resolution_of(args)] * 2],
                                          device=device, dtype=torch.float32).repeat(n, 1)}

    def fwd_bwd():
        with _autocast(device, dtype):
            out = unet(x, t, embeds, added_cond_kwargs=added).sample
        out.float().pow(2).mean().backward()
        unet.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:  # model FLOPs: counted without checkpointing's recompute
        fwd_bwd()
    flops = counter.get_total_flops()
    if args.gradient_checkpointing:  # timed with it: its recompute costs time, which MFU must show
        unet.enable_gradient_checkpointing()
    times = []
    for i in range(args.warmup + args.repeats):
        sync(device)
        started = time.perf_counter()
        fwd_bwd()
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - started)
    seconds = statistics.median(times)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (peak_flops(name) if device.type == "cuda" else None)
    achieved = flops / seconds
    return {"config": args.config, "batch_pairs": args.batch_pairs, "images_per_step": n, "attention": args.attention,
            "device_name": name, "dtype": str(dtype).removeprefix("torch."),
            "gradient_checkpointing": args.gradient_checkpointing,
            "flops_per_step": flops, "step_s": round(seconds, 5), "tflops": round(achieved / 1e12, 3),
            "peak_tflops": round(peak / 1e12, 1) if peak else None,
            "mfu": round(achieved / peak, 4) if peak else None}


# ----------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print JSON (the only output format)")
    parser.add_argument("--config", nargs="+", default=["embedded"], choices=CONFIGS,
                        help="model architecture(s): embedded (64 px, CPU ok), sd15 (512 px), sdxl (1024 px)")
    parser.add_argument("--method", nargs="+", default=["dpo"], choices=METHODS, help="objective(s)")
    parser.add_argument("--lora-rank", nargs="+", type=int, default=None,
                        help="LoRA rank(s) of dpo/inpo, default 8; 0 = full fine-tuning with a frozen reference copy. "
                             "ppd ignores it: the base stays frozen, the user encoder head and user projections train")
    parser.add_argument("--batch-pairs", type=int, default=8, help="preference pairs per step")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per variant (median taken; >= 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (>= 2)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--resolution", type=int, default=None,
                        help="image size in pixels (default: the config's own, 64 / 512 / 1024); smaller sizes "
                             "make a quick CPU check of the sd15/sdxl code paths")
    parser.add_argument("--allow-cpu", action="store_true", help="run sd15/sdxl on a CPU anyway (very slow)")
    parser.add_argument("--sequential", action="store_true",
                        help="time each variant in its own process (when both do not fit on the card together)")
    parser.add_argument("--flops", action="store_true", help="UNet forward+backward MFU instead of the comparison")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="the trained UNet recomputes activations in backward (both variants; --flops: timed "
                             "with it, FLOPs counted without the recompute)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the card's bf16 dense peak")
    parser.add_argument("--attention", nargs="+", default=["sdpa"], choices=("sdpa", "xformers"), dest="attentions",
                        help="attention backend(s) of the UNet in both variants: sdpa (default), xformers (CUDA + "
                             "xformers); several are measured one after another on one data cache")
    parser.add_argument("--worker", choices=("ours", "reference"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 5 or args.warmup < 2:
        parser.error(f"--repeats {args.repeats} / --warmup {args.warmup}: use at least 5 timed and 2 warm-up steps")
    if args.batch_pairs < 1:
        parser.error(f"--batch-pairs {args.batch_pairs} must be >= 1")
    if args.lora_rank is not None and any(r < 0 for r in args.lora_rank):
        parser.error(f"--lora-rank {args.lora_rank}: ranks must be >= 0 (0 = full fine-tuning)")
    return args


def ranks_for(args, method: str) -> list[int]:
    """--lora-rank, or its default 8, for dpo/inpo; always 0 for ppd (no LoRA: as configs/*_ppd.yaml)."""
    if method == "ppd":
        return [0]
    return args.lora_rank if args.lora_rank is not None else [8]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:  # a memory child: one (config, method, rank, attention) combination, JSON on the last line
        args.config, args.method, args.attention = args.config[0], args.method[0], args.attentions[0]
        args.lora_rank = ranks_for(args, args.method)[0]
        result = _memory_worker(args)
        print(json.dumps(result))
        return 0
    on_cpu = torch.device(args.device).type == "cpu"
    refused = [c for c in args.config if c in GPU_ONLY]
    if on_cpu and refused and not args.allow_cpu:
        print(f"error: --config {' '.join(refused)} builds the full-size architecture ({RESOLUTION[refused[0]]} px) "
              "and needs a CUDA GPU; on a CPU one step takes many minutes. Use --config embedded, or pass "
              "--allow-cpu to run it anyway.", file=sys.stderr)
        return 2
    results = []

    def report(result: dict) -> None:
        # --json: one line per combination as soon as it is measured, so a long GPU run that is cut off
        # keeps what it finished
        results.append(result)
        if args.json:
            print(json.dumps(result), flush=True)

    for config in args.config:
        for method in args.method:
            for rank in ranks_for(args, method):
                one = argparse.Namespace(**{**vars(args), "config": config, "method": method, "lora_rank": rank})
                if args.flops:
                    for attention in args.attentions:
                        report(run_flops(argparse.Namespace(**{**vars(one), "attention": attention})))
                else:
                    for result in run_one(one):
                        report(result)
                if args.flops:
                    break  # FLOPs do not depend on the method or the adapters
            if args.flops:
                break
    if not args.json:
        print(json.dumps(results[0] if len(results) == 1 else results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
