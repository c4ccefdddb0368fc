"""The ``diffpref world`` commands: thin wrappers over the experiment drivers and the world's users.

``diffpref.cli`` adds them with ``add_world_parser``; every import of a driver is inside its
command, so building the parser stays cheap.
"""

from __future__ import annotations

import json


def cmd_world_make_data(args) -> int:
    import numpy as np

    from diffpref.experiments.make_data import make_preference_data
    from diffpref.world.users import load_users, random_users

    if (args.users is None) == (args.users_file is None):
        raise SystemExit("give exactly one of --users N (random users) or --users-file FILE")
    users = load_users(args.users_file) if args.users_file else random_users(args.users, np.random.default_rng(args.seed))
    summary = make_preference_data(
        args.out, users, pairs_per_user=args.pairs_per_user, seed=args.seed, model=args.model,
        temperature=args.temperature, batch_size=args.batch_size, steps=args.steps,
        guidance_scale=args.guidance_scale, name_prob=args.name_prob,
    )
    print(json.dumps(summary))
    return 0


def cmd_world_relabel(args) -> int:
    from diffpref.experiments.relabel import relabel_pairs
    from diffpref.world.users import load_users

    summary = relabel_pairs(args.pool, args.out, load_users(args.users_file), pairs_per_user=args.pairs_per_user,
                            seed=args.seed, temperature=args.temperature, decided_only=args.decided_only)
    print(json.dumps(summary))
    return 0


def cmd_world_policy_pairs(args) -> int:
    from diffpref.experiments.policy_pairs import make_policy_pairs

    summary = make_policy_pairs(args.data, args.adapter, args.out, users_file=args.users_file,
                                captions_per_user=args.captions_per_user, contexts_per_user=args.contexts_per_user,
                                shots=args.shots, steps=args.steps, guidance_scale=args.guidance_scale, seed=args.seed,
                                temperature=args.temperature, batch_size=args.batch_size, user_scale=args.user_scale,
                                labeller=args.labeller, reward_model=args.reward_model)
    print(json.dumps(summary))
    return 0


def cmd_world_make_users(args) -> int:
    import numpy as np

    from diffpref.world.users import load_users, random_users, save_users, taste_users

    rng = np.random.default_rng(args.seed)
    if args.kind == "taste":
        exclude = load_users(args.exclude) if args.exclude else []
        low, high = (int(v) for v in args.families.split(","))
        users = taste_users(args.n, rng, prefix=args.prefix, families_per_user=(low, high), exclude=exclude)
    else:
        if args.exclude:
            raise SystemExit("--exclude works with --kind taste only")
        users = random_users(args.n, rng, prefix=args.prefix)
    save_users(users, args.out)
    print(json.dumps({"users": len(users), "out": str(args.out)}))
    return 0


def cmd_world_eval(args) -> int:
    from diffpref.personalize.adapter import is_ppd_adapter

    if args.best_of is not None:
        from diffpref.experiments.preference_eval import evaluate_best_of

        if not args.users:
            raise ValueError("--best-of needs --users FILE: the simulated users whose few-shot rewards rank candidates")
        if args.adapter is not None and not is_ppd_adapter(args.adapter):
            raise ValueError(f"--best-of draws candidates from the base or a PPD adapter; {args.adapter} is not one")
        try:
            sizes = [int(v) for v in args.best_of.split(",")]
        except ValueError as err:
            raise ValueError(f"--best-of takes N or a list like 1,2,4,8,16; got {args.best_of!r}") from err
        result = evaluate_best_of(args.model, args.users, best_of=sizes, adapter=args.adapter,
                                  shots=args.shots if args.shots is not None else 4,
                                  num_prompts=args.prompts if args.prompts is not None else 60, seed=args.seed,
                                  steps=args.steps, guidance_scale=args.guidance_scale, batch_size=args.batch_size,
                                  reward_model=args.reward_model)
    elif is_ppd_adapter(args.adapter) or args.shots is not None:
        from diffpref.experiments.ppd_eval import evaluate_ppd

        if not args.users:
            raise ValueError("PPD evaluation needs --users FILE: the simulated users to personalize for")
        result = evaluate_ppd(args.model, adapter=args.adapter or "embedded-ppd", users=args.users,
                              shots=args.shots if args.shots is not None else 4,
                              num_prompts=args.prompts if args.prompts is not None else 200, seed=args.seed,
                              steps=args.steps, guidance_scale=args.guidance_scale, batch_size=args.batch_size,
                              user_scale=args.user_scale)  # progress goes to stderr, so --json output stays clean
    elif args.adapter or args.users:
        from diffpref.experiments.preference_eval import evaluate_preference

        if not args.users:
            raise ValueError("--adapter needs --users FILE: the simulated users whose oracle judges the images")
        result = evaluate_preference(args.model, adapter=args.adapter, users=args.users,
                                     num_prompts=args.prompts if args.prompts is not None else 200, seed=args.seed,
                                     steps=args.steps, guidance_scale=args.guidance_scale, batch_size=args.batch_size)
    else:
        from diffpref.experiments.adherence import evaluate_adherence

        result = evaluate_adherence(args.model, num_prompts=args.prompts if args.prompts is not None else 240,
                                    seed=args.seed, steps=args.steps, guidance_scale=args.guidance_scale,
                                    batch_size=args.batch_size)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key:16s} {value}")
    return 0


