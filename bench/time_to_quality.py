"""Time to quality: wall-clock until a method's oracle win rate reaches the shipped DPO config's final one.

    python bench/time_to_quality.py --json                     # red_large, dark_small, circle_bright; DPO, InPO
    python bench/time_to_quality.py --json --users dark_small  # one user (--combine merges side-by-side runs)
    python bench/time_to_quality.py --json --method "inpo_k10=embedded_inpo.yaml:inversion_steps=10"

For each world user (``configs/users/<user>.json``; 1000 pairs from ``diffpref world make-data``, made
if missing) every method trains with the trainer itself (``diffpref.training.trainer.train``) on one
latent cache, built once per user and timed. All runs are evaluated by one ``TrainingEvaluator`` (same
captions, seeds and base images) at the same fixed steps (``--eval-steps``, plus each run's last step);
the trainer leaves evaluations out of its clock and logs ``train_s`` at each of them. The target is the
shipped DPO config's final win rate in this run; a method's time to quality is ``train_s`` at the first
evaluation whose win rate reaches it with adherence at least DPO's final adherence minus 0.02, and
``total_s`` adds its one-time precomputation (the latent cache, and for InPO the inversion cache).
``speedup_vs_dpo`` = DPO's time to quality / the method's (training only); ``speedup_vs_dpo_total``
the same with precomputation; ``speedup_vs_dpo_full_run`` = the whole shipped DPO run's training time
/ the method's time to quality (what a user who runs the shipped DPO config to its end pays). Per user: ``speedup_vs_dpo`` of the first non-DPO method; top level:
its mean over the users. Load averages (``os.getloadavg``) are recorded around every run: on a shared
machine only ratios within one run mean much.

Methods: ``name=config.yaml[:key=value,key=value]`` (configs/ is the default folder). Defaults:
``dpo=embedded_dpo.yaml`` (the baseline, always first) and ``inpo=embedded_inpo.yaml``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch

ADHERENCE_TOLERANCE = 0.02
DEFAULT_USERS = ("red_large", "dark_small", "circle_bright")
DEFAULT_METHODS = ("dpo=embedded_dpo.yaml", "inpo=embedded_inpo.yaml")
# What reports/time_to_quality.md ran: 100 captions x 10 sampling steps keep ~16 evaluations per user
# affordable on 2 cores; raise --eval-prompts for less noise (adherence moves ~0.01 between evaluations at 100).
DEFAULT_EVAL_STEPS = (10, 20, 30, 40, 50, 75, 100, 200, 300)


# ----------------------------------------------------------------------------- the timing logic
def first_crossing(curve: list[dict], target_win: float, target_adherence: float,
                   tolerance: float = ADHERENCE_TOLERANCE) -> dict | None:
    """The first point of ``curve`` (dicts with step, train_s, win_rate_vs_base, adherence; in step order)
    whose win rate reaches ``target_win`` with adherence >= ``target_adherence - tolerance``, or None."""
    for point in sorted(curve, key=lambda p: p["step"]):
        if point["win_rate_vs_base"] >= target_win and point["adherence"] >= target_adherence - tolerance:
            return point
    return None


def speedups(runs: dict[str, dict]) -> dict[str, dict]:
    """Per method: time to quality against the first run (DPO), in training and in total seconds."""
    names = list(runs)
    baseline = runs[names[0]]
    final = baseline["curve"][-1]
    target_win, target_adherence = final["win_rate_vs_base"], final["adherence"]
    reached = {}
    for name, run in runs.items():
        point = first_crossing(run["curve"], target_win, target_adherence)
        reached[name] = None if point is None else {
            "step": point["step"], "train_s": point["train_s"], "total_s": point["train_s"] + run["precompute_s"],
            "win_rate_vs_base": point["win_rate_vs_base"], "adherence": point["adherence"]}
    base = reached[names[0]]  # DPO's final point meets its own target, so never None
    out = {"target_win_rate": target_win, "target_adherence_min": target_adherence - ADHERENCE_TOLERANCE}
    for name in names:
        hit = reached[name]
        out[name] = {"reached": hit,
                     "speedup_vs_dpo": None if hit is None else base["train_s"] / max(hit["train_s"], 1e-9),
                     "speedup_vs_dpo_total": None if hit is None else base["total_s"] / max(hit["total_s"], 1e-9),
                     # against what a user of the shipped DPO config pays: its whole run, not its first crossing
                     "speedup_vs_dpo_full_run": None if hit is None else final["train_s"] / max(hit["train_s"], 1e-9)}
    return out


# ----------------------------------------------------------------------------- running
class ScheduledEvaluator:
    """One ``TrainingEvaluator`` per user, shared by every run (base images generated once), called only at the
    schedule's steps (the trainer asks every ``eval_every`` steps; other calls return nothing and cost nothing)."""

    def __init__(self, inner, steps: set[int]):
        self.inner, self.steps = inner, steps

    def attach(self, unet, pipeline_class=None, resolution=None):
        if self.inner.base is None:
            self.inner.attach(unet, pipeline_class, resolution)
        self.inner.unet = unet

    def __call__(self, step: int) -> dict:
        return self.inner(step) if step in self.steps else {}


