"""How far does a PPD adapter move each world attribute when a user's choices are unambiguous?

    python bench/ppd_attribute_response.py --adapter embedded-ppd --json

For every colour, every background, and both ends of size and brightness: ``--shots`` clean world
renders pairs whose preferred image has that value and whose rejected image is the same render with
another value (nothing else differs) make one user. The adapter personalizes ``--prompts``
evaluation captions for that user, and the detector measures the attribute on those images and on
the base model's images of the same captions and seeds. ``tuned`` against ``base`` is how much of
the taste the generator can express when the evidence is clean; the few-shot evaluation
(``diffpref world eval``) adds the noise of real choices on top. Captions that name the attribute
keep it (prompt adherence), so a categorical value cannot reach 1.

One JSON line per attribute value: ``{"attribute", "value", "feature", "base", "tuned", "shift"}``
(for the low end of size or brightness a good shift is negative).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def targets() -> list[tuple[str, object]]:
    from diffpref.world.render import CATEGORICAL

    return ([(family, value) for family in ("color", "background") for value in CATEGORICAL[family]]
            + [(family, end) for family in ("size", "brightness") for end in (0.9, 0.1)])


def clean_examples(family: str, value, shots: int, rng: np.random.Generator):
    """``shots`` examples: a render with ``family = value`` preferred over the same render without it."""
    from diffpref.personalize.backbones import UserExample
    from diffpref.world.captions import caption_for
    from diffpref.world.render import CATEGORICAL, render, sample_attributes

    examples = []
    for _ in range(shots):
        attrs = sample_attributes(rng)
        if family in CATEGORICAL:
            others = [v for v in CATEGORICAL[family] if v != value]
            worse = others[int(rng.integers(len(others)))]
        else:
            worse = 1.0 - float(value)
        examples.append(UserExample(caption_for(shape=attrs.shape), render(replace(attrs, **{family: value})),
                                    render(replace(attrs, **{family: worse}))))
    return examples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default="embedded-ppd")
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=60)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--only", default=None, help="comma-separated families to probe (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="JSON lines (the default output too)")
    args = parser.parse_args(argv)
    if args.shots < 1 or args.prompts < 1:
        parser.error("--shots and --prompts must be >= 1")

    from diffpref.models.loading import load_pipeline
    from diffpref.personalize.pipeline import PersonalizedPipeline
    from diffpref.experiments.ppd_eval import generate_personalized
    from diffpref.world.detector import FEATURE_KEYS, detect_batch, feature_matrix
    from diffpref.experiments.preference_eval import eval_prompts, generate_world_images
    from diffpref.world.render import CATEGORICAL

    pipe = PersonalizedPipeline.from_base(load_pipeline("embedded"), args.adapter)
    pipe.set_progress_bar_config(disable=True)
    prompts, seeds = eval_prompts(args.prompts, args.seed)
    base = feature_matrix(detect_batch(generate_world_images(pipe, prompts, seeds, args.steps, None, 100, False, "base")))
    only = None if args.only is None else {f.strip() for f in args.only.split(",")}
    rng = np.random.default_rng(args.seed)
    for family, value in targets():
        if only is not None and family not in only:
            continue
        tokens = pipe.embed_user(clean_examples(family, value, args.shots, rng))
        tuned = feature_matrix(detect_batch(generate_personalized(pipe, prompts, seeds, tokens, 1.0, args.steps,
                                                                  None, 100)))
        feature = f"{family}:{value}" if family in CATEGORICAL else family
        i = FEATURE_KEYS.index(feature)
        print(json.dumps({"attribute": family, "value": value, "feature": feature, "base": round(float(base[:, i].mean()), 3),
                          "tuned": round(float(tuned[:, i].mean()), 3),
                          "shift": round(float(tuned[:, i].mean() - base[:, i].mean()), 3)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
