"""Recipe that builds the embedded world model from nothing: VAE, then text encoder + UNet, then a tiny CLIP.

Phases, each resumable from its last checkpoint in ``work_dir``:

1. ``vae``   AutoencoderKL trained on renders (MSE + L1 + a small KL term).
2. ``cache`` every training render encoded once; the UNet phase never runs the VAE encoder.
3. ``unet``  CLIPTextModel + UNet2DConditionModel trained jointly on the cached latents with
             epsilon prediction, min-SNR weighting, whole-caption dropout (so classifier-free
             guidance has a trained unconditional branch) and an EMA of the weights.
4. ``clip``  a tiny open_clip model (image and text towers) trained contrastively on renders.
5. ``export`` a stock StableDiffusionPipeline folder and the open_clip weights, under ``out_dir``.

Run with ``python train/pretrain_world.py --config configs/pretrain_world.yaml``.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffpref.models.world_clip import (
    WORLD_CLIP_MODEL_CFG,
    build_world_clip,
    describe,
    images_to_clip_input,
    save_world_clip,
)
from diffpref.world.captions import caption_for
from diffpref.world.render import render_batch, sample_attributes

PHASES = ("vae", "cache", "unet", "clip", "export")


@dataclass
class PretrainConfig:
    work_dir: str = field(default="runs/pretrain_world", metadata={"help": "checkpoints and caches (resumable)"})
    out_dir: str = field(default="diffpref/assets", metadata={"help": "where the finished models are exported"})
    seed: int = field(default=0, metadata={"help": "seed for renders, captions and initialisation"})
    threads: int = field(default=2, metadata={"help": "torch CPU threads"})
    num_images: int = field(default=30000, metadata={"help": "training renders"})
    vae_steps: int = field(default=1500, metadata={"help": "VAE optimizer steps"})
    vae_batch_size: int = field(default=16, metadata={"help": "VAE batch size"})
    vae_lr: float = field(default=1e-3, metadata={"help": "VAE peak learning rate"})
    vae_kl_weight: float = field(default=1e-6, metadata={"help": "weight of the KL term"})
    unet_steps: int = field(default=6000, metadata={"help": "UNet + text encoder optimizer steps"})
    unet_batch_size: int = field(default=128, metadata={"help": "UNet batch size"})
    unet_lr: float = field(default=5e-4, metadata={"help": "UNet peak learning rate"})
    caption_dropout: float = field(default=0.1, metadata={"help": "probability that a whole caption is replaced by ''"})
    p_name: float = field(default=0.6, metadata={"help": "probability that a caption names each categorical attribute"})
    min_snr_gamma: float = field(default=5.0, metadata={"help": "min-SNR loss weighting (0 disables)"})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA decay of UNet and text encoder weights"})
    clip_steps: int = field(default=2000, metadata={"help": "tiny CLIP optimizer steps"})
    clip_batch_size: int = field(default=128, metadata={"help": "tiny CLIP batch size"})
    clip_lr: float = field(default=1e-3, metadata={"help": "tiny CLIP learning rate"})
    checkpoint_every: int = field(default=250, metadata={"help": "steps between checkpoints"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warm-up steps for every phase"})


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], as diffusers VAEs expect."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


class WorldRenders:
    """The fixed training set: attributes and their renders, made once and kept on disk."""

    def __init__(self, path: Path, num_images: int, seed: int):
        if path.exists():
            data = np.load(path, allow_pickle=False)
            self.images, self.attrs = data["images"], json.loads(str(data["attrs"]))
        else:
            rng = np.random.default_rng(seed)
            attrs = [sample_attributes(rng) for _ in range(num_images)]
            self.images = render_batch(attrs)
            self.attrs = [a.to_dict() for a in attrs]
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, images=self.images, attrs=json.dumps(self.attrs))

    def __len__(self) -> int:
        return len(self.attrs)

    def captions(self, indices, rng: np.random.Generator, p_name: float, dropout: float) -> list[str]:
        """Fresh captions each call: a random subset of the attributes is named, or none at all."""
        out = []
        for i in indices:
            a = self.attrs[int(i)]
            if rng.random() < dropout:
                out.append("")
                continue
            out.append(caption_for(
                shape=a["shape"] if rng.random() < p_name else None,
                color=a["color"] if rng.random() < p_name else None,
                background=a["background"] if rng.random() < p_name else None,
            ))
        return out


class Checkpointer:
    """Atomic save/load of a phase's state: write to a temp file, then rename."""

    def __init__(self, directory: Path, phase: str):
        self.path = directory / f"{phase}_state.pt"
        self.done = directory / f"{phase}.done"

    def load(self) -> dict | None:
        if not self.path.exists():
            return None
        return torch.load(self.path, map_location="cpu", weights_only=True)

    def save(self, state: dict) -> None:
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.path)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def train_vae(cfg: PretrainConfig, data: WorldRenders, components: dict, work: Path) -> None:
    vae = components["vae"]
    ckpt = Checkpointer(work, "vae")
    if ckpt.done.exists():
        vae.load_state_dict(ckpt.load()["model"])
        return
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    step, rng = 0, np.random.default_rng(cfg.seed + 1)
    state = ckpt.load()
    if state:
        vae.load_state_dict(state["model"]); opt.load_state_dict(state["opt"])
        step, rng.bit_generator.state = state["step"], state["rng"]
    vae.train()
    bar = tqdm(total=cfg.vae_steps, initial=step, desc="vae", dynamic_ncols=True)
    while step < cfg.vae_steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.vae_steps, cfg.vae_lr, cfg.warmup_steps)
        x = to_tensor(data.images[rng.integers(len(data), size=cfg.vae_batch_size)])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse = F.mse_loss(recon, x)
        loss = mse + F.l1_loss(recon, x) + cfg.vae_kl_weight * posterior.kl().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step(); opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1); bar.set_postfix(mse=f"{mse.item():.4f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.vae_steps:
            ckpt.save({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step, "rng": rng.bit_generator.state})
    bar.close()
    ckpt.done.touch()


@torch.no_grad()
def cache_latents(cfg: PretrainConfig, data: WorldRenders, components: dict, work: Path) -> dict:
    """Posterior mean and std of every render, and the scaling factor that gives unit-variance latents."""
    path = work / "latents.pt"
    if path.exists():
        cache = torch.load(path, map_location="cpu", weights_only=True)
    else:
        vae = components["vae"].eval()
        means, stds = [], []
        for start in tqdm(range(0, len(data), 256), desc="cache latents", dynamic_ncols=True):
            posterior = vae.encode(to_tensor(data.images[start:start + 256])).latent_dist
            means.append(posterior.mean); stds.append(posterior.std)
        mean, std = torch.cat(means), torch.cat(stds)
        scaling = 1.0 / float(mean.flatten().std())
        cache = {"mean": mean, "std": std, "scaling_factor": torch.tensor(scaling)}
        tmp = path.with_suffix(".tmp")
        torch.save(cache, tmp); tmp.replace(path)
    components["vae"].register_to_config(scaling_factor=float(cache["scaling_factor"]))
    return cache


def train_unet(cfg: PretrainConfig, data: WorldRenders, components: dict, cache: dict, work: Path) -> None:
    unet, text_encoder, tokenizer, scheduler = (components[k] for k in ("unet", "text_encoder", "tokenizer", "scheduler"))
    ckpt = Checkpointer(work, "unet")
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = {"unet": copy.deepcopy(unet).eval().requires_grad_(False),
           "text_encoder": copy.deepcopy(text_encoder).eval().requires_grad_(False)}
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    step, rng = 0, np.random.default_rng(cfg.seed + 2)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    state = ckpt.load()
    if state:
        unet.load_state_dict(state["unet"]); text_encoder.load_state_dict(state["text_encoder"])
        ema["unet"].load_state_dict(state["ema_unet"]); ema["text_encoder"].load_state_dict(state["ema_text_encoder"])
        if ckpt.done.exists():
            components["unet"], components["text_encoder"] = ema["unet"], ema["text_encoder"]
            return
        opt.load_state_dict(state["opt"])
        step, rng.bit_generator.state = state["step"], state["rng"]
        gen.set_state(state["gen"])
    alphas_cumprod = scheduler.alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    scaling = float(cache["scaling_factor"])
    unet.train(); text_encoder.train()
    bar = tqdm(total=cfg.unet_steps, initial=step, desc="unet", dynamic_ncols=True)
    while step < cfg.unet_steps:
        lr = lr_at(step, cfg.unet_steps, cfg.unet_lr, cfg.warmup_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.from_numpy(rng.integers(len(data), size=cfg.unet_batch_size))
        z0 = (cache["mean"][idx] + cache["std"][idx] * torch.randn(cache["mean"][idx].shape, generator=gen)) * scaling
        captions = data.captions(idx.tolist(), rng, cfg.p_name, cfg.caption_dropout)
        hidden = text_encoder(tokenize(tokenizer, captions))[0]
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (z0.shape[0],), generator=gen)
        zt = scheduler.add_noise(z0, noise, t)
        pred = unet(zt, t, hidden).sample
        per_sample = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        if cfg.min_snr_gamma > 0:
            # Min-SNR-gamma (Hang et al. 2023): low-noise steps stop dominating the gradient.
            per_sample = per_sample * torch.clamp(snr[t], max=cfg.min_snr_gamma) / snr[t]
        loss = per_sample.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(); opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            for name, model in (("unet", unet), ("text_encoder", text_encoder)):
                for p_ema, p in zip(ema[name].parameters(), model.parameters()):
                    p_ema.lerp_(p, 1 - decay)
        step += 1
        bar.update(1); bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.1e}")
        if step % cfg.checkpoint_every == 0 or step == cfg.unet_steps:
            ckpt.save({"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                       "ema_unet": ema["unet"].state_dict(), "ema_text_encoder": ema["text_encoder"].state_dict(),
                       "opt": opt.state_dict(), "step": step, "rng": rng.bit_generator.state, "gen": gen.get_state()})
    bar.close()
    ckpt.done.touch()
    components["unet"], components["text_encoder"] = ema["unet"], ema["text_encoder"]