def parse_method(spec: str) -> tuple[str, Path, list[str]]:
    name, _, rest = spec.partition("=")
    config, _, overrides = rest.partition(":")
    path = Path(config) if Path(config).exists() else ROOT / "configs" / config
    if not name or not path.exists():
        raise SystemExit(f"--method {spec!r}: expected name=config.yaml[:key=value,...] with an existing config")
    return name, path, [o for o in overrides.split(",") if o]


def ensure_data(user: str, data_root: Path, pairs: int, steps: int) -> Path:
    """The user's pairs, made by ``diffpref world make-data`` (as bench/world_experiments.sh does) if missing."""
    data = data_root / f"world_{user}" / "pairs.parquet"
    while not data.exists() and data.with_name(data.name + ".tmp").exists():
        time.sleep(10)  # another make-data is writing it (e.g. bench/world_experiments.sh)
    if not data.exists():
        subprocess.run([sys.executable, "-m", "diffpref.cli", "world", "make-data", "--out", str(data.parent),
                        "--users-file", str(ROOT / "configs" / "users" / f"{user}.json"), "--pairs-per-user",
                        str(pairs), "--seed", "0", "--steps", str(steps), "--batch-size", "100"], check=True)
    return data


def build_latent_cache(cfg) -> float:
    """Seconds to encode the user's data once (shared by every method of the user)."""
    from diffpref.models.loading import load_pipeline
    from diffpref.training.cache import build_preference_cache

    pipe = load_pipeline(cfg.model, device="cpu", dtype=torch.float32)
    started = time.perf_counter()  # the encoding itself; the trainer loads the pipeline anyway
    build_preference_cache(pipe, cfg.data_path, cfg.cache_dir, resolution=cfg.resolution, tie_policy=cfg.tie_policy,
                           batch_size=cfg.cache_batch_size, progress=False, random_flip=cfg.random_flip)
    return time.perf_counter() - started


def run_method(cfg, evaluator) -> dict:
    from diffpref.training.trainer import train

    load_before = os.getloadavg()
    summary = train(cfg, evaluator=evaluator)
    run = read_run(Path(cfg.output_dir), summary)
    run.update(loadavg_before=[round(x, 2) for x in load_before], loadavg_after=[round(x, 2) for x in os.getloadavg()])
    (Path(cfg.output_dir) / "time_to_quality_run.json").write_text(json.dumps(run, indent=1))
    return run


