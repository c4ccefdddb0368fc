"""Batch generation: prompts x seeds -> image files plus metadata.jsonl, resumable.

Each image gets its own ``torch.Generator`` seeded from its job, so an image depends only on
(prompt, seed, settings), never on the batch it happened to share: a rerun, a different batch size
or another process reproduces it exactly.

Best-of-N (``best_of_n``, ``generate --best-of N``): N candidates per prompt at seeds seed, seed+1,
..., seed+N-1, scored by a person's reward (``diffpref.personalize.reward``); the best is kept and
every candidate's seed and score go to the metadata, so each shown image can be regenerated.

Pipelines come from ``diffpref.models.loading.load_pipeline``, which never loads the SD1.5 safety
checker (it would black out flagged images, which would then be saved and scored as such).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

# Settings the embedded world model was tuned for; real SD models keep diffusers' defaults.
EMBEDDED_STEPS = 25
EMBEDDED_GUIDANCE = 7.5  # best prompt adherence of the shipped model in a 3/5/7.5 sweep
DEFAULT_GUIDANCE = 7.5


@dataclass(frozen=True)
class GenerationJob:
    prompt: str
    seed: int
    prompt_index: int
    user: str | None = None  # a personalized job; None = the base model

    @property
    def filename(self) -> str:
        name = f"{self.prompt_index:05d}_s{self.seed}.png"
        return f"{self.user}/{name}" if self.user else name


def default_guidance(pipe) -> float:
    from diffpref.paths import embedded_model_path

    name = getattr(pipe, "name_or_path", None) or getattr(pipe.config, "_name_or_path", "")
    return EMBEDDED_GUIDANCE if Path(str(name)).resolve() == embedded_model_path().resolve() else DEFAULT_GUIDANCE


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a .txt file (one per line; blank lines and #-comments skipped) or a .jsonl file ({"prompt": ...})."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    prompts: list[str] = []
    if path.suffix == ".jsonl":
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from exc
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ValueError(f'{path}:{line_no}: each line needs a string "prompt" field, got {line[:80]!r}')
            prompts.append(row["prompt"])
    else:
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


@torch.no_grad()
def generate_images(pipe, prompts: Sequence[str], seeds: Sequence[int], steps: int = EMBEDDED_STEPS,
                    guidance_scale: float | None = None, height: int | None = None, width: int | None = None,
                    **pipe_kwargs) -> np.ndarray:
    """Run the pipeline on one batch; returns uint8 images (N, H, W, 3), one generator per image."""
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    from diffpref.models.loading import native_resolution

    size = native_resolution(pipe)
    generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    out = pipe(
        prompt=list(prompts), num_inference_steps=steps,
        guidance_scale=default_guidance(pipe) if guidance_scale is None else guidance_scale,
        generator=generators, height=height or size, width=width or size, output_type="np", **pipe_kwargs,
    ).images
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def iter_generated(pipe, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance_scale: float | None,
                   batch_size: int, progress: bool = True, desc: str = "generate",
                   **image_kwargs) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start index, uint8 images)`` per pipeline call of at most ``batch_size`` images.

    ``image_kwargs`` go to `generate_images` (``height``, ``width``, ``user_embedding``, ...). Each
    image has its own generator, so the images do not depend on ``batch_size``. A ``user_embedding``
    of one user ([K, d] or [1, K, d]) serves every image; one of shape [N, K, d], N = len(prompts),
    gives every image its own user and is split into the batches with the prompts.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    users = image_kwargs.pop("user_embedding", None)
    per_image = users is not None and users.dim() == 3 and users.shape[0] == len(prompts)
    with tqdm(total=len(prompts), desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(prompts), batch_size):
            stop = min(start + batch_size, len(prompts))
            if users is not None:
                image_kwargs["user_embedding"] = users[start:stop] if per_image else users
            yield start, generate_images(pipe, prompts[start:stop], seeds[start:stop], steps, guidance_scale,
                                         **image_kwargs)
            bar.update(stop - start)


def generate_all(pipe, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance_scale: float | None,
                 batch_size: int, progress: bool = True, desc: str = "generate", **image_kwargs) -> np.ndarray:
    """uint8 (N, H, W, 3) images of every prompt, ``batch_size`` per pipeline call (see `iter_generated`)."""
    return np.concatenate([images for _, images in iter_generated(pipe, prompts, seeds, steps, guidance_scale,
                                                                  batch_size, progress, desc, **image_kwargs)])


def candidate_seeds(seed: int, best_of: int) -> list[int]:
    """Seeds of a prompt's candidates: candidate j uses seed + j (candidate 0 is plain generation)."""
    return [int(seed) + j for j in range(best_of)]


