"""``diffpref app --learn``: the stored ratings fine-tune the PPD adapter while people rate.

Every ``learn_every`` new decided ratings (all people together) a background thread runs one round:

1. Snapshot the ratings database (SQLite's backup API: a consistent copy while the app writes) and
   delete from the copy the held-out ratings: a fixed share (``learn_holdout``) of every person's
   decided ratings, chosen by a hash of the rating id, so a rating held out once is held out in
   every round and never trained on.
2. Train with the shared trainer (``diffpref.training.trainer.train`` with ``PPDConditioner``), in a
   child process (the trainer sets torch's thread count, which is process-wide), from the adapter
   being served (``ppd_init_adapter``), with ``LEARN_KEYS`` overridden by the ``learn_config`` YAML.
   The adapter is written to ``round-N.tmp`` and renamed to ``round-N``: readers never see half of one.
3. Judge both adapters on the held-out ratings: the share whose Diffusion-DPO implicit reward
   (Wallace et al. 2023, eq. 14: how much more the person's model lowers the denoising error of
   the chosen image than of the other, relative to the base model) agrees with the person's choice.
   The person's tokens come from their training ratings only. The new adapter is served only if it
   is at least as good as the current one; otherwise the round is recorded and dropped.

``rounds.jsonl`` in ``learn_dir`` logs every round (accuracies, whether it was served).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

log = logging.getLogger(__name__)

# The training keys of a round (over TrainConfig's defaults; `learn_config` overrides them). Measured in
# reports/app_learning.md. A small step budget: a round must end within minutes on 2 CPU cores.
LEARN_KEYS: dict[str, Any] = {
    "method": "dpo", "conditioning": "ppd", "beta": 1000, "learning_rate": 0.002, "train_batch_size": 16,
    "max_train_steps": 150, "lora_rank": 0, "prompt_dropout": 0.1, "checkpointing_steps": 100000,
    "report_to": "none", "seed": 0, "threads": 1,
    "ppd_num_tokens": 4, "ppd_blocks": "all", "ppd_backbone": "embedded", "ppd_shots_min": 1, "ppd_shots_max": 8,
    "ppd_user_dropout": 0.1, "ppd_encoder": "evidence", "ppd_value_init_scale": 0.2, "ppd_attention_lr": 0.00005,
}
MIN_HELD_OUT = 4  # fewer held-out ratings than this cannot tell two adapters apart: no swap


def held_out(rating_id: int | str, share: float) -> bool:
    """Whether a rating is held out: a fixed function of its id, the same in every round."""
    return int(hashlib.sha256(str(rating_id).encode()).hexdigest()[:8], 16) / 16**8 < share


def snapshot(db: str | os.PathLike, out: Path, share: float) -> dict[str, list[dict]]:
    """Copy the database to ``out`` without its held-out ratings; returns each person's held-out ratings."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(db) as src, sqlite3.connect(out) as dst:
        src.backup(dst)
    with sqlite3.connect(out) as conn:
        rows = conn.execute("SELECT rating_id, pair_id, user_id, label FROM ratings WHERE label IN (0.0, 1.0)").fetchall()
        drop = [r for r in rows if held_out(r[0], share)]
        conn.executemany("DELETE FROM ratings WHERE rating_id = ?", [(r[0],) for r in drop])
    conn.close()
    split: dict[str, list[dict]] = {}
    for rating_id, pair_id, user_id, label in drop:
        split.setdefault(user_id, []).append({"rating_id": rating_id, "pair_id": pair_id, "label": label})
    return split


