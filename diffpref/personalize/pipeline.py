"""``PersonalizedPipeline``: a Stable Diffusion pipeline (SD1.5 or SDXL) with one extra input, the user.

    pipe = PersonalizedPipeline.from_base(load_pipeline("embedded"), adapter="embedded-ppd")
    image = pipe("a star", user_examples=[UserExample(prompt, preferred, rejected), ...], user_scale=1.0).images[0]

A user is given by a handful of their choices (``user_examples``) or by a saved embedding
(``user_embedding``, [K, d]). No user, or ``user_scale=0``, gives exactly the base model's image.

Personalized best-of-N: ``pipe(prompt, seed=s, best_of=N, reward=person_reward)`` generates N
candidates of each prompt (seeds s, s+1, ..., s+N-1; personalized by the adapter when a user is
given, else the base), scores them with the person's reward (``diffpref.personalize.reward``) and
returns the best; ``output.candidates`` records every candidate's seed and score, so any shown
image can be regenerated. Given ``user_examples`` and no ``reward``, the reward is read from the same
choices by ``pipe.reward_model`` (the embedded world's by default). ``best_of=1`` is plain
generation with seed s, bit for bit.

``PersonalizedPipeline.from_base`` (and ``from_pretrained``) return a ``PersonalizedSDXLPipeline``
for an SDXL base: the user tokens are appended to the concatenated states of both text encoders;
the pooled embedding and the added time ids are the stock pipeline's, untouched.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from safetensors.torch import load_file, save_file

from diffpref.generate import best_of_records, candidate_seeds
from diffpref.personalize.adapter import (
    ATTENTION_NAME,
    CONFIG_NAME,
    load_backbone,
    load_ppd_adapter,
)
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

# keyword arguments that are per prompt when given as lists: repeated for each prompt's candidates
_PER_PROMPT_KWARGS = ("negative_prompt", "prompt_2", "negative_prompt_2")


@dataclass
class BestOfOutput(StableDiffusionPipelineOutput):
    """The shown images plus, per prompt, ``{"prompt", "seeds", "scores", "chosen", "seed", "score"}``:
    every candidate's seed and reward, the index of the one shown (the argmax) and its seed."""

    candidates: list | None = None


class _Unscored:
    """The reward of a best-of-1 call without one: every candidate scores 0 (there is nothing to choose)."""

    def score(self, images, prompts=None):
        return np.zeros(len(images))


