"""Configs of the embedded world model, and tiny random SD1.5 / SDXL-architecture pipelines for tests.

Everything here builds from configs; nothing is downloaded. The architecture classes are the ones
Stable Diffusion uses (AutoencoderKL, UNet2DConditionModel, CLIPTextModel), only much smaller, so
code that runs on these runs unchanged on real checkpoints.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from diffpref.models.tokenizer import load_world_tokenizer, write_world_tokenizer

# The embedded model: 64x64 RGB images -> 16x16x4 latents (VAE factor 4 keeps the colours and
# the shapes' corners that a factor-8 VAE on 64 px images loses).
WORLD_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=64,
)
WORLD_TEXT_CONFIG = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=16,
    projection_dim=64,
)
WORLD_UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    # Text is read at 8x8 and 4x4 only: colour, shape and background are global properties, and
    # attention over 16x16 latents would triple the cost of a training step on CPU.
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 128),
    layers_per_block=1,
    cross_attention_dim=64,
    attention_head_dim=8,
    norm_num_groups=16,
)
WORLD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)


def build_world_components(tokenizer_dir: str | Path, seed: int = 0) -> dict:
    """Randomly initialised components of the embedded model (before pretraining)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = load_world_tokenizer(write_world_tokenizer(tokenizer_dir))
    torch.manual_seed(seed)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **WORLD_TEXT_CONFIG,
    )
    return dict(
        vae=AutoencoderKL(**WORLD_VAE_CONFIG),
        text_encoder=CLIPTextModel(text_config),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(**WORLD_UNET_CONFIG),
        scheduler=DDIMScheduler(**WORLD_SCHEDULER_CONFIG),
    )


def _tiny_tokenizer(max_length: int = 16):
    directory = Path(tempfile.mkdtemp(prefix="diffpref_tok_"))
    return load_world_tokenizer(write_world_tokenizer(directory, model_max_length=max_length))


def _tiny_text_encoder(tokenizer, hidden: int, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length, projection_dim=hidden,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=32,
    )


def tiny_sd15_pipeline(seed: int = 0):
    """A random StableDiffusionPipeline with SD1.5's architecture classes, small enough for unit tests."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer = _tiny_tokenizer()
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8,
    )
    return StableDiffusionPipeline(
        vae=_tiny_vae(), text_encoder=_tiny_text_encoder(tokenizer, 16), tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(**WORLD_SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(seed: int = 0):
    """A random StableDiffusionXLPipeline (two text encoders, added time/text embeddings) for unit tests."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    tokenizer = _tiny_tokenizer()
    text_encoder = _tiny_text_encoder(tokenizer, 16)
    text_encoder_2 = _tiny_text_encoder(tokenizer, 16, projection=True)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), transformer_layers_per_block=(1, 1), norm_num_groups=8,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8,
    )
    return StableDiffusionXLPipeline(
        vae=_tiny_vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=DDIMScheduler(**WORLD_SCHEDULER_CONFIG), force_zeros_for_empty_prompt=False,
    )