def best_of_records(prompts: Sequence[str], seeds: Sequence[int], scores: np.ndarray) -> list[dict]:
    """Per prompt: every candidate's seed and score, and the shown one (the argmax of the scores)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(len(prompts), -1)
    records = []
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        chosen = int(np.argmax(scores[i]))
        cands = candidate_seeds(seed, scores.shape[1])
        records.append({"prompt": prompt, "seeds": cands, "scores": scores[i].tolist(), "chosen": chosen,
                        "seed": cands[chosen], "score": float(scores[i, chosen])})
    return records


def best_of_n(generate, prompts: Sequence[str], seeds: Sequence[int], best_of: int, reward) -> tuple[np.ndarray, list[dict]]:
    """Shown uint8 images and their records (``best_of_records``) for ``generate(prompts, seeds) -> uint8 images``.

    All candidates go to one ``generate`` call; ``reward.score(images, prompts)`` ranks each prompt's N.
    """
    if isinstance(best_of, bool) or not isinstance(best_of, int) or best_of < 1:
        raise ValueError(f"best_of must be an integer >= 1, got {best_of!r}")
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    cand_prompts = [p for p in prompts for _ in range(best_of)]
    cand_seeds = [s for seed in seeds for s in candidate_seeds(seed, best_of)]
    images = generate(cand_prompts, cand_seeds)
    scores = np.asarray(reward.score(images, cand_prompts), dtype=np.float64)
    records = best_of_records(prompts, seeds, scores)
    shown = np.stack([images[i * best_of + r["chosen"]] for i, r in enumerate(records)])
    return shown, records


def plan_jobs(prompts: Sequence[str], num_images: int, seed: int, users: Sequence[str | None] = (None,)) -> list[GenerationJob]:
    """prompts x users x seeds; image j of a prompt uses seed + j for every user (so users compare directly)."""
    return [GenerationJob(p, seed + j, i, u) for u in users for i, p in enumerate(prompts) for j in range(num_images)]


def _metadata_rows(path: Path) -> Iterable[dict]:
    """Rows of a metadata file; a torn line (a crash mid-write) is ignored."""
    if not path.exists():
        return
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "file" in row:
            yield row


def _done_files(out_dir: Path) -> set[str]:
    """Files recorded in any metadata*.jsonl whose image exists."""
    return {row["file"] for path in sorted(out_dir.glob("metadata*.jsonl")) for row in _metadata_rows(path)
            if (out_dir / row["file"]).exists()}


def batched(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def generate_to_folder(pipe, jobs: Sequence[GenerationJob], out_dir: str | os.PathLike, batch_size: int = 8,
                       steps: int = EMBEDDED_STEPS, guidance_scale: float | None = None, model_name: str = "",
                       progress: bool = True, extra_metadata: dict | None = None,
                       user_tokens: dict[str, torch.Tensor] | None = None, user_scale: float = 1.0,
                       state=None, best_of: int = 1, reward=None) -> dict:
    """Write each job's PNG and one metadata line; jobs already recorded are skipped.

    ``best_of`` > 1: each job's image is the best of that many candidates under ``reward``
    (``best_of_n``); its metadata line adds ``best_of``, ``candidate_seeds``, ``scores``, ``chosen``
    and ``shown_seed``.

    ``state`` is accelerate's ``PartialState`` under ``accelerate launch`` / ``torchrun``: the
    pending jobs are split with its ``split_between_processes``, and each process writes its own
    ``metadata.rank{i}.jsonl`` (``merge_metadata`` folds them into ``metadata.jsonl`` afterwards).
    """
    if best_of > 1 and reward is None:
        raise ValueError("best_of > 1 needs a reward to rank the candidates (diffpref.personalize.reward)")
    out = Path(out_dir)
    num_processes = state.num_processes if state is not None else 1
    process_index = state.process_index if state is not None else 0
    out.mkdir(parents=True, exist_ok=True)
    done = _done_files(out)
    todo = [job for job in jobs if job.filename not in done]
    if num_processes > 1:
        # Every process must split the same list: none may write before all have read what is done,
        # or a fast process's new files would shift a slow one's split (duplicates and gaps).
        state.wait_for_everyone()
        with state.split_between_processes(todo) as share:
            mine = list(share)
    else:
        mine = todo
    metadata_path = out / ("metadata.jsonl" if num_processes == 1 else f"metadata.rank{process_index}.jsonl")
    guidance = default_guidance(pipe) if guidance_scale is None else guidance_scale
    if metadata_path.exists() and metadata_path.stat().st_size and not metadata_path.read_bytes().endswith(b"\n"):
        with metadata_path.open("a") as meta:  # a crash tore the last line: end it so new lines stay whole
            meta.write("\n")
    with metadata_path.open("a") as meta, tqdm(total=len(mine), desc="generate", unit="img",
                                               disable=not progress, dynamic_ncols=True) as bar:
        for batch in batched(mine, batch_size):
            kwargs = {}
            if any(job.user for job in batch):
                kwargs = {"user_embedding": torch.stack([user_tokens[job.user] for job in batch]), "user_scale": user_scale}
            prompts, seeds = [j.prompt for j in batch], [j.seed for j in batch]
            if best_of > 1:
                if "user_embedding" in kwargs:  # each prompt's candidates share its user's tokens
                    kwargs["user_embedding"] = kwargs["user_embedding"].repeat_interleave(best_of, dim=0)
                images, records = best_of_n(lambda p, s, kw=kwargs: generate_images(pipe, p, s, steps, guidance, **kw),
                                            prompts, seeds, best_of, reward)
            else:
                images, records = generate_images(pipe, prompts, seeds, steps, guidance, **kwargs), [None] * len(batch)
            for job, image, record in zip(batch, images, records):
                target = out / job.filename
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(target.name + ".tmp")
                Image.fromarray(image).save(tmp, format="PNG")
                tmp.replace(target)  # the image is whole before its metadata line exists
                row = {"file": job.filename, **asdict(job), "steps": steps, "guidance_scale": guidance,
                       "model": model_name, "height": int(image.shape[0]), "width": int(image.shape[1]),
                       **({"user_scale": user_scale} if job.user else {}), **(extra_metadata or {})}
                if record is not None:  # the shown image is candidate `chosen`: regenerate it from `shown_seed`
                    row.update(best_of=best_of, candidate_seeds=record["seeds"], scores=record["scores"],
                               chosen=record["chosen"], shown_seed=record["seed"])
                meta.write(json.dumps(row) + "\n")
                meta.flush()
            bar.update(len(batch))
    return {"out_dir": str(out), "images": len(jobs), "generated": len(mine), "skipped_existing": len(jobs) - len(todo)}


def merge_metadata(out_dir: str | os.PathLike) -> int:
    """Fold per-process metadata.rank*.jsonl files into metadata.jsonl (each file once); returns the line count."""
    out = Path(out_dir)
    main_file = out / "metadata.jsonl"
    seen = set()
    lines = []
    for path in [main_file, *sorted(out.glob("metadata.rank*.jsonl"))]:
        for row in _metadata_rows(path):
            if row["file"] not in seen and (out / row["file"]).exists():
                seen.add(row["file"])
                lines.append(json.dumps(row))
    tmp = main_file.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    tmp.replace(main_file)
    for path in out.glob("metadata.rank*.jsonl"):
        path.unlink()
    return len(lines)


def contact_sheets(out_dir: str | os.PathLike, columns: int = 8, max_images: int = 64) -> list[Path]:
    """One PNG grid per user folder (and one for base images at the top level)."""
    out = Path(out_dir)
    groups: dict[str, list[str]] = {}
    for row in _metadata_rows(out / "metadata.jsonl"):
        groups.setdefault(row.get("user") or "base", []).append(row["file"])
    sheets = []
    for user, files in sorted(groups.items()):
        images = [Image.open(out / f).convert("RGB") for f in sorted(files)[:max_images]]
        w, h = images[0].size
        cols = min(columns, len(images))
        sheet = Image.new("RGB", (cols * w, -(-len(images) // cols) * h), "white")
        for i, image in enumerate(images):
            sheet.paste(image, ((i % cols) * w, (i // cols) * h))
        path = out / f"contact_{user}.png"
        sheet.save(path)
        sheets.append(path)
    return sheets
