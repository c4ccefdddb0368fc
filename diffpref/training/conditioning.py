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

    Time ids are (orig_h, orig_w, crop_top, crop_left, target_h, target_w) with the original
    size equal to the target size and no crop: the cache stores images already resized and
    centre-cropped to ``resolution``, so from the model's point of view they were made at that
    size (this is also what inference passes by default). A pooled embedding of one row (e.g.
    the empty prompt's) is broadcast to the batch.
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
    ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=pooled.dtype,
                       device=pooled.device)
    return {"text_embeds": pooled, "time_ids": ids.expand(batch_size, SDXL_TIME_IDS)}


# ----------------------------------------------------------------------------- images
def resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Scale the shorter side to ``resolution``, then cut the centre square (the SD training recipe)."""
    image = image.convert("RGB")
    width, height = image.size
    if (width, height) == (resolution, resolution):
        return image
    scale = resolution / min(width, height)
    # max(..., resolution) guards against rounding a side just below the crop size.
    size = (max(round(width * scale), resolution), max(round(height * scale), resolution))
    image = image.resize(size, RESAMPLE)
    left = (size[0] - resolution) // 2
    top = (size[1] - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


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