def read_run(output_dir: Path, summary: dict | None = None) -> dict:
    """A finished run's curve and timings from its output folder (summary.json, history.jsonl)."""
    summary = summary or json.loads((output_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (output_dir / "history.jsonl").read_text().splitlines()]
    curve = [{"step": r["step"], "train_s": r["train_s"], "win_rate_vs_base": r["win_rate_vs_base"],
              "adherence": r["adherence"]} for r in rows if "win_rate_vs_base" in r]
    final = summary["eval"]
    curve.append({"step": summary["steps"], "train_s": summary["train_s"],
                  "win_rate_vs_base": final["win_rate_vs_base"], "adherence": final["adherence"]})
    return {"steps": summary["steps"], "train_s": summary["train_s"], "inversion_build_s": summary["inversion_build_s"],
            "s_per_step": summary["train_s"] / summary["steps"], "curve": curve}


def collect_user(user: str, methods, args) -> dict:
    """``--from-outputs``: the result of a user's finished runs in --out, without training (a run that did not
    finish is left out; the baseline must have finished)."""
    out = Path(args.out) / user
    metas = sorted((out / "cache").glob("*/meta.json"))
    latent_s = max(json.loads(m.read_text())["build"]["seconds_per_rank"] for m in metas)[0] if metas else 0.0
    runs = {}
    for name, config, overrides in methods:
        folder = out / name
        if (folder / "time_to_quality_run.json").exists():
            run = json.loads((folder / "time_to_quality_run.json").read_text())
        elif (folder / "summary.json").exists():
            run = read_run(folder)
        else:
            continue
        run["precompute_s"] = latent_s + run["inversion_build_s"]
        run["config"] = f"{config.name}" + (f":{','.join(overrides)}" if overrides else "")
        runs[name] = run
    return _user_result(latent_s, runs, methods)


def run_user(user: str, methods: list[tuple[str, Path, list[str]]], args) -> dict:
    from diffpref.config import load_config
    from diffpref.experiments.preference_eval import TrainingEvaluator
    from diffpref.training.config import TrainConfig

    data = ensure_data(user, Path(args.data_root), args.pairs_per_user, args.data_steps)
    out = Path(args.out) / user
    cache_dir = out / "cache"
    if not args.resume:
        shutil.rmtree(cache_dir, ignore_errors=True)  # fresh: the one-time costs are measured, not reused
    common = [f"data_path={data}", f"cache_dir={cache_dir}", "threads=1", "report_to=none", "checkpointing_steps=0",
              "eval_world=false", f"eval_every={args.eval_every}", f"eval_prompts={args.eval_prompts}",
              f"eval_sampling_steps={args.eval_sampling_steps}"]
    runs, latent_s, evaluator = {}, None, None
    for name, config, overrides in methods:
        extra = ([f"max_train_steps={args.max_steps}"] if args.max_steps else []) + list(args.set or [])
        cfg = load_config(TrainConfig, config, [*overrides, *common, *extra, f"output_dir={out / name}"])
        if latent_s is None:
            latent_s = build_latent_cache(cfg)
            metas = sorted(cache_dir.glob("*/meta.json"))
            if args.resume and metas:  # reused: its build time is in its meta
                latent_s = max(json.loads(m.read_text())["build"]["seconds_per_rank"] for m in metas)[0]
        if args.resume and (Path(cfg.output_dir) / "summary.json").exists():
            runs[name] = collect_user(user, [(name, config, overrides)], args)["runs"][name]
            continue
        shutil.rmtree(cfg.output_dir, ignore_errors=True)
        if evaluator is None:
            inner = TrainingEvaluator(cfg, str(data.parent / "users.json"))
            evaluator = ScheduledEvaluator(inner, set(args.eval_steps))
        evaluator.steps = set(args.eval_steps) | {cfg.max_train_steps}
        print(f"[time_to_quality] {user} {name}: {cfg.method} {cfg.max_train_steps} steps", file=sys.stderr, flush=True)
        run = run_method(cfg, evaluator)
        run["precompute_s"] = latent_s + run["inversion_build_s"]
        run["config"] = f"{config.name}" + (f":{','.join(overrides)}" if overrides else "")
        runs[name] = run
    return _user_result(latent_s, runs, methods)


def _user_result(latent_s: float, runs: dict, methods) -> dict:
    if methods[0][0] not in runs:
        raise SystemExit(f"the baseline {methods[0][0]!r} has no finished run")
    result = {"latent_cache_s": latent_s, "runs": runs, **speedups(runs)}
    for name, _, _ in methods:
        result.setdefault(name, {"reached": None, "speedup_vs_dpo": None, "speedup_vs_dpo_total": None,
                                 "missing": True})
    first_other = next((n for n, _, _ in methods if n != methods[0][0]), None)
    if first_other is not None:
        result["speedup_vs_dpo"] = result[first_other]["speedup_vs_dpo"]
        result["speedup_vs_dpo_total"] = result[first_other]["speedup_vs_dpo_total"]
    return result


def _mean(values: list) -> float | None:
    """Mean over users; None if a user never reached the target (the mean would hide it)."""
    return None if not values or any(v is None for v in values) else sum(values) / len(values)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    parser.add_argument("--users", default=",".join(DEFAULT_USERS), help="comma-separated configs/users/<name>.json")
    parser.add_argument("--method", action="append", default=None,
                        help="name=config.yaml[:key=value,...]; repeatable; the first is the baseline "
                             f"(default: {' '.join(DEFAULT_METHODS)})")
    parser.add_argument("--eval-steps", default=",".join(map(str, DEFAULT_EVAL_STEPS)),
                        help="steps evaluated in every run (plus its last); multiples of --eval-every")
    parser.add_argument("--eval-every", type=int, default=5, help="the trainer's eval_every (gcd of --eval-steps)")
    parser.add_argument("--eval-prompts", type=int, default=100)
    parser.add_argument("--eval-sampling-steps", type=int, default=10)
    parser.add_argument("--max-steps", type=int, default=0, help="override every method's max_train_steps (0: its config's)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override for every run (repeatable)")
    parser.add_argument("--data-root", default=str(ROOT / "data"))
    parser.add_argument("--pairs-per-user", type=int, default=1000, help="pairs made for a user whose data is missing")
    parser.add_argument("--data-steps", type=int, default=15, help="make-data sampling steps for missing data")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "time_to_quality"))
    parser.add_argument("--resume", action="store_true", help="keep the caches and the finished runs in --out and "
                        "train only the methods that have none")
    parser.add_argument("--from-outputs", action="store_true", help="train nothing: read the finished runs in --out "
                        "(e.g. of an interrupted benchmark) and report them")
    parser.add_argument("--combine", nargs="+", metavar="JSON", help="merge the --json outputs of runs on different "
                        "users (same methods) into one result with the mean speedup; runs nothing")
    args = parser.parse_args(argv)
    args.eval_steps = [int(s) for s in args.eval_steps.split(",") if s]
    if any(s % args.eval_every for s in args.eval_steps):
        raise SystemExit(f"--eval-steps {args.eval_steps} must be multiples of --eval-every {args.eval_every}")
    if args.combine:
        return _print(combine([json.loads(Path(f).read_text()) for f in args.combine]), args.json)
    methods = [parse_method(m) for m in (args.method or DEFAULT_METHODS)]
    torch.set_num_threads(1)
    started = time.time()
    users = {}
    for user in [u for u in args.users.split(",") if u]:
        users[user] = collect_user(user, methods, args) if args.from_outputs else run_user(user, methods, args)
    result = summarize(users, methods, args)
    result["wall_s"] = round(time.time() - started, 1)
    return _print(result, args.json)