def cmd_world_report(args) -> int:
    from diffpref.experiments.report import write_report

    path = write_report(args.results, args.out, grids=not args.no_grids)
    print(json.dumps({"report": str(path)}))
    return 0


def add_world_parser(sub) -> None:
    """Add ``world make-data | relabel | policy-pairs | make-users | eval | report`` to the CLI's subparsers."""
    world = sub.add_parser("world", help="the synthetic preference world").add_subparsers(dest="world_command", required=True)
    p = world.add_parser("make-data", help="Pick-a-Pic-schema preference data labelled by simulated users")
    p.add_argument("--out", required=True)
    p.add_argument("--users", type=int, default=None, help="number of random users")
    p.add_argument("--users-file", default=None, help="JSON list of users with weights")
    p.add_argument("--pairs-per-user", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="embedded")
    p.add_argument("--temperature", type=float, default=0.1, help="Bradley-Terry temperature of the simulated choices")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=25, help="sampling steps of each generation")
    p.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance (default: model's)")
    p.add_argument("--name-prob", type=float, default=0.5,
                   help="how often a caption names each attribute (lower: more pairs differ in what a user cares about)")
    p.set_defaults(func=cmd_world_make_data)

    p = world.add_parser("relabel", help="more data without new images: a make-data pool's pairs rated by other users")
    p.add_argument("--pool", required=True, nargs="+",
                   help="pairs.parquet file(s) written by `world make-data`, one pool together (their labels are ignored)")
    p.add_argument("--users-file", required=True, help="JSON list of users with weights")
    p.add_argument("--pairs-per-user", type=int, required=True, help="distinct pool pairs each user rates")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.1, help="Bradley-Terry temperature of the simulated choices")
    p.add_argument("--decided-only", action="store_true",
                   help="each user rates only pairs their oracle does not score equal (no coin-flip labels)")
    p.set_defaults(func=cmd_world_relabel)

    p = world.add_parser("policy-pairs", help="PPD on-policy pairs: an adapter's personalized images rated by each "
                                              "training user (train on them beside the offline pairs)")
    p.add_argument("--data", required=True, help="the PPD training pairs.parquet (users' offline pairs: the contexts)")
    p.add_argument("--adapter", required=True, help="PPD adapter that draws the images: embedded-ppd or a folder")
    p.add_argument("--out", required=True)
    p.add_argument("--users-file", default=None, help="world users of --data (default: users.json beside it)")
    p.add_argument("--captions-per-user", type=int, default=64, help="captions per user; each gives up to two pairs")
    p.add_argument("--contexts-per-user", type=int, default=8, help="token sets per user (different few-shot contexts)")
    p.add_argument("--shots", type=int, default=4, help="offline pairs in each context")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (as `world eval`)")
    p.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance (default: model's)")
    p.add_argument("--user-scale", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.1, help="Bradley-Terry temperature of the simulated choices")
    p.add_argument("--labeller", choices=["oracle", "reward"], default="oracle",
                   help="who labels the pairs: each user's oracle, or their few-shot reward model read from the "
                        "--shots choices of the context (as a deployment must)")
    p.add_argument("--reward-model", default="embedded-reward", help="--labeller reward: the reward model folder")
    p.set_defaults(func=cmd_world_policy_pairs)

    p = world.add_parser("make-users", help="write a JSON list of simulated users with known tastes")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--n", type=int, required=True, help="number of users")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kind", choices=["taste", "random"], default="taste",
                   help="taste: likes one value of 1-2 attribute families; random: 2-4 mixed-sign weights")
    p.add_argument("--families", default="1,2", help="taste: fewest,most attribute families per user")
    p.add_argument("--prefix", default="u", help="user ids are PREFIX0, PREFIX1, ...")
    p.add_argument("--exclude", default=None, help="taste: users file whose key combinations must not recur (held-out users)")
    p.set_defaults(func=cmd_world_make_users)

    p = world.add_parser("eval", help="prompt adherence of a model on world captions")
    p.add_argument("--model", default="embedded")
    p.add_argument("--prompts", type=int, default=None,
                   help="number of generations (default 240 for adherence, 200 prompt x seed pairs with --adapter)")
    p.add_argument("--adapter", default=None,
                   help="a trained LoRA or UNet folder, or a PPD adapter ('embedded-ppd' or a folder), to compare with the base")
    p.add_argument("--shots", type=int, default=None, help="PPD: example pairs per user (default 4)")
    p.add_argument("--user-scale", type=float, default=1.0, help="PPD: personalization strength")
    p.add_argument("--best-of", default=None,
                   help="personalized best-of-N: N (or a list 1,2,4,8,16) candidates per prompt, base or --adapter "
                        "PPD, ranked by each user's few-shot reward from --shots choices (default 60 prompts)")
    p.add_argument("--reward-model", default="embedded-reward", help="--best-of: few-shot reward model folder")
    p.add_argument("--users", default=None, help="JSON list of world users whose oracle rewards judge tuned vs base")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_world_eval)

    p = world.add_parser("report", help="markdown report with plots of the world experiments (bench/world_experiments.sh)")
    p.add_argument("--results", default="outputs", help="folder the experiments wrote to")
    p.add_argument("--out", required=True)
    p.add_argument("--no-grids", action="store_true", help="skip the image grids (they need the PPD adapter)")
    p.set_defaults(func=cmd_world_report)
