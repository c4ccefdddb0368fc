"""The rating app's logic, without any web framework: pairs ahead of time, ratings, the person's model.

``RatingService`` is what the Gradio server (``server.py``) calls. Every method takes the
*authenticated* user id as its first argument and leaves ownership checks to the store, so
the UI and the API cannot differ in what one person may see or change.

- Pairs come from a warm pool (``pool.py``): base-model candidate images that fit anyone, made in
  batched pipeline calls by a background thread while the app is idle. A person's next pair is a
  choice among pooled candidates and a database write (milliseconds), made right after each rating,
  so each person has ``queue_size`` pairs waiting. The queue *is* the store's pending pairs, so it
  survives restarts and ``next_pair`` is a database read. The pool grows whenever an active person
  runs low; only if it runs dry does a person wait for a generation (the UI then says so).
- A pair is chosen by ``pairs.select_pair`` (active learning on CLIP image embeddings) among the
  unseen candidates of ``candidate_prompts`` pooled prompts, both images from one prompt; or it is
  two random unseen candidates of one prompt (random mode). When idle, the thread also adds pairs
  with images of the person's own model (base vs. personalized) and recomputes their profile.
- The person's tokens come from their most recent decided ratings and are cached per set of
  ratings, so generating again after no new rating costs no encoder pass.
"""

from __future__ import annotations

import io
import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffpref.app.config import AppConfig
from diffpref.app.pairs import all_pairs, fit_posterior, select_pair
from diffpref.app.pool import CandidatePool
from diffpref.app.profile import CLIP_PROBE_PROMPTS, WORLD_PROBE_PROMPTS, clip_profile, world_profile
from diffpref.app.store import RatingConflictError, RatingStore
from diffpref.app.validation import check_choice
from diffpref.personalize.backbones import UserExample

log = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 300
MAX_SEED = 2**31 - 1
MAX_USER_SCALE = 2.0
IDLE_POLL_S = 0.25  # how often the idle worker looks for work when nobody asks for pairs
ACTIVE_S = 120.0  # a person seen this recently gets idle work (pool growth, profile, personal pairs)
LOW_WATER_PAIRS = 8  # the pool grows while an active person has fewer pairs' worth of candidates left
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


