"""The rating app's logic, without any web framework: pairs ahead of time, ratings, the person's model.

``RatingService`` is what the Gradio server (``server.py``) calls. Every method takes the
*authenticated* user id as its first argument and leaves ownership checks to the store, so
the UI and the API cannot differ in what one person may see or change.

- Pairs are made ahead: each person has a small queue of generated, unrated pairs, topped up
  by a background thread after every rating. The queue *is* the store's pending pairs, so it
  survives restarts and ``next_pair`` is a database read (no model call) when the queue is full.
- A pair is chosen by ``pairs.select_pair`` (active learning on CLIP image embeddings) among
  ``candidates`` images of each of ``candidate_prompts`` prompts, both images from one prompt;
  or it is two images of one random prompt (random mode).
- The person's tokens come from their most recent decided ratings and are cached per set of
  ratings, so generating again after no new rating costs no encoder pass.
"""

from __future__ import annotations

import io
import logging
import queue
import threading
from collections import OrderedDict, deque
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffpref.app.config import AppConfig
from diffpref.app.pairs import all_pairs, fit_posterior, select_pair
from diffpref.app.profile import CLIP_PROBE_PROMPTS, WORLD_PROBE_PROMPTS, clip_profile, world_profile
from diffpref.app.store import RatingConflictError, RatingStore
from diffpref.app.validation import check_choice
from diffpref.personalize.backbones import UserExample

log = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 300
MAX_SEED = 2**31 - 1
MAX_USER_SCALE = 2.0
# Prompts for real models' pairs when none are given (world models sample world captions).
GENERIC_PROMPTS = (
    "a cat sitting on a windowsill", "a mountain lake at sunrise", "a bowl of fruit on a table",
    "a portrait of an old sailor", "a futuristic city at night", "a cozy reading nook", "a red sports car",
    "a forest path in autumn", "a lighthouse in a storm", "a cup of coffee and a croissant",
    "a fantasy castle on a hill", "a robot painting a picture", "a field of sunflowers", "a snowy village street",
)


def check_prompt(prompt: Any) -> str:
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be text, got {type(prompt).__name__}")
    text = " ".join(prompt.split())  # newlines and tabs become spaces
    if not text:
        raise ValueError("prompt is empty")
    if len(text) > MAX_PROMPT_CHARS:
        raise ValueError(f"prompt is {len(text)} characters long; the limit is {MAX_PROMPT_CHARS}")
    if not text.isprintable():
        raise ValueError("prompt contains control characters")
    return text


def check_seed(seed: Any) -> int:
    if isinstance(seed, float) and seed.is_integer():
        seed = int(seed)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, {MAX_SEED}], got {seed!r}")
    return seed


def check_scale(scale: Any) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0.0 <= float(scale) <= MAX_USER_SCALE:
        raise ValueError(f"user scale must be a number in [0, {MAX_USER_SCALE}], got {scale!r}")
    return float(scale)