def train_round(model: str, adapter: str, data: Path, out: Path, overrides: str | None = None,
                timeout_s: float = 3600) -> Path:
    """Train one round in a child process; the adapter appears at ``out`` complete or not at all."""
    keys = {**LEARN_KEYS, **(yaml.safe_load(Path(overrides).read_text()) if overrides else {})}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    keys.update(model=model, data_path=str(data), output_dir=str(tmp / "train"), cache_dir=str(tmp / "cache"),
                ppd_init_adapter=str(adapter))
    (tmp / "train.yaml").write_text(yaml.safe_dump(keys, sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": str(keys.get("threads", 1))}
    proc = subprocess.run([sys.executable, "-m", "diffpref.app.learn", str(tmp / "train.yaml")], env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"training round {out.name} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    exported = _adapter_in(tmp / "train")
    shutil.move(str(exported), str(tmp / "adapter"))
    os.replace(tmp, out)  # atomic on one file system: the round folder is whole or absent
    return out / "adapter"


def _adapter_in(folder: Path) -> Path:
    from diffpref.personalize.adapter import CONFIG_NAME

    if (folder / CONFIG_NAME).exists():
        return folder
    found = sorted(p.parent for p in folder.rglob(CONFIG_NAME))
    if not found:
        raise RuntimeError(f"the trainer wrote no PPD adapter under {folder}")
    return found[-1]


@torch.no_grad()
def implicit_accuracy(pipe, people: list[tuple[list, list]], draws: int = 2, seed: int = 0) -> tuple[float, int]:
    """Share of held-out pairs whose Diffusion-DPO implicit reward agrees with the person's choice.

    ``people``: per person, (examples, held-out pairs); examples are ``UserExample`` (their training
    ratings, which make their tokens) and a held-out pair is (prompt, chosen image, other image).
    A pair agrees when the personalized model lowers the denoising error of the chosen image more
    than that of the other, relative to the base model, summed over ``draws`` (t, noise) draws that
    are the same for every adapter judged (Wallace et al. 2023, eq. 14)."""
    from diffpref.models.loading import native_resolution
    from diffpref.personalize.attention import concat_user_tokens, set_user_scale
    from diffpref.personalize.encoder import embed_user
    from diffpref.training.conditioning import encode_images

    unet, alphas = pipe.unet, pipe.scheduler.alphas_cumprod
    agree, total = 0, 0
    for k, (examples, pairs) in enumerate(people):
        if not examples or not pairs:
            continue
        tokens = embed_user(pipe.user_encoder, pipe.backbone, examples).cpu().unsqueeze(0)
        images = np.concatenate([np.stack([np.asarray(a), np.asarray(b)]) for _, a, b in pairs])
        latents = encode_images(pipe.vae, images, native_resolution(pipe))
        text, _ = pipe.encode_prompt([p for p, _, _ in pairs], pipe.device, 1, False)
        text = text.repeat_interleave(2, dim=0)
        gen = torch.Generator().manual_seed(seed + k)
        margin = torch.zeros(len(pairs))
        for _ in range(draws):
            t = torch.randint(50, 950, (len(pairs),), generator=gen).repeat_interleave(2)
            noise = torch.randn(len(pairs), *latents.shape[1:], generator=gen).repeat_interleave(2, dim=0)
            a = alphas[t].view(-1, 1, 1, 1)
            x_t = a.sqrt() * latents + (1 - a).sqrt() * noise
            errors = []
            for user in (tokens, None):
                set_user_scale(unet, 0.0 if user is None else 1.0)
                cond = concat_user_tokens(text, None if user is None else user.to(text.dtype), pipe.num_user_tokens)
                errors.append((unet(x_t, t, encoder_hidden_states=cond).sample - noise).pow(2).mean(dim=(1, 2, 3)))
            gain = (errors[0] - errors[1]).view(-1, 2)  # < 0: the person's model fits the image better than the base
            margin += gain[:, 0] - gain[:, 1]
        agree += int((margin < 0).sum())
        total += len(pairs)
    set_user_scale(unet, 1.0)
    return (agree / total if total else float("nan")), total


def _rounded(value: float) -> float | None:
    return None if np.isnan(value) else round(value, 4)  # NaN (nothing held out) is not valid JSON


class Learner:
    """The background fine-tuning loop of one ``RatingService`` (started by ``AppConfig.learn``)."""

    def __init__(self, service, start_thread: bool = True):
        from diffpref.personalize.adapter import resolve_adapter

        self.service = service
        self.config = service.config
        self.dir = Path(self.config.learn_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.adapter = str(resolve_adapter(self.config.adapter))
        self.rounds = len(list(self.dir.glob("round-*[0-9]")))
        self.last_decided = 0
        self._trained: dict[str, int] = {}  # person -> their ratings in the served adapter's training data
        self.last_candidate = None  # the last round's pipeline, served or not (the simulation judges it too)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = None
        if start_thread:
            self._thread = threading.Thread(target=self._loop, name="diffpref-learn", daemon=True)
            self._thread.start()

    def notify(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)  # a round in progress finishes in its child process; it is not served

    def trained_on(self, user_id: str) -> int:
        return self._trained.get(user_id, 0)

    def _decided(self) -> int:
        with sqlite3.connect(self.service.store.path) as conn:
            return conn.execute("SELECT COUNT(*) FROM ratings WHERE label IN (0.0, 1.0)").fetchone()[0]

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=30)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                if self._decided() - self.last_decided >= self.config.learn_every:
                    self.run_round()
            except Exception:  # a failed round leaves the served adapter as it was
                log.exception("learning round %d failed", self.rounds)

    def run_round(self) -> dict:
        """Snapshot, train, judge, and serve the new adapter if it is at least as good; returns the log row."""
        from diffpref.models.loading import load_pipeline
        from diffpref.personalize.pipeline import PersonalizedPipeline

        started, name = time.time(), f"round-{self.rounds:04d}"
        self.last_decided = self._decided()
        data = self.dir / f"{name}.data" / "ratings.db"
        held = snapshot(self.service.store.path, data, self.config.learn_holdout)
        trained_counts = self._train_counts(data)
        try:
            adapter = train_round(str(self.config.model), self.adapter, data, self.dir / name, self.config.learn_config)
        finally:
            shutil.rmtree(data.parent, ignore_errors=True)
        self.rounds += 1
        people = self._judged_people(held)
        candidate = PersonalizedPipeline.from_base(load_pipeline(self.config.model, device=self.config.device), adapter)
        candidate.set_progress_bar_config(disable=True)
        self.last_candidate = candidate
        new_acc, n = implicit_accuracy(candidate, people)
        with self.service._model_lock:  # the served UNet's user scale is set during the pass
            old_acc, _ = implicit_accuracy(self.service.pipe, people)
        serve = n >= MIN_HELD_OUT and new_acc >= old_acc
        row = {"round": name, "decided": self.last_decided, "held_out": n, "accuracy_new": _rounded(new_acc),
               "accuracy_served": _rounded(old_acc), "served": serve, "seconds": round(time.time() - started, 1)}
        if serve:
            self.adapter = str(adapter)
            self._trained = trained_counts
            self.service.swap_pipeline(candidate, updated=time.time())
        with open(self.dir / "rounds.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        log.info("learning %s", row)
        return row

    @staticmethod
    def _train_counts(data: Path) -> dict[str, int]:
        with sqlite3.connect(data) as conn:
            rows = conn.execute("SELECT user_id, COUNT(*) FROM ratings WHERE label IN (0.0, 1.0) GROUP BY user_id")
            return dict(rows.fetchall())

    def _judged_people(self, held: dict[str, list[dict]]) -> list[tuple[list, list]]:
        """Per person with held-out ratings: (examples from their training ratings, held-out pairs)."""
        from diffpref.app.service import from_png
        from diffpref.personalize.backbones import UserExample

        store, people = self.service.store, []
        for user_id, ratings in held.items():
            out = {r["rating_id"] for r in ratings}
            examples = []
            for r in store.ratings_for(user_id):
                if r["label"] in (0.0, 1.0) and r["rating_id"] not in out:
                    good, bad = (r["image_0"], r["image_1"]) if r["label"] == 1.0 else (r["image_1"], r["image_0"])
                    examples.append(UserExample(r["prompt"], from_png(store.get_image(user_id, good)),
                                                from_png(store.get_image(user_id, bad))))
            pairs = []
            for r in ratings:
                pair = store.get_pair(user_id, r["pair_id"])
                good, bad = (pair["image_0"], pair["image_1"]) if r["label"] == 1.0 else (pair["image_1"], pair["image_0"])
                pairs.append((pair["prompt"], from_png(store.get_image(user_id, good)),
                              from_png(store.get_image(user_id, bad))))
            people.append((examples[-self.config.max_examples:], pairs))
        return people


def _train_main(config_path: str) -> int:
    """The child process of a round: ``python -m diffpref.app.learn ROUND/train.yaml``."""
    from diffpref.config import load_config
    from diffpref.personalize.training import PPDConditioner
    from diffpref.training.config import TrainConfig
    from diffpref.training.trainer import train

    cfg = load_config(TrainConfig, config_path)
    train(cfg, conditioner=PPDConditioner(cfg))
    return 0


if __name__ == "__main__":
    raise SystemExit(_train_main(sys.argv[1]))