class _TasteReward:
    """The person's taste model as a best-of-N reward: score = w . CLIP image embedding."""

    def __init__(self, embed, weights: np.ndarray):
        self.embed, self.weights = embed, np.asarray(weights, np.float64)

    def score(self, images, prompts=None) -> np.ndarray:
        return self.embed(list(images)) @ self.weights


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
        self._active: dict[str, float] = {}  # person -> time.monotonic() of their last request
        self._personal_made: dict[str, tuple] = {}  # person -> ratings key of their last personal pair
        self._profile_wanted: dict[str, float] = {}  # person -> user scale of the profile they last opened
        self.pool = CandidatePool(config.pool_groups)
        self._grow_lock = threading.Lock()
        self.learner = None
        self._adapter_version = 0
        self._probe_base: np.ndarray | None = None  # the profile's base-model probe images (person-independent)
        self.adapter_updated: float | None = None  # time.time() the served adapter was swapped in (--learn)
        self._wanted: queue.Queue[str | None] = queue.Queue()
        self._queued: set[str] = set()
        self._stop = threading.Event()
        self._worker = None
        if config.learn:
            from diffpref.app.learn import Learner

            self.learner = Learner(self)
        if start_worker:
            self._worker = threading.Thread(target=self._fill_queues, name="diffpref-pairs", daemon=True)
            self._worker.start()

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        self._stop.set()
        self._wanted.put(None)
        if self._worker is not None:
            self._worker.join(timeout=30)
        if self.learner is not None:
            self.learner.stop()
        self.store.close()

    def _user_lock(self, user_id: str) -> threading.Lock:
        with self._state_lock:
            return self._user_locks.setdefault(user_id, threading.Lock())

    # ------------------------------------------------------------------ people
    def login(self, user_id: str, display_name: str | None = None) -> dict:
        """Create the person if new (the store validates the id) and fill their pair queue from the pool."""
        user = self.store.ensure_user(user_id, display_name)
        self._touch(user_id)
        self.request_pairs(user_id)
        return {**user, "ratings": self.store.count_ratings(user_id)}

    def _touch(self, user_id: str) -> None:
        with self._state_lock:
            self._active[user_id] = time.monotonic()

    def _active_people(self) -> list[str]:
        """People seen within ACTIVE_S, most recent first: whom idle work is for."""
        now = time.monotonic()
        with self._state_lock:
            recent = [(t, u) for u, t in self._active.items() if now - t < ACTIVE_S]
        return [u for _, u in sorted(recent, reverse=True)]

    # ------------------------------------------------------------------ pairs
    def request_pairs(self, user_id: str) -> None:
        """Top up this person's queue from the pool now (milliseconds); the worker grows the pool if it runs low."""
        if self._worker is not None:
            self.top_up(user_id)
        with self._state_lock:
            if user_id in self._queued:
                return
            self._queued.add(user_id)
        self._wanted.put(user_id)

    def top_up(self, user_id: str) -> int:
        """Make pairs from pooled candidates, without a model call, until ``queue_size`` wait; returns how many."""
        made = 0
        with self._user_lock(user_id):
            while (len(self.store.pending_pairs(user_id)) < self.config.queue_size
                   and self.pool.available(user_id) >= self._groups_per_pair):
                self._make_pair(user_id)
                made += 1
        return made

    def _fill_queues(self) -> None:
        """The background thread: fill queues when asked; otherwise, one piece of idle work at a time."""
        while not self._stop.is_set():
            try:
                user_id = self._wanted.get(timeout=IDLE_POLL_S)
            except queue.Empty:
                user_id = ""
            if user_id is None:
                return
            try:
                if user_id:
                    with self._state_lock:
                        self._queued.discard(user_id)
                    self.fill_queue(user_id)
                if self._wanted.empty():
                    self._idle_step()
            except Exception:  # a failed generation must not stop every person's queue
                log.exception("background pair work failed (person %r)", user_id)

    def fill_queue(self, user_id: str) -> int:
        """Make pairs until ``queue_size`` are waiting (growing the pool when it runs dry); returns how many."""
        made = 0
        while not self._stop.is_set() and len(self.store.pending_pairs(user_id)) < self.config.queue_size:
            if self.pool.available(user_id) < self._groups_per_pair:
                # Outside the person's lock: their own requests keep taking pooled pairs meanwhile.
                self._grow_pool()
            made += self.top_up(user_id)
        return made

    def _idle_step(self) -> bool:
        """One piece of idle work, most urgent first; False when there was nothing to do."""
        people = self._active_people()
        # 1. Every active person at least two pairs ahead in the pool.
        if any(self.pool.available(u) < 2 * self._groups_per_pair for u in people):
            self._grow_pool()
            return True
        # 2. A first profile for people with a model (once), so that opening it later shows one at once.
        if any(self._refresh_profile(u, first_only=True) for u in people):
            return True
        # 3. Every active person `low_water` pairs ahead.
        low_water = self._groups_per_pair * LOW_WATER_PAIRS
        if any(self.pool.available(u) < low_water for u in people):
            self._grow_pool()
            return True
        # 4. The pool full, and the base model's probe images of the profile, for whoever comes next.
        if len(self.pool) < self.pool.max_groups:
            self._grow_pool()
            return True
        if (self.world or self.image_features) and self._probe_base is None:
            self._probe_images()
            return True
        # 5. Profiles that people have opened, after their newer choices.
        if any(self._refresh_profile(u) for u in people):
            return True
        # 6. A pair with images of the person's own model (base vs. personalized), behind the queue.
        for user_id in people:
            if self._personal_pair_due(user_id):
                self._make_personal_pair(user_id)
                return True
        return False

    def next_pair(self, user_id: str) -> dict:
        """The person's oldest unrated pair (made now if the queue is empty): pair_id, prompt, PIL images."""
        self._touch(user_id)
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

    @property
    def warm(self) -> bool:
        """Whether the idle work for newcomers is done: the pool full and the profile's probe images made."""
        probes = self._probe_base is not None or not (self.world or self.image_features)
        return len(self.pool) >= self.pool.max_groups and probes

    def pair_ready(self, user_id: str) -> bool:
        """Whether ``next_pair`` returns without generating (the UI says so when it will not)."""
        return bool(self.store.pending_pairs(user_id)) or self.pool.available(user_id) >= self._groups_per_pair

    @property
    def _active_mode(self) -> bool:
        return self.config.pair_mode == "active" and self.image_features

    @property
    def _groups_per_pair(self) -> int:
        # Active mode looks at several prompts: a prompt that names what the person cares about gives
        # candidates that all look alike to them, and BALD then prefers another prompt's pair.
        return self.config.candidate_prompts if self._active_mode else 1

    def _sample_prompt(self) -> str:
        with self._state_lock:
            if self.world or self.config.pair_images == "render":
                from diffpref.world.captions import sample_prompt

                return sample_prompt(self._rng)
            return GENERIC_PROMPTS[int(self._rng.integers(len(GENERIC_PROMPTS)))]

    def _grow_pool(self) -> None:
        """One batched call: ``pool_batch`` prompts x ``candidates`` base images, for everyone."""
        if not self._grow_lock.acquire(blocking=False):
            with self._grow_lock:  # another thread is growing it: wait for its groups instead
                return
        try:
            per_prompt = self.config.candidates
            prompts = [self._sample_prompt() for _ in range(self.config.pool_batch)]
            with self._state_lock:
                seeds = [int(s) for s in self._rng.integers(0, MAX_SEED, size=len(prompts) * per_prompt)]
            flat = [p for p in prompts for _ in range(per_prompt)]
            images = self._candidate_images(flat, seeds)
            features = self._embed(images) if self._active_mode else None  # random pairs need no features
            for g, prompt in enumerate(prompts):
                at = slice(g * per_prompt, (g + 1) * per_prompt)
                self.pool.add(prompt, seeds[at], images[at], None if features is None else features[at])
        finally:
            self._grow_lock.release()

    def _candidate_images(self, prompts: list[str], seeds: list[int]) -> list[np.ndarray]:
        """Base-model images (or clean world renders), one per (prompt, seed), in one batched call."""
        if self.config.pair_images == "render":
            from diffpref.world.captions import parse_caption
            from diffpref.world.render import render, sample_attributes

            return [np.asarray(render(sample_attributes(np.random.default_rng(s), **parse_caption(p))))
                    for p, s in zip(prompts, seeds)]
        return self._generate(prompts, seeds, None, 0.0, self.pair_steps)

    def _personal_pair_due(self, user_id: str) -> bool:
        """A personal pair waits behind the queue once per new rating, for people who have a model."""
        if self.config.pair_images == "render" or self.pool.available(user_id) < 1:
            return False
        key = self._ratings_key(user_id)
        with self._state_lock:
            done = self._personal_made.get(user_id) == key
        return (not done and bool(key) and len(self.store.pending_pairs(user_id)) <= self.config.queue_size)

    def _make_personal_pair(self, user_id: str) -> None:
        """Generate images of one pooled prompt with the person's model, then (only then) take their lock:
        their ratings keep getting pooled pairs while the generation runs."""
        with self._state_lock:
            rng = np.random.default_rng(self._rng.integers(2**63))
        chosen = self.pool.candidates(user_id, 1, rng)
        if not chosen:
            return
        group = chosen[0][0]
        extra = self._personal_candidates(user_id, group.prompt, rng)
        if extra:
            with self._user_lock(user_id):
                self._make_pair(user_id, personal=(group, extra))

    def _make_pair(self, user_id: str, personal: tuple | None = None) -> str:
        """Choose the most informative pair among pooled candidates (or, with ``personal`` = (group, images of
        the person's own model of that group's prompt), among those) and store it at the back of their queue."""
        with self._state_lock:
            rng = np.random.default_rng(self._rng.integers(2**63))
        if personal is not None:
            chosen = [(personal[0], personal[0].unused(user_id))]
        else:
            wanted = self._groups_per_pair
            chosen = self.pool.candidates(user_id, wanted, rng)
            if len(chosen) < wanted:  # the pool ran dry for this person: grow it now (they wait)
                self._grow_pool()
                chosen = self.pool.candidates(user_id, wanted, rng)
        # Candidates: (group or None, index in group, image, feature, model, seed, prompt)
        sets = [[(g, k, g.images[k], None if g.features is None else g.features[k], self.model_name, g.seeds[k], g.prompt)
                 for k in idx] for g, idx in chosen]
        if personal is not None:
            sets[0] += personal[1]
        flat = [c for s in sets for c in s]
        starts = np.cumsum([0] + [len(s) for s in sets])
        within = [(int(starts[s]) + i, int(starts[s]) + j) for s in range(len(sets)) for i, j in all_pairs(len(sets[s]))]
        if self._active_mode:
            features = np.stack([c[3] for c in flat])
            choice = select_pair(features, self.posterior(user_id), rng, "active", pairs=within)
            first, second = choice.first, choice.second
        else:
            first, second = within[int(rng.integers(len(within)))]
        if rng.random() < 0.5:  # which image is shown on the left says nothing about the selection
            first, second = second, first
        for group, k, *_ in (flat[first], flat[second]):
            if group is not None:
                self.pool.take(user_id, group, (k,))
        prompt = flat[first][6]
        ids = [self.store.add_image(user_id, prompt, to_png(flat[k][2]), flat[k][4], flat[k][5]) for k in (first, second)]
        if self._active_mode:
            self._remember_features(ids, np.stack([flat[first][3], flat[second][3]]))
        return self.store.add_pair(user_id, prompt, ids[0], ids[1])

    def _personal_candidates(self, user_id: str, prompt: str, rng: np.random.Generator) -> list[tuple]:
        """``candidates // 2`` images of ``prompt`` from the person's model: pairs then also compare base and
        personalized images, and refine the taste rather than only the base model's range."""
        key, tokens = self._ratings_key(user_id), self.user_tokens(user_id)
        with self._state_lock:
            self._personal_made[user_id] = key
        if tokens is None:
            return []
        seeds = [int(s) for s in rng.integers(0, MAX_SEED, size=max(1, self.config.candidates // 2))]
        images = self._generate([prompt] * len(seeds), seeds, tokens, 1.0, self.pair_steps)
        features = self._embed(images) if self._active_mode else [None] * len(images)
        model = f"{self.model_name}+ppd@1.00"
        return [(None, None, im, f, model, s, prompt) for im, f, s in zip(images, features, seeds)]

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
        self._touch(user_id)
        self.request_pairs(user_id)
        if self.learner is not None:
            self.learner.notify()
        return {**result, "ratings": self.store.count_ratings(user_id)}

    def _ratings_key(self, user_id: str) -> tuple:
        """What the person's tokens depend on: their recent decided ratings and the adapter being served."""
        decided = [r["rating_id"] for r in self.store.ratings_for(user_id) if r["choice"] in ("left", "right")]
        key = tuple(decided[-self.config.max_examples:])
        return (self._adapter_version, *key) if key else ()

    def user_tokens(self, user_id: str) -> torch.Tensor | None:
        """The person's tokens from their most recent decided ratings; None before the first one."""
        key = self._ratings_key(user_id)
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

    # ------------------------------------------------------------------ the served adapter (--learn)
    def swap_pipeline(self, pipe, updated: float) -> None:
        """Serve ``pipe`` (a new adapter on the same base model) from now on; cached tokens and profiles go.

        Pooled candidates stay: they are base-model images, and the image backbone is the adapter's
        frozen one, so their features do not change either."""
        pipe.set_progress_bar_config(disable=True)
        with self._model_lock:
            self.pipe = pipe
            with self._state_lock:
                self._adapter_version += 1
                self._tokens.clear()
                self.adapter_updated = updated

    def model_info(self, user_id: str) -> str:
        """One line for the person's pages: which model serves them and when it last learned."""
        if self.adapter_updated is None:
            learning = "learns from ratings in the background" if self.learner is not None else "the shipped adapter"
            return f"Your model: {learning}; your choices personalize it at once."
        stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.adapter_updated))
        mine = self.learner.trained_on(user_id) if self.learner is not None else 0
        return f"Your model was last updated {stamp} (trained on {mine} of your choices)."

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

    def _personalized_image(self, user_id: str, prompt: str, seed: int, tokens: torch.Tensor,
                            scale: float) -> tuple[Image.Image, dict | None]:
        """The person's image of ``prompt`` and ``seed``, and the best-of-N record (None for one candidate).

        With ``best_of`` N > 1 the candidates are seeds seed .. seed+N-1 and the person's taste model (the
        Laplace posterior mean over CLIP image embeddings that also picks their pairs) ranks them: it reads
        any model's images, and on the world it ranks held-out pairs as well as the few-shot reward model
        (0.688 vs 0.704 from 4 choices, reports/reward.md)."""
        from diffpref.generate import best_of_n

        posterior = self.posterior(user_id) if self.config.best_of > 1 else None
        if posterior is None:
            return Image.fromarray(self._generate([prompt], [seed], tokens, scale)[0]), None
        reward = _TasteReward(self._embed, posterior.mean)
        images, records = best_of_n(lambda prompts, seeds: self._generate(prompts, seeds, tokens, scale),
                                    [prompt], [seed], self.config.best_of, reward)
        return Image.fromarray(images[0]), records[0]

    def generate(self, user_id: str, prompt: str, seed: int, user_scale: float = 1.0) -> dict:
        """Base and personalized images of one prompt and seed; the personalized one is kept as theirs.

        Before the person's first decided rating there is no personalized image (``personalized`` None).
        """
        prompt, seed, scale = check_prompt(prompt), check_seed(seed), check_scale(user_scale)
        self.store.ensure_user(user_id)
        self._touch(user_id)
        base = self._base_image(prompt, seed)
        tokens = self.user_tokens(user_id)
        personalized, image_id = None, None
        if tokens is not None:
            personalized, best_of = self._personalized_image(user_id, prompt, seed, tokens, scale)
            shown_seed = seed if best_of is None else best_of["seed"]
            with self._state_lock:
                recent = self._recent.setdefault(user_id, deque(maxlen=self.config.recent))
                key = (prompt, seed, scale, self._tokens[user_id][0], self.config.best_of)
                # The same request again (e.g. a refresh with no new choice) is not a new generation.
                image_id = recent[0][0] if recent and recent[0][4] == key else None
            if image_id is None:
                image_id = self.store.add_image(user_id, prompt, to_png(personalized),
                                                f"{self.model_name}+ppd@{scale:.2f}", shown_seed)
                with self._state_lock:
                    recent.appendleft((image_id, prompt, seed, scale, key))
        return {"base": base, "personalized": personalized, "image_id": image_id, "prompt": prompt, "seed": seed,
                "best_of": best_of if tokens is not None else None, "user_scale": scale, "examples": 0 if tokens is None else min(self.config.max_examples,
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
    def profile(self, user_id: str, user_scale: float = 1.0, top: int | None = 8, wait: bool | None = None) -> dict:
        """What the person's tokens change, measured on neutral probe prompts (see ``profile.py``).

        The background thread recomputes it after each new choice, so it is usually ready. If it is
        not, and an older one exists, that one comes back at once (``stale``: the number of choices it
        was made from is in ``decided_then``) unless ``wait``; the fresh one follows on the next call.
        ``wait`` defaults to True without a background thread (scripts, the simulation)."""
        scale = check_scale(user_scale)
        wait = self._worker is None if wait is None else wait
        ratings, decided = self.store.count_ratings(user_id), self._decided(user_id)
        summary = {"user_id": user_id, "ratings": ratings, "decided": decided, "user_scale": scale}
        key = self._ratings_key(user_id)
        if not key:
            return {**summary, "method": None, "attributes": [], "stale": False,
                    "message": "no decided rating yet: choose left or right on a pair to start your model"}
        if not self.world and not self.image_features:
            return {**summary, "method": None, "attributes": [], "stale": False,
                    "message": "this adapter's VLM backbone has no per-image embedding to describe the change with"}
        with self._state_lock:
            self._profile_wanted[user_id] = scale
            cached = self._profiles.get(user_id)
        if cached is not None and cached[0] == (key, scale, top):
            return {**summary, **cached[1], "stale": False}
        if cached is not None and cached[0][2] == top and not wait:
            # Older choices or another user scale (its own ``user_scale`` says which): shown now, remade next.
            self._touch(user_id)
            return {**summary, **cached[1], "stale": True}
        return {**summary, **self._compute_profile(user_id, key, scale, top), "stale": False}

    def _refresh_profile(self, user_id: str, first_only: bool = False) -> bool:
        """Idle work: make the person's first profile, or (unless ``first_only``) remake the one they
        opened if their choices changed since; False when there was nothing to do."""
        if not self.world and not self.image_features:
            return False
        key = self._ratings_key(user_id)
        with self._state_lock:
            opened = user_id in self._profile_wanted
            scale = self._profile_wanted.get(user_id, 1.0)
            cached = self._profiles.get(user_id)
        if not key or (cached is not None and (first_only or not opened or cached[0][:2] == (key, scale))):
            return False
        self._compute_profile(user_id, key, scale, 8)
        return True

    def _probe_images(self) -> tuple[list[str], list[int], np.ndarray]:
        """The profile's probe prompts, seeds and base-model images: the same for everyone, made once, batched.

        At the pairs' step count: the profile compares averages over many images, and the pairs'
        steps are chosen to be faithful enough to rate."""
        prompts_list = WORLD_PROBE_PROMPTS if self.world else CLIP_PROBE_PROMPTS
        prompts = [p for p in prompts_list for _ in range(self.config.profile_seeds)]
        seeds = [s for _ in prompts_list for s in range(self.config.profile_seeds)]
        if self._probe_base is None:
            self._probe_base = np.stack(self._generate(prompts, seeds, None, 0.0, self.pair_steps))
        return prompts, seeds, self._probe_base

    def _compute_profile(self, user_id: str, key: tuple, scale: float, top: int | None) -> dict:
        tokens = self.user_tokens(user_id)
        prompts, seeds, base = self._probe_images()
        pers = np.stack(self._generate(prompts, seeds, tokens, scale, self.pair_steps))
        if self.world:
            result = world_profile(base, pers, top=top)
        else:
            with self._model_lock:
                result = clip_profile(self.pipe.backbone, list(base), list(pers), top=top)
        result = {**result, "decided_then": self._decided(user_id), "user_scale": scale}
        with self._state_lock:
            self._profiles[user_id] = ((key, scale, top), result)
        return result


__all__ = ["RatingService", "RatingConflictError", "check_prompt", "check_seed", "check_scale",
           "check_choice", "to_png", "from_png"]