def to_png(image: Image.Image | np.ndarray) -> bytes:
    buffer = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def from_png(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


class RatingService:
    """Pairs, ratings, generations and profiles for many people at once (thread-safe)."""

    def __init__(self, config: AppConfig, pipe=None, store: RatingStore | None = None, start_worker: bool = True):
        self.config = config
        if pipe is None:
            from diffpref.models.loading import load_pipeline
            from diffpref.personalize.pipeline import PersonalizedPipeline

            pipe = PersonalizedPipeline.from_base(load_pipeline(config.model, device=config.device), config.adapter)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        self.store = store if store is not None else RatingStore(config.db)
        self.steps = config.steps or (25 if config.is_world else 30)
        # A pair costs candidates x candidate_prompts images: at 25 steps on 2 CPU cores that is slower
        # than a person rates, and the queue runs dry. The world model's images are as faithful at 15.
        self.pair_steps = config.pair_steps or (min(15, self.steps) if config.is_world else self.steps)
        self.world = config.is_world if config.profile == "auto" else config.profile == "world"
        # A VLM backbone reads a whole set of examples at once: it has no per-image embedding for the
        # active pair choice or the CLIP probe profile, so pairs are random and the profile says why.
        self.image_features = getattr(pipe, "ppd_config", {}).get("backbone_kind", "open_clip") != "vlm"
        self.model_name = str(config.model)[:120]
        # The pipeline's attention processors hold the user scale: one generation at a time.
        self._model_lock = threading.RLock()
        self._state_lock = threading.Lock()
        self._user_locks: dict[str, threading.Lock] = {}
        self._rng = np.random.default_rng(config.seed)
        self._features: OrderedDict[str, np.ndarray] = OrderedDict()  # image id -> CLIP embedding
        self._tokens: dict[str, tuple[tuple, torch.Tensor]] = {}  # user -> (ratings key, tokens)
        self._base_cache: OrderedDict[tuple, Image.Image] = OrderedDict()
        self._profiles: dict[str, tuple[tuple, dict]] = {}
        self._recent: dict[str, deque] = {}
        self._wanted: queue.Queue[str | None] = queue.Queue()
        self._queued: set[str] = set()
        self._stop = threading.Event()
        self._worker = None
        if start_worker:
            self._worker = threading.Thread(target=self._fill_queues, name="diffpref-pairs", daemon=True)
            self._worker.start()

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        self._stop.set()
        self._wanted.put(None)
        if self._worker is not None:
            self._worker.join(timeout=30)
        self.store.close()

    def _user_lock(self, user_id: str) -> threading.Lock:
        with self._state_lock:
            return self._user_locks.setdefault(user_id, threading.Lock())

    # ------------------------------------------------------------------ people
    def login(self, user_id: str, display_name: str | None = None) -> dict:
        """Create the person if new (the store validates the id) and start filling their pair queue."""
        user = self.store.ensure_user(user_id, display_name)
        self.request_pairs(user_id)
        return {**user, "ratings": self.store.count_ratings(user_id)}

    # ------------------------------------------------------------------ pairs
    def request_pairs(self, user_id: str) -> None:
        """Ask the background thread to top up this person's queue (no-op if already asked)."""
        with self._state_lock:
            if user_id in self._queued:
                return
            self._queued.add(user_id)
        self._wanted.put(user_id)

    def _fill_queues(self) -> None:
        while not self._stop.is_set():
            user_id = self._wanted.get()
            if user_id is None:
                return
            with self._state_lock:
                self._queued.discard(user_id)
            try:
                self.fill_queue(user_id)
            except Exception:  # a failed generation must not stop every person's queue
                log.exception("filling the pair queue of %s failed", user_id)

    def fill_queue(self, user_id: str) -> int:
        """Make pairs until ``queue_size`` are waiting; returns how many were made."""
        made = 0
        with self._user_lock(user_id):
            while not self._stop.is_set() and len(self.store.pending_pairs(user_id)) < self.config.queue_size:
                self._make_pair(user_id)
                made += 1
        return made

    def next_pair(self, user_id: str) -> dict:
        """The person's oldest unrated pair (made now if the queue is empty): pair_id, prompt, PIL images."""
        pending = self.store.pending_pairs(user_id)
        if not pending:
            with self._user_lock(user_id):
                pending = self.store.pending_pairs(user_id)
                if not pending:
                    self._make_pair(user_id)
                    pending = self.store.pending_pairs(user_id)
        self.request_pairs(user_id)
        pair = pending[0]
        return {"pair_id": pair["pair_id"], "prompt": pair["prompt"],
                "left": from_png(self.store.get_image(user_id, pair["image_0"])),
                "right": from_png(self.store.get_image(user_id, pair["image_1"])),
                "waiting": len(pending), "ratings": self.store.count_ratings(user_id)}

    def _sample_prompt(self) -> str:
        with self._state_lock:
            if self.world or self.config.pair_images == "render":
                from diffpref.world.captions import sample_prompt

                return sample_prompt(self._rng)
            return GENERIC_PROMPTS[int(self._rng.integers(len(GENERIC_PROMPTS)))]

    def _candidate_images(self, user_id: str, prompts: list[str], seeds: list[int],
                          per_prompt: int) -> tuple[list[np.ndarray], list[str]]:
        """One image per (prompt, seed); ``prompts`` comes in runs of ``per_prompt`` equal prompts."""
        if self.config.pair_images == "render":
            from diffpref.world.captions import parse_caption
            from diffpref.world.render import render, sample_attributes

            return ([np.asarray(render(sample_attributes(np.random.default_rng(s), **parse_caption(p))))
                     for p, s in zip(prompts, seeds)], ["world-render"] * len(seeds))
        # Once the person has a model, half of each prompt's candidates come from it: pairs then also
        # compare base and personalized images, and refine the taste rather than only the base's range.
        # One batched call per scale (a batch of 4 costs about two single images on CPU).
        tokens = self.user_tokens(user_id)
        personal = [tokens is not None and k % per_prompt >= per_prompt - per_prompt // 2 for k in range(len(seeds))]
        base_at = [k for k, p in enumerate(personal) if not p]
        personal_at = [k for k, p in enumerate(personal) if p]
        images: list = [None] * len(seeds)
        for at, user, scale in ((base_at, None, 0.0), (personal_at, tokens, 1.0)):
            if at:
                made = self._generate([prompts[k] for k in at], [seeds[k] for k in at], user, scale, self.pair_steps)
                for k, image in zip(at, made):
                    images[k] = image
        models = [f"{self.model_name}+ppd@1.00" if p else self.model_name for p in personal]
        return images, models

    def _make_pair(self, user_id: str) -> str:
        active = self.config.pair_mode == "active" and self.image_features
        # Active mode looks at several prompts: a prompt that names what the person cares about gives
        # candidates that all look alike to them, and BALD then prefers another prompt's pair.
        groups = self.config.candidate_prompts if active else 1
        per_prompt = self.config.candidates if active else 2
        prompts = [p for p in (self._sample_prompt() for _ in range(groups)) for _ in range(per_prompt)]
        with self._state_lock:
            seeds = [int(s) for s in self._rng.integers(0, MAX_SEED, size=len(prompts))]
            rng = np.random.default_rng(self._rng.integers(2**63))
        images, models = self._candidate_images(user_id, prompts, seeds, per_prompt)
        if active:
            features = self._embed(images)
            within_prompt = [(g * per_prompt + i, g * per_prompt + j) for g in range(groups) for i, j in all_pairs(per_prompt)]
            choice = select_pair(features, self.posterior(user_id), rng, "active", pairs=within_prompt)
            first, second = choice.first, choice.second
        else:
            first, second, features = 0, 1, None
        if rng.random() < 0.5:  # which image is shown on the left says nothing about the selection
            first, second = second, first
        prompt = prompts[first]
        ids = [self.store.add_image(user_id, prompt, to_png(images[k]), models[k], seeds[k]) for k in (first, second)]
        if features is not None:
            self._remember_features(ids, features[[first, second]])
        return self.store.add_pair(user_id, prompt, ids[0], ids[1])

    # ------------------------------------------------------------------ active learning
    def _embed(self, images: list) -> np.ndarray:
        with self._model_lock:
            return self.pipe.backbone.embed_images(images).cpu().numpy().astype(np.float64)

    def _remember_features(self, image_ids: list[str], features: np.ndarray) -> None:
        with self._state_lock:
            for image_id, f in zip(image_ids, features):
                self._features[image_id] = f
            while len(self._features) > 100_000:
                self._features.popitem(last=False)

    def _image_features(self, user_id: str, image_ids: list[str]) -> np.ndarray:
        with self._state_lock:
            missing = [i for i in image_ids if i not in self._features]
        if missing:  # e.g. after a restart: re-embed from the store (owner-checked)
            embedded = self._embed([from_png(self.store.get_image(user_id, i)) for i in missing])
            self._remember_features(missing, embedded)
        with self._state_lock:
            return np.stack([self._features[i] for i in image_ids])

    def posterior(self, user_id: str):
        """The Laplace posterior of the person's preference weights over CLIP image embeddings."""
        rated = [r for r in self.store.ratings_for(user_id) if r["label"] is not None]
        if not rated:
            return None
        first = self._image_features(user_id, [r["image_0"] for r in rated])
        second = self._image_features(user_id, [r["image_1"] for r in rated])
        return fit_posterior(first - second, np.array([r["label"] for r in rated]), self.config.prior_std)

    # ------------------------------------------------------------------ ratings
    def rate(self, user_id: str, pair_id: str, choice: str) -> dict:
        """Store the choice durably (the store checks the pair is this person's) and refill their queue."""
        result = self.store.rate(user_id, pair_id, check_choice(choice))
        self.request_pairs(user_id)
        return {**result, "ratings": self.store.count_ratings(user_id)}

    def user_tokens(self, user_id: str) -> torch.Tensor | None:
        """The person's tokens from their most recent decided ratings; None before the first one."""
        decided = [r["rating_id"] for r in self.store.ratings_for(user_id) if r["choice"] in ("left", "right")]
        key = tuple(decided[-self.config.max_examples:])
        if not key:
            return None
        cached = self._cached_tokens(user_id, key)
        if cached is not None:
            return cached
        rows = self.store.rated_examples(user_id, limit=self.config.max_examples)
        examples = [UserExample(prompt, from_png(good), from_png(bad)) for prompt, good, bad in rows]
        with self._model_lock:
            # Checked again under the model lock: the pair thread and a request can both miss the cache
            # for the same ratings, and the second must get the first one's tokens, not embed again.
            cached = self._cached_tokens(user_id, key)
            if cached is not None:
                return cached
            # The pipeline's own cache would keep every set ever seen; here one entry per person.
            from diffpref.personalize.encoder import embed_user

            tokens = embed_user(self.pipe.user_encoder, self.pipe.backbone, examples).cpu()
            with self._state_lock:
                self._tokens[user_id] = (key, tokens)
        return tokens

    def _cached_tokens(self, user_id: str, key: tuple) -> torch.Tensor | None:
        with self._state_lock:
            cached = self._tokens.get(user_id)
        return cached[1] if cached is not None and cached[0] == key else None

    # ------------------------------------------------------------------ generation
    def _generate(self, prompts: list[str], seeds: list[int], tokens: torch.Tensor | None,
                  scale: float, steps: int | None = None) -> list[np.ndarray]:
        from diffpref.generate import generate_images

        kwargs = {"user_embedding": tokens, "user_scale": scale} if tokens is not None and scale > 0 else {}
        with self._model_lock:
            return list(generate_images(self.pipe, prompts, seeds, steps=steps or self.steps,
                                        guidance_scale=self.config.guidance_scale, **kwargs))

    def _base_image(self, prompt: str, seed: int) -> Image.Image:
        key = (prompt, seed)
        with self._state_lock:
            if key in self._base_cache:
                self._base_cache.move_to_end(key)
                return self._base_cache[key]
        image = Image.fromarray(self._generate([prompt], [seed], None, 0.0)[0])
        with self._state_lock:
            self._base_cache[key] = image
            while len(self._base_cache) > 256:
                self._base_cache.popitem(last=False)
        return image

    def generate(self, user_id: str, prompt: str, seed: int, user_scale: float = 1.0) -> dict:
        """Base and personalized images of one prompt and seed; the personalized one is kept as theirs.

        Before the person's first decided rating there is no personalized image (``personalized`` None).
        """
        prompt, seed, scale = check_prompt(prompt), check_seed(seed), check_scale(user_scale)
        self.store.ensure_user(user_id)
        base = self._base_image(prompt, seed)
        tokens = self.user_tokens(user_id)
        personalized, image_id = None, None
        if tokens is not None:
            personalized = Image.fromarray(self._generate([prompt], [seed], tokens, scale)[0])
            with self._state_lock:
                recent = self._recent.setdefault(user_id, deque(maxlen=self.config.recent))
                key = (prompt, seed, scale, self._tokens[user_id][0])
                # The same request again (e.g. a refresh with no new choice) is not a new generation.
                image_id = recent[0][0] if recent and recent[0][4] == key else None
            if image_id is None:
                image_id = self.store.add_image(user_id, prompt, to_png(personalized),
                                                f"{self.model_name}+ppd@{scale:.2f}", seed)
                with self._state_lock:
                    recent.appendleft((image_id, prompt, seed, scale, key))
        return {"base": base, "personalized": personalized, "image_id": image_id, "prompt": prompt, "seed": seed,
                "user_scale": scale, "examples": 0 if tokens is None else min(self.config.max_examples,
                                                                                 self._decided(user_id))}

    def _decided(self, user_id: str) -> int:
        return sum(r["choice"] in ("left", "right") for r in self.store.ratings_for(user_id))

    def recent(self, user_id: str) -> list[tuple[Image.Image, str]]:
        """The person's recent personalized generations, newest first (read back through the store)."""
        with self._state_lock:
            items = list(self._recent.get(user_id, ()))
        return [(from_png(self.store.get_image(user_id, image_id)), f"{prompt} (seed {seed}, scale {scale:g})")
                for image_id, prompt, seed, scale, _ in items]

    def last_prompt(self, user_id: str) -> str | None:
        rated = self.store.ratings_for(user_id)
        return rated[-1]["prompt"] if rated else None

    # ------------------------------------------------------------------ profile
    def profile(self, user_id: str, user_scale: float = 1.0, top: int | None = 8) -> dict:
        """What the person's tokens change, measured on neutral probe prompts (see ``profile.py``)."""
        scale = check_scale(user_scale)
        ratings, decided = self.store.count_ratings(user_id), self._decided(user_id)
        summary = {"user_id": user_id, "ratings": ratings, "decided": decided, "user_scale": scale}
        tokens = self.user_tokens(user_id)
        if tokens is None:
            return {**summary, "method": None, "attributes": [],
                    "message": "no decided rating yet: choose left or right on a pair to start your model"}
        key = (self._tokens[user_id][0], scale, top)
        with self._state_lock:
            cached = self._profiles.get(user_id)
        if cached is not None and cached[0] == key:
            return {**summary, **cached[1]}
        if not self.world and not self.image_features:
            return {**summary, "method": None, "attributes": [],
                    "message": "this adapter's VLM backbone has no per-image embedding to describe the change with"}
        prompts_list = WORLD_PROBE_PROMPTS if self.world else CLIP_PROBE_PROMPTS
        prompts = [p for p in prompts_list for _ in range(self.config.profile_seeds)]
        seeds = [s for _ in prompts_list for s in range(self.config.profile_seeds)]
        base = np.stack([np.asarray(self._base_image(p, s)) for p, s in zip(prompts, seeds)])
        pers = np.stack(self._generate(prompts, seeds, tokens, scale))
        if self.world:
            result = world_profile(base, pers, top=top)
        else:
            with self._model_lock:
                result = clip_profile(self.pipe.backbone, list(base), list(pers), top=top)
        with self._state_lock:
            self._profiles[user_id] = (key, result)
        return {**summary, **result}


__all__ = ["RatingService", "RatingConflictError", "check_prompt", "check_seed", "check_scale",
           "check_choice", "to_png", "from_png"]
