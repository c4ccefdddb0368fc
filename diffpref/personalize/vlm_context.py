"""Few-shot context for PPD training with a vision-language backbone (``ppd_backbone`` = a transformers folder).

A VLM reads a whole context set in one prompt and returns one feature row for the set, so the
features of a user's context cannot be assembled from per-pair embeddings as with CLIP
(``context.py``). Instead, before training, ``build_vlm_context_bank`` samples ``ppd_vlm_subsets``
context sets per user (each of ``ppd_shots_min..ppd_shots_max`` of the user's base-image pairs,
cut to the VLM's token budget), runs the frozen VLM on each once and caches the rows beside the
latent cache. Every process embeds the sets of its own share of the users (users ``rank::world``)
into a shard; the main process merges the shards into one bank. During training a pair draws one
of its user's sets that does not contain it (the context never holds the pair being trained on),
so the head sees a "set" of one summary row. Set ``j`` of a user leaves out the user's pair
``j mod n`` on purpose, so with ``ppd_vlm_subsets >= n`` every pair has a set; a pair with none
(its user has < 2 base-image pairs, or fewer sets than pairs and all of them hold it) trains
without a user, counted in ``skip_message``.

Reading: the data is read once, chunk by chunk as the latent cache was built, for each row's user and
whether it may be context; a process keeps the (VLM-sized) images of its users' rows from that read
when they fit ``PAIRS_PER_PASS`` pairs. Otherwise the sets are embedded in groups that fit, and each
group reads only the chunks that hold its rows (``sources.chunk_seeks``: no scan from the start).
"""

from __future__ import annotations

import bisect
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from diffpref.personalize.backbones import UserExample
from diffpref.personalize.context import is_policy_model
from diffpref.training.cache import layout as _layout
from diffpref.training.cache.sources import chunk_seeks, iter_chunk_pairs, num_chunks

# Pairs whose (prepared) images are held in memory at once while sets are embedded; more needed
# pairs mean more groups, each reading only the chunks of the data that hold its rows, never more memory.
PAIRS_PER_PASS = 2048


@dataclass
class VLMContextBank:
    features: torch.Tensor    # [S, F] one VLM feature row per precomputed context set (stored in bfloat16)
    set_user: torch.Tensor    # [S] user index of each set
    set_rows: torch.Tensor    # [S, k_max] cache rows each set read (-1: padding)
    user_index: torch.Tensor  # [N] user index of every cache row

    summarizes_set = True

    def __post_init__(self):
        self.sets_of_user: dict[int, torch.Tensor] = {
            user: (self.set_user == user).nonzero().flatten() for user in self.set_user.unique().tolist()}
        # a row has context when its user has a set that does not contain it
        users = int(self.user_index.max()) + 1 if len(self.user_index) else 0
        sets_per_user = torch.zeros(users, dtype=torch.long).index_add_(
            0, self.set_user, torch.ones_like(self.set_user))
        used = self.set_rows[self.set_rows >= 0]
        containing = torch.zeros(len(self.user_index), dtype=torch.long).index_add_(0, used, torch.ones_like(used))
        self._has_context = sets_per_user[self.user_index] - containing > 0
        lone = ~self._has_context
        self.dropped_users = int(self.user_index[lone].unique().numel())
        self.dropped_pairs = int(lone.sum())

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def skip_message(self) -> str | None:
        if not self.dropped_pairs:
            return None
        return (f"PPD (VLM backbone): {self.dropped_pairs} of {len(self.user_index)} pairs ({self.dropped_users} users) "
                "have no precomputed context set that leaves them out (users with < 2 base-image pairs, or more "
                "pairs than ppd_vlm_subsets): they train without a user")

    def has_context(self, rows: torch.Tensor) -> torch.Tensor:
        return self._has_context[rows.cpu()]

    def sample_context(self, rows: torch.Tensor, generators: list[torch.Generator], k_min: int = 1,
                       k_max: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [B, 1, F], mask [B, 1]): one of each row's user's sets that leaves the row out.

        ``k_min``/``k_max`` were used when the sets were drawn; here a set is one row. A row without
        such a set gets a zero placeholder; the conditioner removes its user tokens (``has_context``).
        """
        batch = torch.zeros(len(rows), 1, self.feature_dim)
        for b, (row, gen) in enumerate(zip(rows.tolist(), generators)):
            sets = self.sets_of_user.get(int(self.user_index[row]), torch.empty(0, dtype=torch.long))
            sets = sets[~(self.set_rows[sets] == row).any(1)]
            if len(sets):
                batch[b, 0] = self.features[sets[int(torch.randint(len(sets), (1,), generator=gen))]].float()
        return batch, torch.ones(len(rows), 1, dtype=torch.bool)

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        save_file({"features": self.features.contiguous(), "set_user": self.set_user, "set_rows": self.set_rows,
                   "user_index": self.user_index}, str(tmp))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> VLMContextBank:
        return cls(**load_file(str(path)))


def sample_context_sets(user_index: torch.Tensor, context_ok: torch.Tensor, subsets: int, k_min: int, k_max: int,
                        seed: int) -> list[tuple[int, list[int]]]:
    """(user, rows) of every set, users in order. A user's sets depend only on (seed, user, its rows), never on
    how the users are shared among processes. Set ``j`` leaves out the user's pair ``j mod n``."""
    sets = []
    for user in user_index.unique().tolist():
        rows = ((user_index == user) & context_ok).nonzero().flatten()
        if len(rows) < 2:
            continue
        gen = torch.Generator().manual_seed(seed * 1_000_003 + int(user))
        for j in range(subsets):
            others = torch.cat([rows[: j % len(rows)], rows[j % len(rows) + 1:]])
            k = min(int(torch.randint(k_min, k_max + 1, (1,), generator=gen)), len(others))
            sets.append((int(user), others[torch.randperm(len(others), generator=gen)[:k]].tolist()))
    return sets


