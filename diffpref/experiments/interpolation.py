"""Interpolating between two users: mix their embeddings and watch each one's oracle reward move.

    python -m diffpref.experiments.interpolation --adapter embedded-ppd --users configs/users/opposites.json \
        --out interpolation.json

For mix weights w in 0, 0.25, 0.5, 0.75, 1 the tokens are (1 - w) * first + w * second; the same
captions and seeds are generated at every w, and both users' mean oracle rewards are reported.
A smooth interpolation moves the first user's reward down and the second's up, monotonically.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from diffpref.experiments.ppd_eval import as_examples, draw_pairs, generate_personalized
from diffpref.experiments.preference_eval import eval_prompts
from diffpref.personalize.encoder import mix_embeddings
from diffpref.world.detector import detect_batch, feature_matrix
from diffpref.world.users import load_users, oracle_reward

MIXES = (0.0, 0.25, 0.5, 0.75, 1.0)


def interpolate(pipe, users, shots: int = 4, num_prompts: int = 100, seed: int = 0, steps: int = 20,
                mixes=MIXES, batch_size: int = 100) -> dict:
    if len(users) != 2:
        raise ValueError(f"interpolation needs exactly two users, got {len(users)}")
    tokens = [pipe.embed_user(as_examples(draw_pairs(pipe, u, shots, seed, steps, None, batch_size, user_salt=i)))
              for i, u in enumerate(users)]
    prompts, seeds = eval_prompts(num_prompts, seed)
    curve = []
    for w in mixes:
        mixed = mix_embeddings({"a": (tokens[0], 1.0 - w), "b": (tokens[1], w)})
        images = generate_personalized(pipe, prompts, seeds, mixed, 1.0, steps, None, batch_size)
        features = feature_matrix(detect_batch(images))
        curve.append({"mix": w, **{u.user_id: float(np.mean(oracle_reward(u, features))) for u in users}})
    first, second = users[0].user_id, users[1].user_id
    return {
        "users": [first, second], "shots": shots, "n": num_prompts, "curve": curve,
        "monotonic": bool(all(a[first] >= b[first] for a, b in zip(curve, curve[1:]))
                          and all(a[second] <= b[second] for a, b in zip(curve, curve[1:]))),
    }


def main(argv=None) -> int:
    from diffpref.models.loading import load_pipeline
    from diffpref.personalize.pipeline import PersonalizedPipeline

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--adapter", default="embedded-ppd")
    parser.add_argument("--users", required=True, help="JSON list of exactly two world users")
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    pipe = PersonalizedPipeline.from_base(load_pipeline(args.model), args.adapter)
    pipe.set_progress_bar_config(disable=True)
    result = interpolate(pipe, load_users(args.users), args.shots, args.prompts, args.seed)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
