"""What the UNet is conditioned on during training: prompt embeddings, SDXL's added inputs, image latents.

Everything here is computed once, before training, and written to the cache
(``diffpref.training.cache``): the trainer never runs the VAE or a text encoder. Each
function reproduces what diffusers' inference pipelines do, so a model trained on the
cache sees at training time exactly the inputs it will see at inference time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image

# Resampling for resizing images to the training resolution: bicubic is what the diffusers
# training scripts use (torchvision's Resize default for PIL images is bilinear, which blurs more).
RESAMPLE = Image.BICUBIC
# The number of SDXL time ids: (orig_h, orig_w, crop_top, crop_left, target_h, target_w).
SDXL_TIME_IDS = 6


def _device(pipe) -> torch.device:
    """Where the pipeline runs its text encoders (honours model CPU offload, like diffusers does)."""
    device = getattr(pipe, "_execution_device", None)
    return device if device is not None else pipe.device


def is_sdxl(pipe) -> bool:
    """Whether ``pipe`` is SDXL-style (a second text encoder that also gives a pooled embedding)."""
    return getattr(pipe, "text_encoder_2", None) is not None


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Prompt conditioning exactly as the pipeline computes it at inference (without guidance).

    SD1.5-style: ``{"prompt_embeds": [N, L, D]}`` (the text encoder's last hidden state).
    SDXL: ``{"prompt_embeds": [N, L, D1 + D2], "pooled_prompt_embeds": [N, D2]}`` (penultimate
    hidden states of both encoders concatenated, plus the second encoder's pooled projection).
    Tensors are on the pipeline's device in its dtype.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not a single string")
    if not prompts:
        raise ValueError("prompts is empty")
    prompts = list(prompts)
    device = _device(pipe)
    # Keyword arguments serve both signatures: SD's (prompt, device, num_images_per_prompt,
    # do_classifier_free_guidance) and SDXL's, where prompt_2 defaults to prompt.
    out = pipe.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                             do_classifier_free_guidance=False)
    if len(out) == 2:  # SD: (prompt_embeds, negative_prompt_embeds)
        return {"prompt_embeds": out[0]}
    if len(out) == 4:  # SDXL: (embeds, negative embeds, pooled, negative pooled)
        return {"prompt_embeds": out[0], "pooled_prompt_embeds": out[2]}
    raise TypeError(f"{type(pipe).__name__}.encode_prompt returned {len(out)} values; expected 2 (SD) or 4 (SDXL)")


def added_cond_kwargs(unet, cond: dict[str, torch.Tensor], resolution: int,
                      batch_size: int) -> dict[str, torch.Tensor] | None:
    """The UNet's ``added_cond_kwargs``: None for SD1.5-style UNets, SDXL's text and time ids otherwise.

    Time ids are (orig_h, orig_w, crop_top, crop_left, target_h, target_w), SDXL's
    micro-conditioning. ``cond["time_ids"]`` [batch, 6] gives them per sample (the cache stores
    every image's original size and crop: ``pair_cond`` / ``preferred_cond`` / ``image_cond`` put
    them in ``cond``); without it every sample gets (res, res, 0, 0, res, res), what inference
    passes by default. A pooled embedding of one row (e.g. the empty prompt's) is broadcast to
    the batch.
    """
    if getattr(unet.config, "addition_embed_type", None) != "text_time":
        return None
    if "pooled_prompt_embeds" not in cond:
        raise KeyError("this UNet is SDXL-style (addition_embed_type='text_time') but cond has no "
                       "'pooled_prompt_embeds'; encode prompts with an SDXL pipeline")
    pooled = cond["pooled_prompt_embeds"]
    if pooled.shape[0] == 1 and batch_size != 1:
        pooled = pooled.expand(batch_size, -1)
    if pooled.shape[0] != batch_size:
        raise ValueError(f"pooled_prompt_embeds has {pooled.shape[0]} rows for a batch of {batch_size}")
    # A refiner-style UNet (aesthetic score instead of the target size) expects 5 ids, not 6.
    expected = unet.config.projection_class_embeddings_input_dim - pooled.shape[-1]
    if expected != SDXL_TIME_IDS * unet.config.addition_time_embed_dim:
        raise ValueError(f"the UNet expects {expected // unet.config.addition_time_embed_dim} time ids, "
                         f"not SDXL base's {SDXL_TIME_IDS}; refiner-style UNets are not supported")
    ids = cond.get("time_ids")
    if ids is None:
        ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=pooled.dtype,
                           device=pooled.device).expand(batch_size, SDXL_TIME_IDS)
    elif tuple(ids.shape) != (batch_size, SDXL_TIME_IDS):
        raise ValueError(f"time_ids has shape {tuple(ids.shape)}; expected ({batch_size}, {SDXL_TIME_IDS})")
    return {"text_embeds": pooled, "time_ids": ids.to(pooled.device, pooled.dtype)}


def time_ids(original_size: torch.Tensor, crop_top_left: torch.Tensor, resolution: int) -> torch.Tensor:
    """SDXL time ids [..., 6] from original sizes (h, w) [..., 2] and crops (top, left) [..., 2]."""
    target = torch.full_like(original_size, resolution)
    return torch.cat([original_size, crop_top_left, target], dim=-1).float()


# The cache gives SDXL items per-image time ids: pairs "time_ids_0" / "time_ids_1", ratings "time_ids".
def pair_cond(batch: dict) -> dict:
    """The conditioning of both images of every pair as one batch [2B]: latents_0's rows, then latents_1's."""
    cond = {k: torch.cat([v, v]) for k, v in batch["cond"].items()}
    if "time_ids_0" in batch:
        cond["time_ids"] = torch.cat([batch["time_ids_0"], batch["time_ids_1"]])
    return cond


def preferred_cond(batch: dict) -> dict:
    """The conditioning of the preferred image of every pair (label >= 0.5 means image 0 won)."""
    cond = dict(batch["cond"])
    if "time_ids_0" in batch:
        first = (batch["label"] >= 0.5).view(-1, 1)
        cond["time_ids"] = torch.where(first, batch["time_ids_0"], batch["time_ids_1"])
    return cond


def image_cond(batch: dict) -> dict:
    """The conditioning of single-image (rating) batches."""
    return {**batch["cond"], "time_ids": batch["time_ids"]} if "time_ids" in batch else batch["cond"]


# ----------------------------------------------------------------------------- images
def center_crop_box(width: int, height: int, resolution: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((resized width, height), (crop top, crop left)): the shorter side scaled to ``resolution``,
    then the centre square, the SD training recipe; the crop is in the resized image's pixels."""
    if (width, height) == (resolution, resolution):
        return (width, height), (0, 0)
    scale = resolution / min(width, height)
    # max(..., resolution) guards against rounding a side just below the crop size.
    size = (max(round(width * scale), resolution), max(round(height * scale), resolution))
    return size, ((size[1] - resolution) // 2, (size[0] - resolution) // 2)


def resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Scale the shorter side to ``resolution``, then cut the centre square (the SD training recipe)."""
    image = image.convert("RGB")
    size, (top, left) = center_crop_box(*image.size, resolution)
    if size != image.size:
        image = image.resize(size, RESAMPLE)
    return image.crop((left, top, left + resolution, top + resolution))


def prepare_image(image: Image.Image, resolution: int) -> tuple[np.ndarray, tuple[int, int], tuple[int, int], int]:
    """(uint8 [r, r, 3] pixels, original size (h, w), crop (top, left), resized width) of one image:
    what the VAE encodes and what SDXL's time ids say about it."""
    size, crop = center_crop_box(*image.size, resolution)
    return np.asarray(resize_center_crop(image, resolution)), (image.size[1], image.size[0]), crop, size[0]


def flipped_crop(crop_top_left: tuple[int, int], resized_width: int, resolution: int) -> tuple[int, int]:
    """The crop of the mirrored image: mirroring the resized image and cutting at the mirrored left
    edge gives exactly the mirror of the cut, so only crop_left changes (to width - r - left)."""
    return crop_top_left[0], resized_width - resolution - crop_top_left[1]


def images_to_tensor(images: np.ndarray | Sequence[Image.Image], resolution: int) -> torch.Tensor:
    """[N, 3, r, r] float in [-1, 1] from a uint8 [N, H, W, 3] array (or one [H, W, 3]) or PIL images."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise TypeError(f"image arrays must be uint8, got {images.dtype}")
        images = images[None] if images.ndim == 3 else images
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected a uint8 array of shape [N, H, W, 3], got {images.shape}")
        images = [Image.fromarray(image) for image in images]
    if len(images) == 0:
        raise ValueError("no images to encode")
    arrays = np.stack([np.asarray(resize_center_crop(image, resolution)) for image in images])
    pixels = torch.from_numpy(arrays).permute(0, 3, 1, 2).float()
    return pixels / 127.5 - 1.0


@contextmanager
def _vae_precision(vae) -> Iterator[None]:
    """Run an fp16 VAE that asks for it (SDXL's ``force_upcast``) in fp32, as the pipelines do: it overflows in fp16."""
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(torch.float32)
    try:
        yield
    finally:
        if upcast:
            vae.to(torch.float16)


@torch.no_grad()
def encode_images(vae, images: np.ndarray | Sequence[Image.Image], resolution: int) -> torch.Tensor:
    """Latents the UNet is trained on: ``(posterior mean - shift) * scaling_factor`` of resized images.

    The posterior *mean* rather than a sample: the cache is computed once and reused for every
    epoch, so a sample would freeze one draw of noise into the data for good, and the mean is
    what makes the cache deterministic (the same inputs give the same cache). The VAE's
    posterior variance is tiny next to the diffusion noise, so nothing of value is lost.
    ``shift_factor`` (SD3/Flux-style VAEs) and ``latents_mean``/``latents_std`` (Playground-style)
    are applied when the VAE config has them, so decoding inverts this exactly as inference does.
    Returns float32 latents on the VAE's device.
    """
    pixels = images_to_tensor(images, resolution)
    config = vae.config
    with _vae_precision(vae):
        parameter = next(vae.parameters())
        latents = vae.encode(pixels.to(parameter.device, parameter.dtype)).latent_dist.mean.float()
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, -1, 1, 1)
        mean = torch.tensor(mean, device=latents.device).view(shape)
        std = torch.tensor(std, device=latents.device).view(shape)
        latents = (latents - mean) * config.scaling_factor / std
    else:
        shift = getattr(config, "shift_factor", None)
        latents = (latents - (shift or 0.0)) * config.scaling_factor
    if not torch.isfinite(latents).all():
        raise FloatingPointError("the VAE produced non-finite latents; run it in float32 (or bf16)")
    return latents
