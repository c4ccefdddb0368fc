"""PickScore (Kirstain et al. 2023): a CLIP-H fine-tuned on Pick-a-Pic, in the transformers CLIP format.

    pickscore=MODEL_DIR[@PROCESSOR_DIR]

``MODEL_DIR`` is a local copy of yuvalkirstain/PickScore_v1 (``CLIPModel.save_pretrained`` layout);
the processor (image preprocessing + tokenizer) is that of laion/CLIP-ViT-H-14-laion2B-s32B-b79K and
is read from ``PROCESSOR_DIR``, or from ``MODEL_DIR`` when it holds one. Both load with
``local_files_only=True``: nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from diffpref.rewards.base import RewardModel, cosine, to_pil


def pick_score(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """PickScore: logit_scale.exp() * cos(image, text) (the PickScore_v1 README; logit_scale.exp() is 100)."""
    return torch.as_tensor(logit_scale, dtype=torch.float32, device=image_embeds.device) * cosine(image_embeds, text_embeds)


def _pooled(output) -> torch.Tensor:
    # transformers < 5 returns the projected embeddings; 5.x returns an output whose pooler_output holds them.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class PickScoreReward(RewardModel):
    name = "pickscore"

    def __init__(self, model, processor, device: str | torch.device = "cpu"):
        super().__init__(device)
        self.model, self.processor = model.to(self.device).float().eval(), processor
        # PickScore truncates prompts at CLIP's 77 tokens; a smaller text tower (tests) truncates at its own length.
        self.max_length = min(77, int(model.config.text_config.max_position_embeddings))

    @classmethod
    def from_files(cls, model_dir: str | Path, processor_dir: str | Path | None = None,
                   device: str | torch.device = "cpu") -> PickScoreReward:
        from transformers import CLIPModel, CLIPProcessor

        model = CLIPModel.from_pretrained(str(model_dir), local_files_only=True)
        processor = CLIPProcessor.from_pretrained(str(processor_dir or model_dir), local_files_only=True)
        return cls(model, processor, device=device)

    def score_batch(self, images: np.ndarray, prompts: Sequence[str]) -> torch.Tensor:
        pixels = self.processor(images=to_pil(images), return_tensors="pt")["pixel_values"].to(self.device)
        text = self.processor(text=list(prompts), padding=True, truncation=True, max_length=self.max_length,
                              return_tensors="pt").to(self.device)
        image_embeds = _pooled(self.model.get_image_features(pixel_values=pixels))
        text_embeds = _pooled(self.model.get_text_features(input_ids=text["input_ids"],
                                                           attention_mask=text["attention_mask"]))
        return pick_score(image_embeds, text_embeds, self.model.logit_scale.exp())
