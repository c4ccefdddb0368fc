"""Diagnostic (not a benchmark): how far does a PPD run get with a user's own DPO-learned tokens?

A run with ``ppd_user_table: true`` learns one token set per training user by DPO and fits the
encoder to predict it from a few of the user's choices. This probe splits the two halves of the
problem for some of those (seen) users: the oracle win rate against the base when the UNet reads the
user's **table** tokens (what DPO learned; the encoder cannot do better than this on seen users) and
when it reads the **encoder's** tokens from K fresh example pairs, plus their cosine similarity.

    OMP_NUM_THREADS=2 python bench/ppd_table_probe.py --adapter outputs/embedded_ppd_pool \
        --users configs/users/ppd_train_pool.json --n-users 6

``--users`` is the run's training users file, in the order of the training data (row u of the table
is the u-th user of the data, as `world make-data` and `world relabel` write them). The table comes
from the run's newest checkpoint. Prints one JSON line per user and a summary line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file


def table_tokens(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """Every training user's tokens [U, K, d] from a checkpoint's trainable state, as training reads them."""
    def find(suffix: str) -> torch.Tensor | None:
        return next((v for k, v in state.items() if k.endswith(suffix)), None)

    from diffpref.personalize.training import user_table_tokens

    offsets, shared, basis = find(".user_table"), find(".user_table_shared"), find(".user_table_basis")
    if offsets is None or shared is None:
        raise ValueError("the checkpoint holds no user table: train with ppd_user_table: true")
    return user_table_tokens(shared, offsets, basis)


def newest_checkpoint(adapter: Path) -> Path:
    found = sorted((adapter / "checkpoints").glob("checkpoint-*/trainable.safetensors"),
                   key=lambda p: int(p.parent.name.split("-")[1]))
    if not found:
        raise FileNotFoundError(f"{adapter}/checkpoints holds no checkpoint-N/trainable.safetensors")
    return found[-1]


def main(argv: list[str] | None = None) -> dict:
    from diffpref.models.loading import load_pipeline
    from diffpref.personalize.pipeline import PersonalizedPipeline
    from diffpref.experiments.ppd_eval import as_examples, draw_pairs, generate_personalized
    from diffpref.world.detector import detect_batch, feature_matrix
    from diffpref.world.metrics import adherence_of, win_rate
    from diffpref.experiments.preference_eval import eval_prompts, generate_world_images
    from diffpref.world.users import load_users, oracle_reward

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, help="a PPD run's output folder (with checkpoints/)")
    parser.add_argument("--users", required=True, help="the run's training users, in data order")
    parser.add_argument("--n-users", type=int, default=6, help="users probed, spread evenly over the list")
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=60)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    adapter = Path(args.adapter)
    table = table_tokens(load_file(str(newest_checkpoint(adapter))))
    users = load_users(args.users)
    if len(users) != len(table):
        raise ValueError(f"{args.users} lists {len(users)} users but the table has {len(table)} rows")
    pipe = PersonalizedPipeline.from_base(load_pipeline("embedded"), adapter)
    pipe.set_progress_bar_config(disable=True)
    prompts, seeds = eval_prompts(args.prompts, args.seed)
    base = generate_world_images(pipe, prompts, seeds, args.steps, None, 100, False, "base")
    base_features = feature_matrix(detect_batch(base))
    results = {}
    for row in np.linspace(0, len(users) - 1, args.n_users).round().astype(int).tolist():
        user = users[row]
        examples = as_examples(draw_pairs(pipe, user, args.shots, args.seed, args.steps, None, user_salt=row))
        encoded = pipe.embed_user(examples)
        result = {"user": user.user_id, "weights": user.weights}
        for name, tokens in (("table", table[row]), ("encoder", encoded)):
            images = generate_personalized(pipe, prompts, seeds, tokens, 1.0, args.steps, None, 100)
            result[f"{name}_win_rate"] = win_rate(oracle_reward(user, feature_matrix(detect_batch(images))),
                                                  oracle_reward(user, base_features))
            result[f"{name}_adherence"] = adherence_of(images, prompts)["mean_acc"]
        result["cosine"] = float(torch.nn.functional.cosine_similarity(encoded.flatten(), table[row].flatten(), dim=0))
        results[user.user_id] = result
        print(json.dumps(result), flush=True)
    keys = ("table_win_rate", "table_adherence", "encoder_win_rate", "encoder_adherence", "cosine")
    summary = {key: float(np.mean([r[key] for r in results.values()])) for key in keys}
    summary.update(shots=args.shots, prompts=args.prompts, base_adherence=adherence_of(base, prompts)["mean_acc"])
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
