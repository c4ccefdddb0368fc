"""The ``diffpref`` command line. Each subcommand is a thin wrapper over a library function."""

from __future__ import annotations

import argparse
import json
import sys

from diffpref import __version__


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False))


# ----------------------------------------------------------------------------- info
def cmd_info(args) -> int:
    from diffpref.models.loading import default_device, xformers_available
    from diffpref.paths import embedded_clip_path, embedded_model_path

    info = {
        "version": __version__,
        "embedded_model": str(embedded_model_path()),
        "embedded_model_present": embedded_model_path().joinpath("model_index.json").exists(),
        "embedded_clip": str(embedded_clip_path()),
        "embedded_clip_present": embedded_clip_path().joinpath("open_clip_config.json").exists(),
        "device": default_device(),
        "attention": "xformers" if xformers_available() else "sdpa",
    }
    if args.json:
        _print_json(info)
    else:
        for key, value in info.items():
            print(f"{key:24s} {value}")
    return 0


# ----------------------------------------------------------------------------- generate
def cmd_generate(args) -> int:
    import torch
    from accelerate import PartialState

    from diffpref.generate import (
        EMBEDDED_STEPS,
        contact_sheets,
        generate_to_folder,
        merge_metadata,
        plan_jobs,
        read_prompts,
    )
    from diffpref.models.loading import load_pipeline

    prompts = read_prompts(args.prompts)
    # One process or many (accelerate launch / torchrun): each process takes its share of the images.
    from accelerate.utils import parse_flag_from_env

    # PartialState only looks for a multi-process CPU launch when told it runs on CPU.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())
    device = args.device or str(state.device)
    pipe = load_pipeline(args.model, device=device, attention=args.attention)
    steps = args.steps or (EMBEDDED_STEPS if args.model == "embedded" else 50)
    user_tokens, users, extra = None, [None], {}
    if args.users or args.mix:
        from diffpref.personalize.pipeline import PersonalizedPipeline
        from diffpref.personalize.users_file import apply_mix, load_generation_users

        if not args.users:
            raise ValueError("--mix needs --users FILE naming the users to mix")
        pipe = PersonalizedPipeline.from_base(pipe, args.adapter)
        pipe.set_progress_bar_config(disable=True)
        user_tokens = load_generation_users(args.users, pipe)
        if args.mix:
            name, tokens = apply_mix(user_tokens, args.mix)
            user_tokens = {name: tokens}
        users = sorted(user_tokens)
        extra = {"adapter": str(args.adapter)}
    reward = None
    if args.best_of > 1 or args.reward_examples:
        reward = _person_reward(args)
        extra = {**extra, "reward_model": str(args.reward_model), "reward_examples": str(args.reward_examples)}
    summary = generate_to_folder(
        pipe, plan_jobs(prompts, args.num_images, args.seed, users), args.out, batch_size=args.batch_size, steps=steps,
        guidance_scale=args.guidance_scale, model_name=args.model, user_tokens=user_tokens, user_scale=args.user_scale,
        extra_metadata=extra, progress=state.is_local_main_process, state=state, best_of=args.best_of, reward=reward,
    )
    state.wait_for_everyone()
    if state.is_main_process:
        if state.num_processes > 1:
            merge_metadata(args.out)
        summary["contact_sheets"] = [str(p) for p in contact_sheets(args.out)]
        summary["processes"] = state.num_processes
        print(json.dumps(summary))
    return 0


def _person_reward(args):
    """The reward of the person whose choices are in --reward-examples (a JSONL manifest, as `user embed`)."""
    from diffpref.data.readers import read_jsonl_manifest
    from diffpref.personalize.backbones import UserExample
    from diffpref.personalize.reward import PrototypeRewardModel

    if args.best_of < 1:
        raise ValueError(f"--best-of must be >= 1, got {args.best_of}")
    if not args.reward_examples:
        raise ValueError("--best-of N needs --reward-examples FILE: the person's choices (JSONL manifest) that "
                         "their reward is read from")
    result = read_jsonl_manifest(args.reward_examples, tie_policy="drop", strict=True)
    examples = [UserExample(p.prompt, p.preferred, p.rejected) for p in result.pairs]
    if not examples:
        raise ValueError(f"{args.reward_examples} holds no decided pair to read a taste from")
    return PrototypeRewardModel.from_pretrained(args.reward_model).person(examples)


