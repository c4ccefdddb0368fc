"""On-policy preference pairs for PPD: a trained adapter's own images, rated by each training user.

Offline world pairs are two base generations; they differ in many attributes besides the ones a
user cares about, so Diffusion-DPO on them tilts the user branch in proportion to noisy evidence
and never sees what the branch itself draws for a user. Here every training user's tokens (from
``shots`` of their offline pairs, the way evaluation reads a user) drive the adapter, and the
user's oracle rates

- (personalized, base) of one caption and seed: did the user branch's change help this user?
- (personalized, personalized) of one caption and two seeds: which of its own samples is better?

Only decided pairs are kept (an indifferent user's label would be a coin flip).

``labeller="reward"`` labels as a deployment must, without the oracle: each pair goes to the
preferred side under the user's few-shot reward model (``diffpref.personalize.reward``) read from
the same ``shots`` choices that made the tokens; pairs it scores equal are dropped, oracle ties are
kept (the labeller cannot see them). ``reward_0/1`` still hold the oracle rewards, so the summary's
``agreement_with_oracle`` (labels that match the oracle's preference, over oracle-decided pairs)
measures the labeller; the oracle labeller's own agreement is below 1 by its Bradley-Terry noise. Training on these
pairs next to the offline ones is a round of online DPO (the base stays the reference). The rows
carry ``model_0/1 = "ppd-policy:..."`` for personalized images, and the PPD trainer never draws a
user's few-shot context from them: contexts stay base-image pairs, as at evaluation.

Reproducibility: the contexts, captions, seeds and label draws of user ``u`` depend on
``(seed, u)`` and the offline data alone.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from diffpref.data.pickapic_writer import PickapicWriter, best_image_uid
from diffpref.experiments.make_data import (
    CREATED_AT_BASE,
    PAIRS_SCHEMA,
    check_labelling,
    image_uid,
    pair_rng,
    png_bytes,
)
from diffpref.experiments.preference_eval import generate_world_images
from diffpref.experiments.relabel import _decode, read_columns
from diffpref.personalize.backbones import UserExample
from diffpref.personalize.context import POLICY_MODEL_PREFIX
from diffpref.world.captions import sample_prompt
from diffpref.world.detector import detect_batch, feature_matrix
from diffpref.world.users import (
    WorldUser,
    bradley_terry_choice,
    load_users,
    oracle_reward,
    save_users,
)

LABELLERS = ("oracle", "reward")
_OFFLINE_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "user_id", "world_user_id")


@dataclass
class _Job:
    user: int          # index into the users list
    context: int       # which of the user's contexts made the tokens
    caption: str
    seed_a: int
    seed_b: int


def _contexts_of(rows: list[int], offline: dict[str, list], data_path: Path, shots: int, count: int,
                 rng: np.random.Generator) -> list[list[UserExample]]:
    """``count`` random sets of ``shots`` decided offline pairs of one user, as UserExamples."""
    decided = [r for r in rows if offline["label_0"][r] in (0.0, 1.0)]
    if len(decided) < shots:
        raise ValueError(f"{data_path}: user {offline['world_user_id'][rows[0]]!r} has {len(decided)} decided pairs, "
                         f"fewer than shots={shots}")
    out = []
    for _ in range(count):
        examples = []
        for r in rng.choice(decided, size=shots, replace=False).tolist():
            a, b = _decode(offline["jpg_0"][r], data_path, r), _decode(offline["jpg_1"][r], data_path, r)
            won_0 = offline["label_0"][r] == 1.0
            examples.append(UserExample(offline["caption"][r], a if won_0 else b, b if won_0 else a))
        out.append(examples)
    return out


def make_policy_pairs(data_path: str | os.PathLike, adapter: str | os.PathLike, out_dir: str | os.PathLike,
                      users_file: str | os.PathLike | None = None, model="embedded", captions_per_user: int = 64,
                      contexts_per_user: int = 8, shots: int = 4, steps: int = 20, guidance_scale: float | None = None,
                      seed: int = 0, temperature: float = 0.1, batch_size: int = 96, user_scale: float = 1.0,
                      progress: bool = True, labeller: str = "oracle",
                      reward_model: str | os.PathLike = "embedded-reward") -> dict:
    """Write ``out_dir/pairs.parquet`` of decided on-policy pairs for every user of ``data_path``.

    ``captions_per_user`` captions per user (``p_name`` 0.5, as evaluation draws them), split over
    ``contexts_per_user`` token sets; each caption gives up to two pairs (see the module docstring).
    Rows keep the offline data's ``user_id`` of each user, so the two files train together.
    Returns ``{"out_dir", "pairs", "users", "candidates", "ties_dropped", "personalized_won", "parquet"}``.
    """
    from diffpref.models.loading import load_pipeline
    from diffpref.personalize.pipeline import PersonalizedPipeline

    if labeller not in LABELLERS:
        raise ValueError(f"labeller {labeller!r}; valid labellers are {', '.join(LABELLERS)}")
    data_path = Path(data_path)
    users_path = Path(users_file) if users_file is not None else data_path.parent / "users.json"
    if not users_path.is_file():
        raise FileNotFoundError(f"no users file {users_path}: pass users_file= (the world users that rated {data_path})")
    if captions_per_user < 1 or not 1 <= contexts_per_user <= captions_per_user or shots < 1:
        raise ValueError(f"need captions_per_user >= contexts_per_user >= 1 and shots >= 1; got {captions_per_user}, "
                         f"{contexts_per_user}, {shots}")
    offline = read_columns(data_path, _OFFLINE_COLUMNS, "policy pairs read world data rated by named users "
                                                        "(`diffpref world make-data` or `relabel` output)")
    rows_of: dict[str, list[int]] = {}
    for r, name in enumerate(offline["world_user_id"]):
        rows_of.setdefault(name, []).append(r)
    known = {u.user_id: u for u in load_users(users_path)}
    unknown = sorted(set(rows_of) - set(known))
    if unknown:
        raise ValueError(f"{data_path}: users {unknown[:5]} are not in {users_path}; pass the users file they came from")
    users: list[WorldUser] = [known[name] for name in rows_of]
    check_labelling(users, temperature, "make_policy_pairs")

    base = load_pipeline(model) if isinstance(model, (str, os.PathLike)) else model
    pipe = PersonalizedPipeline.from_base(base, adapter)
    pipe.set_progress_bar_config(disable=True)

    # 1. Every user's token sets and captions.
    jobs: list[_Job] = []
    tokens: dict[tuple[int, int], torch.Tensor] = {}
    rewards: dict[tuple[int, int], object] = {}
    reader = None
    if labeller == "reward":
        from diffpref.personalize.reward import PrototypeRewardModel

        reader = PrototypeRewardModel.from_pretrained(reward_model)
    for u, user in enumerate(tqdm(users, desc="embed users", disable=not progress, dynamic_ncols=True)):
        rng = np.random.default_rng([seed, u, 0x9011C7])
        contexts = _contexts_of(rows_of[user.user_id], offline, data_path, shots, contexts_per_user, rng)
        for c, examples in enumerate(contexts):
            tokens[u, c] = pipe.embed_user(examples)
            if reader is not None:  # the labeller knows the user by the same choices the tokens came from
                rewards[u, c] = reader.person(examples)
        for i in range(captions_per_user):
            seed_a, seed_b = (int(s) for s in rng.integers(0, 2**31 - 1, size=2))
            jobs.append(_Job(u, i * contexts_per_user // captions_per_user, sample_prompt(rng), seed_a, seed_b))

    # 2. Images: base for seed a; personalized for seeds a and b, each sample with its own user's tokens.
    captions = [j.caption for j in jobs]
    base_images = generate_world_images(pipe, captions, [j.seed_a for j in jobs], steps, guidance_scale, batch_size,
                                        progress, "base")
    per_job_tokens = torch.stack([tokens[j.user, j.context] for j in jobs])  # [N, K, d]: split with the captions
    personalized = {side: generate_world_images(pipe, captions, [getattr(j, f"seed_{side}") for j in jobs], steps,
                                                guidance_scale, batch_size, progress, f"personalized ({side})",
                                                user_embedding=per_job_tokens, user_scale=user_scale)
                    for side in ("a", "b")}
    features = {name: feature_matrix(detect_batch(images)) for name, images in
                (("base", base_images), ("a", personalized["a"]), ("b", personalized["b"]))}
    scored = {}  # the reward labeller's score of every image, with the reward of the job's own context
    if reader is not None:
        for name, images in (("base", base_images), ("a", personalized["a"]), ("b", personalized["b"])):
            emb = reader.backbone.embed_images(images).numpy()
            scored[name] = np.array([float(rewards[j.user, j.context].score_embeddings(emb[n:n + 1])[0])
                                     for n, j in enumerate(jobs)])

    # 3. Label with each user's oracle; keep decided pairs; write in the offline data's schema.
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parquet_path = out / "pairs.parquet"
    user_ids = {name: offline["user_id"][rows[0]] for name, rows in rows_of.items()}
    base_name = str(model) if isinstance(model, (str, os.PathLike)) else "base"
    prompt_counts = Counter(captions)
    written = ties = personalized_won = 0  # personalized_won: (personalized, base) pairs the oracle gives to the first
    agree = oracle_decided = oracle_ties_kept = 0
    with PickapicWriter(parquet_path, PAIRS_SCHEMA) as writer:
        for n, job in enumerate(jobs):
            user = users[job.user]
            policy_name = f"{POLICY_MODEL_PREFIX}:{user.user_id}:{job.context}"
            sides = {"a": (personalized["a"][n], features["a"][n], policy_name, job.seed_a),
                     "b": (personalized["b"][n], features["b"][n], policy_name, job.seed_b),
                     "base": (base_images[n], features["base"][n], base_name, job.seed_a)}
            for p, (first, second) in enumerate((("a", "base"), ("a", "b"))):
                r_first, r_second = (float(oracle_reward(user, sides[s][1])) for s in (first, second))
                personalized_won += second == "base" and r_first > r_second
                if (r_first == r_second) if reader is None else (scored[first][n] == scored[second][n]):
                    ties += 1
                    continue
                rng = pair_rng(seed, job.user, 2 * n + p, 1)
                if rng.random() < 0.5:  # which side is image_0 carries no information
                    first, second = second, first
                    r_first, r_second = r_second, r_first
                (im_0, f_0, model_0, seed_0), (im_1, f_1, model_1, seed_1) = sides[first], sides[second]
                if reader is None:
                    label = float(bradley_terry_choice(user, f_0, f_1, temperature=temperature, rng=rng))
                else:
                    label = 1.0 if scored[first][n] > scored[second][n] else 0.0
                if r_first != r_second:
                    oracle_decided += 1
                    agree += label == (1.0 if r_first > r_second else 0.0)
                else:
                    oracle_ties_kept += 1
                uid_0, uid_1 = image_uid(model_0, job.caption, seed_0), image_uid(model_1, job.caption, seed_1)
                writer.write({
                    "are_different": True, "caption": job.caption,
                    "image_0_uid": uid_0, "image_0_url": "", "image_1_uid": uid_1, "image_1_url": "",
                    "jpg_0": png_bytes(im_0), "jpg_1": png_bytes(im_1), "model_0": model_0, "model_1": model_1,
                    "seed_0": seed_0, "seed_1": seed_1, "best_image_uid": best_image_uid(label, uid_0, uid_1),
                    "created_at": CREATED_AT_BASE + np.timedelta64(written, "s").item(), "has_label": True,
                    "label_0": label, "label_1": 1.0 - label, "ranking_id": written,
                    "user_id": user_ids[user.user_id], "num_example_per_prompt": prompt_counts[job.caption],
                    "world_user_id": user.user_id, "reward_0": r_first, "reward_1": r_second,
                })
                written += 1
    save_users(users, out / "users.json")
    return {"out_dir": str(out), "pairs": written, "users": len(users), "candidates": 2 * len(jobs),
            "ties_dropped": ties, "personalized_won": int(personalized_won), "parquet": str(parquet_path),
            "labeller": labeller, "agreement_with_oracle": agree / oracle_decided if oracle_decided else None,
            "oracle_ties_kept": oracle_ties_kept}
