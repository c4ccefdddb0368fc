"""Frozen feature extractors that read a user's preference examples.

A user is known by a few examples: a prompt and the image they preferred over another. A backbone
turns those examples into features; the trainable ``UserEncoder`` head turns features into the
tokens the UNet attends to. Two backbones share one interface (``UserBackbone``):

- ``OpenClipBackbone``: one feature row per example, ``[text, preferred, rejected, preferred -
  rejected]`` of normalised CLIP embeddings (F = 4 * embed_dim). The set is summarised by the head.
  The backbone is frozen, so a trainer embeds every image and prompt once (``embed_images`` /
  ``embed_texts``), caches them, and builds example features from the cache with
  ``example_features_from_embeddings`` -- the same function ``embed_examples`` uses.
- ``VLMBackbone`` (PPD, Dang et al. 2025): a vision-language model reads all examples in one prompt,
  writes a short user profile, and the hidden states of its last generated token form the
  embedding. The VLM summarises the set itself, so it returns a single row ``[1, F]`` however many
  examples it read; the head sees a "set" of one. Any local transformers folder that
  ``AutoModelForImageTextToText`` loads (LLaVA-OneVision, Qwen2-VL, LLaVA, ...). Images are resized
  to ``image_size`` squares and a set is cut to the examples that fit ``max_tokens``, the same way
  in training (``vlm_context.py`` precomputes the features of sampled context sets) and inference.

``backbone_kind(name)`` tells the two apart from a ``ppd_backbone`` value.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


@dataclass
class UserExample:
    """One preference judgement: for ``prompt`` the user chose ``preferred`` over ``rejected``."""

    prompt: str
    preferred: Image.Image | np.ndarray
    rejected: Image.Image | np.ndarray


@runtime_checkable
class UserBackbone(Protocol):
    feature_dim: int
    # True when embed_examples returns one row for the whole set instead of one per example.
    summarizes_set: bool

    def embed_examples(self, examples: Sequence[UserExample]) -> torch.Tensor:
        """Frozen features, ``[k, feature_dim]`` (or ``[1, feature_dim]`` when ``summarizes_set``)."""
        ...


def to_pil(image: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) image array, got dtype={array.dtype} shape={array.shape}")
    return Image.fromarray(array)


def _check_examples(examples: Sequence[UserExample]) -> None:
    if len(examples) == 0:
        raise ValueError("a user needs at least one example; got an empty list")


# ----------------------------------------------------------------------------------------------
# open_clip


def example_features_from_embeddings(text_emb: torch.Tensor, pref_emb: torch.Tensor,
                                     rej_emb: torch.Tensor) -> torch.Tensor:
    """Per-example features ``[text, pref, rej, pref - rej]`` from (cached) CLIP embeddings, ``[k, 4E]``.

    Inputs are re-normalised, so raw or already-normalised embeddings give the same result.
    """
    if not (text_emb.shape == pref_emb.shape == rej_emb.shape) or text_emb.ndim != 2:
        raise ValueError(f"expected three [k, E] embeddings of one shape, got {tuple(text_emb.shape)}, "
                         f"{tuple(pref_emb.shape)}, {tuple(rej_emb.shape)}")
    text, pref, rej = (F.normalize(x.float(), dim=-1) for x in (text_emb, pref_emb, rej_emb))
    return torch.cat([text, pref, rej, pref - rej], dim=-1)


class OpenClipBackbone:
    """A frozen open_clip model; features per example, see ``example_features_from_embeddings``."""

    summarizes_set = False

    def __init__(self, model, preprocess, tokenizer, batch_size: int = 64):
        self.model = model.eval().requires_grad_(False)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.embed_dim = int(model.visual.output_dim)
        self.feature_dim = 4 * self.embed_dim

    @classmethod
    def from_pretrained(cls, path: str | Path | tuple[str, str | Path] | None = None,
                        device: str = "cpu") -> OpenClipBackbone:
        """Load from local files only.

        ``None``: the embedded world CLIP. A folder (optionally written ``local-dir:/path``): an
        open_clip ``local-dir`` folder. ``(model_name, checkpoint_file)``, e.g. ``("ViT-H-14",
        "/models/hpsv2.pt")``: an open_clip architecture with weights from a local checkpoint.
        """
        import open_clip

        from diffpref.models.world_clip import load_world_clip

        if path is None or not isinstance(path, tuple):
            folder = None if path is None else Path(str(path).removeprefix("local-dir:"))
            if folder is not None and not (folder / "open_clip_config.json").exists():
                raise FileNotFoundError(f"{folder} is not an open_clip local-dir folder (no open_clip_config.json); "
                                        "pass a folder, None for the embedded world CLIP, or (model_name, checkpoint)")
            return cls(*load_world_clip(folder, device=device))
        model_name, checkpoint = path
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"checkpoint {checkpoint} not found; open_clip weights are never downloaded here")
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=str(checkpoint),
                                                                     device=device)
        return cls(model.float(), preprocess, open_clip.get_tokenizer(model_name))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image | np.ndarray] | np.ndarray) -> torch.Tensor:
        """Normalised image embeddings ``[n, E]``."""
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = torch.stack([self.preprocess(to_pil(im)) for im in images[start:start + self.batch_size]])
            out.append(F.normalize(self.model.encode_image(batch.to(self.device)).float(), dim=-1))
        return torch.cat(out)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Normalised text embeddings ``[n, E]``."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[start:start + self.batch_size]))
            out.append(F.normalize(self.model.encode_text(tokens.to(self.device)).float(), dim=-1))
        return torch.cat(out)

    def embed_examples(self, examples: Sequence[UserExample]) -> torch.Tensor:
        _check_examples(examples)
        text = self.embed_texts([ex.prompt for ex in examples])
        images = self.embed_images([ex.preferred for ex in examples] + [ex.rejected for ex in examples])
        return example_features_from_embeddings(text, images[:len(examples)], images[len(examples):])


# ----------------------------------------------------------------------------------------------
# Vision-language model (PPD)

VLM_INTRO = "Here are captions and, for each, the image a user preferred and the image they did not."
VLM_EXAMPLE = "Caption: {prompt}\nPreferred image: {image}\nDispreferred image: {image}\n"
VLM_QUESTION = "Describe this user's visual preferences in one short profile."


def backbone_kind(name: str | os.PathLike | tuple | None) -> str:
    """'open_clip' or 'vlm' for a ``ppd_backbone`` value: 'embedded', an open_clip local-dir folder, a
    ``(model_name, checkpoint)`` pair, or a local transformers vision-language model folder."""
    if name is None or isinstance(name, tuple) or str(name) in ("embedded", "embedded-clip"):
        return "open_clip"
    folder = Path(str(name).removeprefix("local-dir:"))
    if (folder / "open_clip_config.json").exists():
        return "open_clip"
    if (folder / "config.json").exists():
        return "vlm"
    raise FileNotFoundError(f"ppd_backbone {name!r}: not 'embedded', not an open_clip local-dir folder (no "
                            "open_clip_config.json) and not a transformers model folder (no config.json); nothing is "
                            "downloaded, so give a local folder")


class VLMBackbone:
    """A frozen transformers vision-language model that writes a user profile (PPD).

    All k examples go into one prompt, interleaved as ``Caption: ... Preferred image: <image>
    Dispreferred image: <image>``. The model greedily generates up to ``max_new_tokens`` of
    profile; one more forward pass over prompt + profile gives the hidden states of the final
    generated token at every decoder layer (the token-embedding layer is left out: it only names
    the token). ``layer_pooling="concat"`` (PPD) gives F = num_layers * hidden_size;
    ``"mean"`` averages over layers, F = hidden_size. ``embed_examples`` returns ``[1, F]``.
    ``max_new_tokens=0`` writes no profile: the last prompt token's states are the embedding.

    Token budget: every image is first resized to an ``image_size`` square (0: as given), which
    fixes its number of image tokens for a given processor; ``fit`` keeps the longest prefix of the
    examples whose prompt plus profile fits ``max_tokens`` (0: the model's context length). With
    384 px images a LLaVA-OneVision example costs 2980 tokens (10 examples in 32k), a Qwen2-VL one 406.
    """

    summarizes_set = True

    def __init__(self, model, processor, max_new_tokens: int = 32, layer_pooling: str = "concat",
                 image_size: int = 0, max_tokens: int = 0):
        if layer_pooling not in ("concat", "mean"):
            raise ValueError(f"layer_pooling={layer_pooling!r}; expected one of ('concat', 'mean')")
        if max_new_tokens < 0 or image_size < 0 or max_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens}, image_size={image_size}, max_tokens={max_tokens} "
                             "must be >= 0")
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.max_new_tokens = max_new_tokens
        self.layer_pooling = layer_pooling
        text_config = model.config.get_text_config()
        self.num_layers = int(text_config.num_hidden_layers)
        self.hidden_size = int(text_config.hidden_size)
        self.feature_dim = self.hidden_size * (self.num_layers if layer_pooling == "concat" else 1)
        self.image_token = getattr(processor, "image_token", "<image>")
        self.last_profile: str | None = None
        self.image_size = int(image_size)
        self.context_length = int(getattr(text_config, "max_position_embeddings", 0) or 0)
        self.max_tokens = int(max_tokens) or self.context_length
        if self.max_tokens and self.context_length and self.max_tokens > self.context_length:
            raise ValueError(f"max_tokens={max_tokens} exceeds the model's context length {self.context_length}")
        self.last_kept: int = 0  # how many examples the last embed_examples read (after fit)

    @property
    def settings(self) -> dict:
        """What an adapter records so that inference reads users exactly as training did."""
        return {"max_new_tokens": self.max_new_tokens, "layer_pooling": self.layer_pooling,
                "image_size": self.image_size, "max_tokens": self.max_tokens,
                "dtype": str(self.model.dtype).removeprefix("torch.")}

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu", dtype: torch.dtype | str | None = None,
                        **kwargs) -> VLMBackbone:
        """Load model and processor from a local folder (``save_pretrained`` layout); never downloads."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if not (Path(path) / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json; VLMBackbone loads local transformers folders only")
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        if isinstance(dtype, str):  # as an adapter records it ("bfloat16")
            dtype = getattr(torch, dtype)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, local_files_only=True).to(device)
        return cls(model, processor, **kwargs)

    def build_prompt(self, examples: Sequence[UserExample]) -> str:
        """The prompt text with one image placeholder per image (chat template when the processor has one)."""
        if getattr(self.processor, "chat_template", None):
            content = [{"type": "text", "text": VLM_INTRO + "\n"}]
            for ex in examples:
                content += [{"type": "text", "text": f"Caption: {ex.prompt}\nPreferred image: "}, {"type": "image"},
                            {"type": "text", "text": "\nDispreferred image: "}, {"type": "image"},
                            {"type": "text", "text": "\n"}]
            content.append({"type": "text", "text": VLM_QUESTION})
            messages = [{"role": "user", "content": content}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        body = "".join(VLM_EXAMPLE.format(prompt=ex.prompt, image=self.image_token) for ex in examples)
        return f"{VLM_INTRO}\n{body}{VLM_QUESTION}\n"

    def prepare_image(self, image) -> Image.Image:
        """The image as the processor gets it (PIL, resized to ``image_size``); a prepared image passes unchanged,
        so callers may prepare (shrink) images they hold before ``embed_examples``."""
        image = to_pil(image)
        if self.image_size and image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), Image.BICUBIC)
        return image

    def _inputs(self, examples: Sequence[UserExample]):
        images = [self.prepare_image(im) for ex in examples for im in (ex.preferred, ex.rejected)]
        return self.processor(text=[self.build_prompt(examples)], images=images, return_tensors="pt")

    def prompt_length(self, examples: Sequence[UserExample]) -> int:
        """Tokens of the prompt that reads ``examples`` (image tokens included)."""
        return int(self._inputs(examples)["input_ids"].shape[1])

    def fit(self, examples: Sequence[UserExample]) -> list[UserExample]:
        """The longest prefix of ``examples`` whose prompt plus profile fits ``max_tokens``; at least one."""
        examples = list(examples)
        _check_examples(examples)
        if not self.max_tokens:
            return examples
        budget = self.max_tokens - self.max_new_tokens
        length = self.prompt_length(examples)
        while length > budget and len(examples) > 1:
            # every example costs about the same: jump near the fit, then step
            per_example = max(1, length // len(examples))
            drop = max(1, min(len(examples) - 1, -(-(length - budget) // per_example)))
            examples = examples[:-drop]
            length = self.prompt_length(examples)
        if length > budget:
            raise ValueError(f"one example takes {length} tokens, over the budget of {budget} (max_tokens "
                             f"{self.max_tokens} - max_new_tokens {self.max_new_tokens}): lower image_size")
        return examples

    @torch.no_grad()
    def embed_examples(self, examples: Sequence[UserExample]) -> torch.Tensor:
        examples = self.fit(examples)
        self.last_kept = len(examples)
        inputs = self._inputs(examples).to(self.model.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        # A generated image placeholder would ask for image features that do not exist.
        image_token_id = getattr(self.processor, "image_token_id", None)
        suppress = [image_token_id] if image_token_id is not None else None
        if self.max_new_tokens == 0:  # no profile: the last prompt token reads the whole set
            self.last_profile = ""
            return self._pool(self.model(**inputs, output_hidden_states=True).hidden_states)
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                  suppress_tokens=suppress, return_dict_in_generate=True)
        sequences = out.sequences
        prompt_ids = inputs["input_ids"]
        new = sequences.shape[1] - prompt_ids.shape[1]
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.last_profile = tokenizer.decode(sequences[0, prompt_ids.shape[1]:], skip_special_tokens=True)

        # generate never feeds its last token back, so one more pass over prompt + profile reads it.
        # A full pass (not one step on the cache) works the same for every VLM's position scheme.
        full = dict(inputs)
        full["input_ids"] = sequences
        for key, value in inputs.items():
            if key != "input_ids" and torch.is_tensor(value) and value.shape == prompt_ids.shape:
                fill = torch.ones if key == "attention_mask" else torch.zeros
                full[key] = torch.cat([value, fill(value.shape[0], new, dtype=value.dtype, device=value.device)], 1)
        if "logits_to_keep" in inspect.signature(self.model.forward).parameters:
            full["logits_to_keep"] = 1
        return self._pool(self.model(**full, output_hidden_states=True).hidden_states)

    def _pool(self, hidden) -> torch.Tensor:
        """(num_layers + 1) x (1, seq, H) hidden states -> the last token's features [1, F]."""
        last = torch.stack([h[0, -1] for h in hidden[1:]]).float()  # (num_layers, H)
        return last.reshape(1, -1) if self.layer_pooling == "concat" else last.mean(0, keepdim=True)