def train_world_clip(cfg, data, work: Path, out: Path) -> Path:
    """Contrastive (InfoNCE, Radford et al. 2021) training of the tiny CLIP on world renders; resumable."""
    import open_clip

    ckpt = Checkpointer(work, "clip")
    torch.manual_seed(cfg.seed + 3)
    model = build_world_clip()
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=WORLD_CLIP_MODEL_CFG["text_cfg"]["context_length"])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.clip_lr, weight_decay=0.1)
    step, rng = 0, np.random.default_rng(cfg.seed + 3)
    state = ckpt.load()
    if state:
        model.load_state_dict(state["model"])
        if ckpt.done.exists():
            return save_world_clip(model, out / "world-clip")
        opt.load_state_dict(state["opt"]); step = state["step"]; rng.bit_generator.state = state["rng"]
    model.train()
    bar = tqdm(total=cfg.clip_steps, initial=step, desc="clip", dynamic_ncols=True)
    while step < cfg.clip_steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.clip_steps, cfg.clip_lr, cfg.warmup_steps)
        idx = rng.choice(len(data), size=cfg.clip_batch_size, replace=False)
        images = images_to_clip_input(data.images[idx])
        texts = tokenizer([describe(data.attrs[int(i)], rng) for i in idx])
        image_features, text_features, logit_scale = model(images, texts)
        logits = logit_scale * image_features @ text_features.T
        # Captions repeat inside a batch ("a red star"): identical texts are all positives for an image.
        same = (texts.unsqueeze(0) == texts.unsqueeze(1)).all(-1).float()
        targets = same / same.sum(1, keepdim=True)
        loss = 0.5 * (torch.sum(-targets * F.log_softmax(logits, 1), 1).mean()
                      + torch.sum(-targets * F.log_softmax(logits.T, 1), 1).mean())
        loss.backward()
        opt.step(); opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        bar.update(1); bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.clip_steps:
            ckpt.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "rng": rng.bit_generator.state})
    bar.close()
    ckpt.done.touch()
    return save_world_clip(model.eval(), out / "world-clip")