def cmd_user_embed(args) -> int:
    from diffpref.data.readers import read_jsonl_manifest
    from diffpref.models.loading import load_pipeline
    from diffpref.personalize.backbones import UserExample
    from diffpref.personalize.encoder import save_user_embedding
    from diffpref.personalize.pipeline import PersonalizedPipeline

    result = read_jsonl_manifest(args.examples, tie_policy="drop", strict=True)
    examples = [UserExample(p.prompt, p.preferred, p.rejected) for p in result.pairs]
    if not examples:
        raise ValueError(f"{args.examples} holds no decided pair to learn a taste from")
    pipe = PersonalizedPipeline.from_base(load_pipeline(args.model, device=args.device), args.adapter)
    tokens = pipe.embed_user(examples)
    path = save_user_embedding(args.out, tokens, {"adapter": str(args.adapter), "model": args.model,
                                                  "examples": len(examples), "source": str(args.examples)})
    print(json.dumps({"out": str(path), "examples": len(examples), "shape": list(tokens.shape)}))
    return 0


# ----------------------------------------------------------------------------- data
def cmd_data_inspect(args) -> int:
    from diffpref.data.inspect import inspect_preferences

    report = inspect_preferences(args.file, tie_policy=args.tie_policy, strict=args.strict)
    if args.json:
        _print_json(report)
    else:
        print(f"{args.file}: {report['pairs']} usable pairs from {report['users']} users, {report['ties']} ties")
        for reason, count in sorted(report["skipped"].items()):
            print(f"  skipped {count:6d}  {reason}")
    return 0


def cmd_data_export(args) -> int:
    from pathlib import Path

    from diffpref.app.store import RatingStore

    if not Path(args.db).is_file():  # opening a store creates it: never export a fresh empty one
        raise FileNotFoundError(f"no such ratings database: {args.db}")
    with RatingStore(args.db) as store:
        summary = {"pairs": store.export_pickapic(args.out)}
        if args.likes_out:
            summary["likes"] = store.export_likes(args.likes_out)
    print(json.dumps(summary))
    return 0


# ----------------------------------------------------------------------------- eval
def cmd_eval(args) -> int:
    from diffpref.rewards.evaluate import evaluate_rewards

    result = evaluate_rewards(args.model, args.prompts, args.rewards, adapter=args.adapter, users=args.users,
                              seed=args.seed, steps=args.steps, guidance_scale=args.guidance_scale,
                              batch_size=args.batch_size, device=args.device, attention=args.attention,
                              user_scale=args.user_scale)
    if args.json:
        _print_json(result)
        return 0
    print(f"{result['model']} vs base, {result['prompts']} prompts, adapter {result['adapter']}")
    for name in result["reward_files"]:
        r = result[name]
        print(f"  {name:10s} mean {r['mean_reward']:9.4f}   base {r['base_mean_reward']:9.4f}   "
              f"win rate {r['win_rate_vs_base']:.3f}")
        for user, u in r.get("per_user", {}).items():
            print(f"    {user:16s} mean {u['mean_reward']:9.4f}   win rate {u['win_rate_vs_base']:.3f}")
    return 0


def _add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="reward-model evaluation (HPSv2, PickScore, aesthetic, CLIP score) against the base")
    p.add_argument("--model", default="embedded", help="'embedded', a local diffusers folder, or a hub id")
    p.add_argument("--adapter", default=None,
                   help="a LoRA (file or folder), a full UNet folder, or a PPD adapter (with --users)")
    p.add_argument("--users", default=None, help="JSON list of users: personalized generations and results per user")
    p.add_argument("--prompts", required=True, help="a .txt file (one prompt a line) or .jsonl ({\"prompt\": ...})")
    p.add_argument("--rewards", required=True,
                   help="comma-separated local reward weights: hpsv2=CKPT[@ARCH], clip=CKPT[@ARCH], "
                        "aesthetic=HEAD@BACKBONE[@ARCH], pickscore=MODEL_DIR[@PROCESSOR_DIR]")
    p.add_argument("--seed", type=int, default=0, help="prompt i is generated with seed + i, by base and tuned alike")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 25 embedded, 50 otherwise)")
    p.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance (default: model's)")
    p.add_argument("--batch-size", type=int, default=8, help="images per pipeline call and per reward-model call")
    p.add_argument("--user-scale", type=float, default=1.0, help="PPD: personalization strength")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "xformers"])
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)