def _settings_key(backbone, cfg) -> str:
    text = json.dumps({**backbone.settings, "backbone": str(cfg.ppd_backbone), "subsets": cfg.ppd_vlm_subsets,
                       "shots": [cfg.ppd_shots_min, cfg.ppd_shots_max], "seed": cfg.seed}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _example(pair, backbone) -> UserExample:
    """The pair as a few-shot example (preferred image first), its images prepared for the VLM."""
    first, second = (pair.image_0, pair.image_1) if pair.label >= 0.5 else (pair.image_1, pair.image_0)
    return UserExample(pair.prompt, backbone.prepare_image(first), backbone.prepare_image(second))


class _CacheRows:
    """The latent cache's rows read back from its data, chunk by chunk, as the cache builder read them: chunk
    ``c`` holds cache rows ``starts[c] : starts[c] + counts[c]``; ``chunk_seeks`` lets a chunk be read alone."""

    def __init__(self, cache, cfg):
        self.data_path, self.tie_policy = cfg.data_path, cfg.tie_policy
        self.counts = list(cache.meta["chunks"]["rows"])
        chunk_rows = cache.meta["key_material"].get("chunk_rows")
        if chunk_rows != _layout.CHUNK_ROWS or len(self.counts) != num_chunks(self.data_path):
            raise RuntimeError(f"{cache.path} was cut into chunks of {chunk_rows} rows ({len(self.counts)} chunks) but "
                               f"{self.data_path} now gives {num_chunks(self.data_path)} of {_layout.CHUNK_ROWS}: the data "
                               "changed since the cache was built; delete the cache and rerun")
        self.starts = [0]
        for count in self.counts:
            self.starts.append(self.starts[-1] + count)
        self.seeks = chunk_seeks(self.data_path)

    def chunks_of(self, rows) -> list[int]:
        return sorted({bisect.bisect_right(self.starts, row) - 1 for row in rows})

    def pairs(self, chunks):
        """(cache row, pair) of every row of ``chunks`` (ascending), each chunk read once from where it starts."""
        for chunk in chunks:
            pairs = list(iter_chunk_pairs(self.data_path, chunk, self.seeks, self.tie_policy))
            if len(pairs) != self.counts[chunk]:
                raise RuntimeError(f"{self.data_path}: chunk {chunk} gives {len(pairs)} pairs but the latent cache "
                                   f"holds {self.counts[chunk]}: the data changed since the cache was built; delete "
                                   "the cache and rerun")
            yield from enumerate(pairs, start=self.starts[chunk])


def build_vlm_context_bank(cache, backbone, cfg, accelerator, progress: bool = True) -> VLMContextBank:
    """The precomputed context sets of every user (all processes call this: each embeds its share)."""
    folder = Path(cache.path) / f"vlm-context-{_settings_key(backbone, cfg)}"
    final = folder / "bank.safetensors"
    if final.exists():
        return VLMContextBank.load(final)
    folder.mkdir(parents=True, exist_ok=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    source = _CacheRows(cache, cfg)
    users = {u: i for i, u in enumerate(cache.users)}
    # One read of the data for who owns each row and which rows may be context; the images of this
    # process's users are kept (prepared, i.e. shrunk for the VLM) while they fit PAIRS_PER_PASS pairs.
    user_index, context_ok, held = [], [], {}
    for row, pair in source.pairs(range(len(source.counts))):
        user = users[pair.user_id]
        ok = not any(is_policy_model(pair.extras.get(k)) for k in ("model_0", "model_1"))
        user_index.append(user)
        context_ok.append(ok)
        if ok and held is not None and user % world == rank:
            held[row] = _example(pair, backbone)
            if len(held) > PAIRS_PER_PASS:
                held = None  # too many: each group of sets reads its own rows below
    user_index, context_ok = torch.tensor(user_index, dtype=torch.long), torch.tensor(context_ok, dtype=torch.bool)
    sets = sample_context_sets(user_index, context_ok, cfg.ppd_vlm_subsets, cfg.ppd_shots_min, cfg.ppd_shots_max, cfg.seed)
    mine = [s for s, (user, _) in enumerate(sets) if user % world == rank]

    features, used = {}, {}
    bar = tqdm(total=len(mine), desc="embed VLM context sets", disable=not progress, dynamic_ncols=True)
    start = 0
    while start < len(mine):  # groups of sets whose rows' images fit in PAIRS_PER_PASS pairs
        chunk, needed = [], set()
        while start < len(mine) and (not chunk or len(needed | set(sets[mine[start]][1])) <= PAIRS_PER_PASS):
            chunk.append(mine[start])
            needed |= set(sets[mine[start]][1])
            start += 1
        if held is None or not needed <= held.keys():
            # only the source chunks that hold these rows, each read once (a user's sets are consecutive, so
            # a row is read by at most the groups its user's sets fall in, not once per group)
            held = {row: _example(pair, backbone) for row, pair in source.pairs(source.chunks_of(needed))
                    if row in needed}
        for s in chunk:
            rows = sets[s][1]
            features[s] = backbone.embed_examples([held[r] for r in rows])[0].cpu()
            used[s] = rows[:backbone.last_kept]  # the token budget may have cut the set
            bar.update(1)
    bar.close()
    k_max = max(cfg.ppd_shots_max, 1)
    if mine:
        # bfloat16: a 7B VLM's concatenated layers are ~100k numbers a set; the head starts with a LayerNorm
        shard = {"index": torch.tensor(mine, dtype=torch.long),
                 "features": torch.stack([features[s] for s in mine]).to(torch.bfloat16),
                 "rows": torch.tensor([used[s] + [-1] * (k_max - len(used[s])) for s in mine], dtype=torch.long)}
        save_file(shard, str(folder / f"shard-{rank:05d}-of-{world:05d}.safetensors"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shards = [load_file(str(folder / f"shard-{r:05d}-of-{world:05d}.safetensors"))
                  for r in range(world) if (folder / f"shard-{r:05d}-of-{world:05d}.safetensors").exists()]
        if not shards:
            raise ValueError("PPD: no user has 2 or more base-image pairs, so there is no context set to embed")
        index = torch.cat([sh["index"] for sh in shards])
        order = index.argsort()
        bank = VLMContextBank(torch.cat([sh["features"] for sh in shards])[order],
                              torch.tensor([u for u, _ in sets], dtype=torch.long)[index[order]],
                              torch.cat([sh["rows"] for sh in shards])[order], user_index)
        bank.save(final)
    accelerator.wait_for_everyone()
    return VLMContextBank.load(final)