class _UserInputs:
    """What the SD1.5 and SDXL personalized pipelines share: the adapter, the user, saving and loading."""

    ppd_config: dict
    _backbone = None

    def _init_user(self, user_encoder) -> None:
        self.register_modules(user_encoder=user_encoder)
        self.ppd_config = {}
        self._backbone = None
        self._user_cache = {}
        self._reward_model = None

    @property
    def reward_model(self):
        """The few-shot reward model that reads a person from ``user_examples`` (default: the embedded world's)."""
        if self._reward_model is None:
            from diffpref.personalize.reward import PrototypeRewardModel

            self._reward_model = PrototypeRewardModel.from_pretrained("embedded-reward")
        return self._reward_model

    @reward_model.setter
    def reward_model(self, model) -> None:
        self._reward_model = model

    # ------------------------------------------------------------------ best-of-N
    def _best_of(self, prompt, *, best_of, reward, seed, user_examples, user_embedding, **kwargs) -> BestOfOutput:
        """N candidates per prompt, ranked by ``reward.score(images, prompts)``; the argmax is shown."""
        if isinstance(best_of, bool) or not isinstance(best_of, int) or best_of < 1:
            raise ValueError(f"best_of must be an integer >= 1, got {best_of!r}")
        if "generator" in kwargs or "latents" in kwargs:
            raise ValueError("best-of-N draws its candidates from seed=: give seed (an int or one per prompt), "
                             "not generator= or latents=")
        if kwargs.get("num_images_per_prompt", 1) != 1:
            raise ValueError("best-of-N shows one image per prompt: num_images_per_prompt must be 1")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        seeds = [seed] * len(prompts) if isinstance(seed, int) else list(seed or [])
        if len(seeds) != len(prompts) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise ValueError(f"best-of-N needs seed=: an int or one int per prompt ({len(prompts)}), got {seed!r}")
        if reward is None and best_of == 1 and not user_examples:
            reward = _Unscored()  # seeds alone: plain generation, recorded
        elif reward is None:
            if not user_examples:
                raise ValueError("best_of > 1 needs reward= (a person's reward, diffpref.personalize.reward) "
                                 "or user_examples= to read one from")
            reward = self.reward_model.person(user_examples)
        if not callable(getattr(reward, "score", None)):
            raise TypeError(f"reward must have a score(images, prompts) method, got {type(reward).__name__}")
        if user_examples is not None:  # embed once, shared by every candidate
            user_embedding, user_examples = self.embed_user(user_examples), None
        if user_embedding is not None and user_embedding.dim() == 3 and user_embedding.shape[0] == len(prompts) > 1:
            user_embedding = user_embedding.repeat_interleave(best_of, dim=0)
        for key in _PER_PROMPT_KWARGS:
            if isinstance(kwargs.get(key), list):
                kwargs[key] = [v for v in kwargs[key] for _ in range(best_of)]
        output_type = kwargs.pop("output_type", "pil")
        cand_prompts = [p for p in prompts for _ in range(best_of)]
        cand_seeds = [s for base in seeds for s in candidate_seeds(base, best_of)]
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in cand_seeds]
        images = self(cand_prompts, user_embedding=user_embedding, generator=generators, output_type="np",
                      **kwargs).images
        scores = np.asarray(reward.score((np.clip(images, 0, 1) * 255).round().astype(np.uint8), cand_prompts),
                            dtype=np.float64).reshape(len(prompts), best_of)
        records = best_of_records(prompts, seeds, scores)
        shown = np.stack([images[i * best_of + r["chosen"]] for i, r in enumerate(records)])
        if output_type == "pil":
            shown = [PIL.Image.fromarray(im) for im in (np.clip(shown, 0, 1) * 255).round().astype(np.uint8)]
        elif output_type != "np":
            raise ValueError(f"best-of-N returns output_type 'pil' or 'np', got {output_type!r}")
        return BestOfOutput(images=shown, nsfw_content_detected=None, candidates=records)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_base(cls, base, adapter: str | os.PathLike = "embedded-ppd", backbone=None):
        """Wrap a loaded base pipeline (its modules are shared, not copied) with a PPD adapter.

        An SDXL base gives a ``PersonalizedSDXLPipeline``, an SD1.5 one a ``PersonalizedPipeline``,
        whichever of the two this is called on.
        """
        target = PersonalizedSDXLPipeline if isinstance(base, StableDiffusionXLPipeline) else PersonalizedPipeline
        if not isinstance(base, (StableDiffusionPipeline, StableDiffusionXLPipeline)):
            raise TypeError(f"PPD adapters apply to StableDiffusionPipeline or StableDiffusionXLPipeline, "
                            f"got {type(base).__name__}")
        encoder, config = load_ppd_adapter(base.unet, adapter)
        pipe = target(user_encoder=encoder, **target._base_modules(base))
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
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        folder = Path(pretrained_model_name_or_path)
        index = folder / "model_index.json"
        saved_as = json.loads(index.read_text()).get("_class_name") if index.exists() else None
        target = {"PersonalizedSDXLPipeline": PersonalizedSDXLPipeline,
                  "PersonalizedPipeline": PersonalizedPipeline}.get(saved_as, cls)
        pipe = super(_UserInputs, target).from_pretrained(pretrained_model_name_or_path, **kwargs)
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

    def _resolve_user(self, user_examples, user_embedding, user_scale) -> tuple[torch.Tensor | None, float]:
        """(user tokens [B or 1, K, d] or None, the scale the user branch runs at)."""
        self.check_user_inputs(user_examples, user_embedding, user_scale)
        if user_examples is not None:
            user_embedding = self.embed_user(user_examples)
        if user_embedding is None or user_scale == 0:
            return None, 0.0
        tokens = user_embedding.to(self.device, self.unet.dtype)
        return (tokens.unsqueeze(0) if tokens.dim() == 2 else tokens), float(user_scale)

    def _with_user(self, prompt_embeds, negative_embeds, tokens):
        """Append the user tokens to the prompt's states, and the zero user to the unconditional ones:
        the unconditional branch sees no user, so guidance also pushes towards the user's taste."""
        tokens = None if tokens is None else tokens.to(prompt_embeds.dtype)
        prompt_embeds = concat_user_tokens(prompt_embeds, tokens, self.num_user_tokens)
        if negative_embeds is not None:
            negative_embeds = concat_user_tokens(negative_embeds, None, self.num_user_tokens)
        return prompt_embeds, negative_embeds

    def _denoise(self, scale: float, **call_kwargs):
        # Denoise with the user branch scaled (0 skips it: bit-identical to the base model). The user
        # tokens are the same at every step: each layer projects them once, for the user rows only.
        set_user_scale(self.unet, scale)
        with fixed_user_tokens(self.unet):
            return super().__call__(**call_kwargs)


