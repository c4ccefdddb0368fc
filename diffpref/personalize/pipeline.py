"""``PersonalizedPipeline``: a StableDiffusionPipeline with one extra input, the user.

    pipe = PersonalizedPipeline.from_base(load_pipeline("embedded"), adapter="embedded-ppd")
    image = pipe("a star", user_examples=[UserExample(prompt, preferred, rejected), ...], user_scale=1.0).images[0]

A user is given by a handful of their choices (``user_examples``) or by a saved embedding
(``user_embedding``, [K, d]). No user, or ``user_scale=0``, gives exactly the base model's image.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor2_0
from safetensors.torch import load_file, save_file

from diffpref.personalize.adapter import ATTENTION_NAME, CONFIG_NAME, load_backbone, load_ppd_adapter
from diffpref.personalize.attention import (
    concat_user_tokens,
    fixed_user_tokens,
    guard_xformers_switch,
    install_user_attention,
    load_user_attention_state_dict,
    set_user_scale,
    user_attention_state_dict,
)
from diffpref.personalize.backbones import UserExample
from diffpref.personalize.encoder import UserEncoder, embed_user


class PersonalizedPipeline(StableDiffusionPipeline):
    _optional_components = [*StableDiffusionPipeline._optional_components, "user_encoder"]

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, user_encoder: UserEncoder | None = None,
                 safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker: bool = False):
        super().__init__(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                         safety_checker=safety_checker, feature_extractor=feature_extractor, image_encoder=image_encoder,
                         requires_safety_checker=requires_safety_checker)
        self.register_modules(user_encoder=user_encoder)
        self.ppd_config: dict = {}
        self._backbone = None
        self._user_cache: dict = {}

    # ------------------------------------------------------------------ building
    @classmethod
    def from_base(cls, base: StableDiffusionPipeline, adapter: str | os.PathLike = "embedded-ppd",
                  backbone=None) -> PersonalizedPipeline:
        """Wrap a loaded base pipeline (its modules are shared, not copied) with a PPD adapter."""
        encoder, config = load_ppd_adapter(base.unet, adapter)
        pipe = cls(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
                   scheduler=base.scheduler, user_encoder=encoder)
        pipe.ppd_config, pipe._backbone = config, backbone
        pipe.register_to_config(_name_or_path=getattr(base, "name_or_path", ""))  # keeps model-specific defaults
        guard_xformers_switch(pipe)
        return pipe

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs):
        # The UNet is saved as the stock model it is; its user projections go in their own file.
        processors, user_state = self.unet.attn_processors, user_attention_state_dict(self.unet)
        self.unet.set_attn_processor(AttnProcessor2_0())
        try:
            super().save_pretrained(save_directory, **kwargs)
        finally:
            self.unet.set_attn_processor(processors)
        save_file({k: v.detach().float().contiguous().cpu() for k, v in user_state.items()},
                  str(Path(save_directory) / ATTENTION_NAME))
        (Path(save_directory) / CONFIG_NAME).write_text(json.dumps(self.ppd_config, indent=2))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> PersonalizedPipeline:
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        folder = Path(pretrained_model_name_or_path)
        pipe.ppd_config = json.loads((folder / CONFIG_NAME).read_text())
        install_user_attention(pipe.unet, pipe.ppd_config["num_tokens"], blocks=pipe.ppd_config["blocks"])
        state = load_file(str(folder / ATTENTION_NAME))
        load_user_attention_state_dict(pipe.unet, {k: v.to(pipe.unet.device, pipe.unet.dtype) for k, v in state.items()})
        guard_xformers_switch(pipe)
        return pipe

    # ------------------------------------------------------------------ users
    @property
    def backbone(self):
        if self._backbone is None:
            self._backbone = load_backbone(self.ppd_config, device=self.device)
        return self._backbone

    @property
    def num_user_tokens(self) -> int:
        return int(self.ppd_config["num_tokens"])

    @torch.no_grad()
    def embed_user(self, examples: Sequence[UserExample]) -> torch.Tensor:
        """User tokens [K, d] from k >= 1 examples (cached per set of examples, order-independent)."""
        return embed_user(self.user_encoder, self.backbone, list(examples), cache=self._user_cache)

    def check_user_inputs(self, user_examples, user_embedding, user_scale):
        if user_examples is not None and user_embedding is not None:
            raise ValueError("give user_examples or user_embedding, not both")
        if user_examples is not None and len(user_examples) == 0:
            raise ValueError("user_examples is empty: give at least one (prompt, preferred, rejected) example")
        if not isinstance(user_scale, (int, float)) or user_scale < 0:
            raise ValueError(f"user_scale must be a number >= 0, got {user_scale!r}")
        if user_embedding is not None and tuple(user_embedding.shape[-2:]) != (self.num_user_tokens, self.unet.config.cross_attention_dim):
            raise ValueError(f"user_embedding has shape {tuple(user_embedding.shape)}; this pipeline expects "
                             f"[..., {self.num_user_tokens}, {self.unet.config.cross_attention_dim}]")

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, *, user_examples: Sequence[UserExample] | None = None,
                 user_embedding: torch.Tensor | None = None, user_scale: float = 1.0, negative_prompt=None,
                 guidance_scale: float = 7.5, **kwargs):
        # 1. Check inputs and resolve the user
        self.check_user_inputs(user_examples, user_embedding, user_scale)
        if user_examples is not None:
            user_embedding = self.embed_user(user_examples)
        has_user = user_embedding is not None and user_scale > 0
        # 2. Encode the prompt as the stock pipeline does, then append the user tokens
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        do_cfg = guidance_scale > 1.0
        prompt_embeds, negative_embeds = self.encode_prompt(prompts, self.device, 1, do_cfg, negative_prompt)
        tokens = user_embedding.to(self.device, prompt_embeds.dtype) if has_user else None
        if tokens is not None and tokens.dim() == 2:
            tokens = tokens.unsqueeze(0)
        prompt_embeds = concat_user_tokens(prompt_embeds, tokens, self.num_user_tokens)
        if negative_embeds is not None:
            # The unconditional branch sees no user, so guidance also pushes towards the user's taste.
            negative_embeds = concat_user_tokens(negative_embeds, None, self.num_user_tokens)
        # 3. Denoise with the user branch scaled (0 skips it: bit-identical to the base model). The user
        #    tokens are the same at every step: each layer projects them once, for the user rows only.
        set_user_scale(self.unet, float(user_scale) if has_user else 0.0)
        with fixed_user_tokens(self.unet):
            return super().__call__(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds,
                                    guidance_scale=guidance_scale, **kwargs)