# ----------------------------------------------------------------------------- train
def cmd_train(args) -> int:
    from diffpref.config import load_config
    from diffpref.launch import build_parts
    from diffpref.training.config import TrainConfig
    from diffpref.training.trainer import train

    cfg = load_config(TrainConfig, args.config, args.overrides)
    summary = train(cfg, *build_parts(cfg))
    print(json.dumps({k: v for k, v in summary.items() if k != "final"}))
    return 0


# ----------------------------------------------------------------------------- app
def cmd_app(args) -> int:
    from diffpref.app.server import run

    return run(args)


def _add_app_parser(sub) -> None:
    from diffpref.app.config import APP_HELP, add_app_arguments

    add_app_arguments(sub.add_parser("app", help=APP_HELP, description=APP_HELP)).set_defaults(func=cmd_app)


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffpref", description="Personalize text-to-image diffusion models from preferences.")
    parser.add_argument("--version", action="version", version=f"diffpref {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="version, shipped model paths, device and attention backend")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", help="generate images for a prompt file into a folder (resumable)")
    p.add_argument("--prompts", required=True, help="a .txt file (one prompt a line) or .jsonl ({\"prompt\": ...})")
    p.add_argument("--out", required=True, help="output folder; images plus metadata.jsonl")
    p.add_argument("--model", default="embedded", help="'embedded', a local diffusers folder, or a hub id")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt (seeds seed .. seed+N-1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 25 embedded, 50 otherwise)")
    p.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance (default: model's)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "xformers"])
    p.add_argument("--users", default=None, help="JSON list of users (examples or saved embeddings): personalized images")
    p.add_argument("--adapter", default="embedded-ppd", help="PPD adapter folder used with --users")
    p.add_argument("--user-scale", type=float, default=1.0, help="strength of the personalization (0 = base model)")
    p.add_argument("--mix", default=None, help="interpolate users' embeddings, e.g. alice:0.7,bob:0.3")
    p.add_argument("--best-of", type=int, default=1,
                   help="N candidates per image (seeds s..s+N-1), the one the person's reward ranks first is kept")
    p.add_argument("--reward-examples", default=None,
                   help="with --best-of: the person's choices, a JSONL manifest as for `user embed --examples`")
    p.add_argument("--reward-model", default="embedded-reward", help="few-shot reward model folder (--best-of)")
    p.set_defaults(func=cmd_generate)

    user = sub.add_parser("user", help="user embeddings").add_subparsers(dest="user_command", required=True)
    p = user.add_parser("embed", help="save a user's embedding from a JSONL manifest of their choices")
    p.add_argument("--examples", required=True, help="JSONL manifest: prompt, image_0, image_1, label per line")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--adapter", default="embedded-ppd")
    p.add_argument("--model", default="embedded")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_user_embed)

    p = sub.add_parser("train", help="preference fine-tuning (same code as `accelerate launch train/train.py`)")
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. max_train_steps=50")
    p.set_defaults(func=cmd_train)

    data = sub.add_parser("data", help="preference data tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("inspect", help="count usable pairs, users, ties and skipped rows of a data file")
    p.add_argument("file", help="Pick-a-Pic parquet (file, folder or glob), JSONL manifest or ratings database")
    p.add_argument("--json", action="store_true")
    p.add_argument("--tie-policy", default="drop", choices=["drop", "soft"])
    p.add_argument("--strict", action="store_true", help="stop at the first bad row instead of counting skips")
    p.set_defaults(func=cmd_data_inspect)
    p = data.add_parser("export", help="write the rating app's database as Pick-a-Pic parquet (+ likes as JSONL)")
    p.add_argument("--db", required=True, help="the app's ratings database (.db / .sqlite)")
    p.add_argument("--out", required=True, help="output .parquet: every decided and tie rating (skips left out)")
    p.add_argument("--likes-out", default=None, help="folder for single-image likes: ratings.jsonl + images/")
    p.set_defaults(func=cmd_data_export)

    from diffpref.experiments.commands import add_world_parser

    add_world_parser(sub)
    _add_eval_parser(sub)
    _add_app_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"diffpref: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