def _print(result: dict, as_json: bool) -> dict:
    if as_json:
        print(json.dumps(result, indent=1))
    return result


def combine(results: list[dict]) -> dict:
    """One result from runs of the same methods on different users (e.g. one process per user, side by side)."""
    users = {u: r for result in results for u, r in result["users"].items()}
    names = [results[0]["baseline"], *results[0]["methods"]]
    out = {**_means(users, names), "users": users, "baseline": names[0], "settings": results[0]["settings"],
           "combined_from": len(results), "wall_s": max(r.get("wall_s", 0) for r in results)}
    return out


def _means(users: dict, names: list[str]) -> dict:
    per_method = {n: {"speedup_vs_dpo": _mean([users[u][n]["speedup_vs_dpo"] for u in users]),
                      "speedup_vs_dpo_total": _mean([users[u][n]["speedup_vs_dpo_total"] for u in users])}
                  for n in names[1:]}
    first = per_method.get(names[1], {}) if len(names) > 1 else {}
    return {"speedup_vs_dpo": first.get("speedup_vs_dpo"), "speedup_vs_dpo_total": first.get("speedup_vs_dpo_total"),
            "methods": per_method}


def summarize(users: dict, methods, args) -> dict:
    names = [n for n, _, _ in methods]
    return {**_means(users, names), "users": users, "baseline": names[0],
              "settings": {"eval_steps": args.eval_steps, "eval_prompts": args.eval_prompts,
                           "eval_sampling_steps": args.eval_sampling_steps, "adherence_tolerance": ADHERENCE_TOLERANCE,
                           "methods": [f"{n}={c.name}" + (":" + ",".join(o) if o else "") for n, c, o in methods],
                           "threads": 1, "cpus": os.cpu_count()},
            "loadavg_end": [round(x, 2) for x in os.getloadavg()]}


if __name__ == "__main__":
    main()