def export_pipeline(components: dict, out: Path) -> Path:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=components["vae"].eval(), text_encoder=components["text_encoder"].eval(), tokenizer=components["tokenizer"],
        unet=components["unet"].eval(), scheduler=components["scheduler"], safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    target = out / "world-sd"
    pipe.save_pretrained(target, safe_serialization=True)
    return target


def run(cfg: PretrainConfig, phases: tuple[str, ...] = PHASES) -> None:
    from diffpref.models.builders import build_world_components

    unknown = set(phases) - set(PHASES)
    if unknown:
        raise ValueError(f"unknown phases {sorted(unknown)}; valid phases are {PHASES}")
    torch.set_num_threads(cfg.threads)
    work, out = Path(cfg.work_dir), Path(cfg.out_dir)
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    started = time.time()
    data = WorldRenders(work / "renders.npz", cfg.num_images, cfg.seed)
    components = build_world_components(work / "tokenizer", seed=cfg.seed)
    if {"vae", "cache", "unet", "export"} & set(phases):
        train_vae(cfg, data, components, work)
        cache = cache_latents(cfg, data, components, work)
    if {"unet", "export"} & set(phases):
        train_unet(cfg, data, components, cache, work)
    if "clip" in phases:
        train_world_clip(cfg, data, work, out)
    if "export" in phases:
        target = export_pipeline(components, out)
        print(f"exported {target}")
    print(f"pretrain phases {phases} took {time.time() - started:.0f} s")