class PersonalizedPipeline(_UserInputs, StableDiffusionPipeline):
    _optional_components = [*StableDiffusionPipeline._optional_components, "user_encoder"]

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, user_encoder: UserEncoder | None = None,
                 safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker: bool = False):
        super().__init__(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                         safety_checker=safety_checker, feature_extractor=feature_extractor, image_encoder=image_encoder,
                         requires_safety_checker=requires_safety_checker)
        self._init_user(user_encoder)

    @staticmethod
    def _base_modules(base) -> dict:
        return dict(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
                    scheduler=base.scheduler)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, *, user_examples: Sequence[UserExample] | None = None,
                 user_embedding: torch.Tensor | None = None, user_scale: float = 1.0, negative_prompt=None,
                 guidance_scale: float = 7.5, best_of: int = 1, reward=None, seed: int | list[int] | None = None,
                 **kwargs):
        if best_of != 1 or reward is not None or seed is not None:
            return self._best_of(prompt, best_of=best_of, reward=reward, seed=seed, user_examples=user_examples,
                                 user_embedding=user_embedding, user_scale=user_scale, negative_prompt=negative_prompt,
                                 guidance_scale=guidance_scale, **kwargs)
        tokens, scale = self._resolve_user(user_examples, user_embedding, user_scale)
        # Encode the prompt as the stock pipeline does, then append the user tokens
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompt_embeds, negative_embeds = self.encode_prompt(prompts, self.device, 1, guidance_scale > 1.0, negative_prompt)
        prompt_embeds, negative_embeds = self._with_user(prompt_embeds, negative_embeds, tokens)
        return self._denoise(scale, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds,
                             guidance_scale=guidance_scale, **kwargs)


class PersonalizedSDXLPipeline(_UserInputs, StableDiffusionXLPipeline):
    """SDXL with a user: the user tokens follow the (768 + 1280)-wide states of both text encoders."""

    _optional_components = [*StableDiffusionXLPipeline._optional_components, "user_encoder"]

    def __init__(self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler,
                 user_encoder: UserEncoder | None = None, image_encoder=None, feature_extractor=None,
                 force_zeros_for_empty_prompt: bool = True, add_watermarker: bool | None = None):
        super().__init__(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                         tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, image_encoder=image_encoder,
                         feature_extractor=feature_extractor, force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
                         add_watermarker=add_watermarker)
        self._init_user(user_encoder)

    @staticmethod
    def _base_modules(base) -> dict:
        # the base's own settings: an empty negative prompt as zeros or encoded, its watermarker on or off
        return dict(vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
                    tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=base.unet, scheduler=base.scheduler,
                    force_zeros_for_empty_prompt=bool(base.config.force_zeros_for_empty_prompt),
                    add_watermarker=getattr(base, "watermark", None) is not None)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] | None = None, *, user_examples: Sequence[UserExample] | None = None,
                 user_embedding: torch.Tensor | None = None, user_scale: float = 1.0, negative_prompt=None,
                 guidance_scale: float = 5.0, prompt_2=None, negative_prompt_2=None, best_of: int = 1, reward=None,
                 seed: int | list[int] | None = None, **kwargs):
        if best_of != 1 or reward is not None or seed is not None:
            return self._best_of(prompt, best_of=best_of, reward=reward, seed=seed, user_examples=user_examples,
                                 user_embedding=user_embedding, user_scale=user_scale, negative_prompt=negative_prompt,
                                 guidance_scale=guidance_scale, prompt_2=prompt_2, negative_prompt_2=negative_prompt_2,
                                 **kwargs)
        tokens, scale = self._resolve_user(user_examples, user_embedding, user_scale)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompt_embeds, negative_embeds, pooled, negative_pooled = self.encode_prompt(
            prompt=prompts, prompt_2=prompt_2, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=guidance_scale > 1.0, negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2)
        prompt_embeds, negative_embeds = self._with_user(prompt_embeds, negative_embeds, tokens)
        return self._denoise(scale, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds,
                             pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=negative_pooled,
                             guidance_scale=guidance_scale, **kwargs)
