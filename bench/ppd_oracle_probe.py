"""Diagnostic (not a benchmark): does the DPO signal favour steering a user towards their true taste?

For training pairs of a world PPD run, the Diffusion-DPO bracket (Wallace et al. 2023, eq. 14)

    (||eps - eps_user(x_t^w)||^2 - ||eps - eps_base(x_t^w)||^2) - (same for x_t^l)

is computed with three user-token choices for the pair's user: tokens the adapter's encoder makes
from k of that user's other pairs ("own"), from another user's pairs ("other"), and the text anchor
of the attribute value the user's oracle likes most ("oracle", e.g. the state of "red" for a user
who likes red; users without a categorical taste are left out). A negative bracket is an implicit
"right"; DPO can only learn a user branch whose right answers are more frequent than chance.

    OMP_NUM_THREADS=2 python bench/ppd_oracle_probe.py --adapter outputs/ppd_anchor \
        --cache .cache/diffpref/KEY --users data/world_ppd/users.json --t-min 50 --t-max 950

``--cache`` is the latent cache folder of the PPD run (it holds ``context-*.safetensors``); the
adapter must use text anchors (``ppd_anchors > 0``). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def oracle_word(weights: dict[str, float]) -> str | None:
    """The categorical value with the largest positive weight ("color:red" -> "red"), or None."""
    liked = [(value, key.split(":", 1)[1]) for key, value in weights.items() if ":" in key and value > 0]
    return max(liked)[1] if liked else None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, help="a PPD adapter trained with ppd_anchors > 0")
    parser.add_argument("--cache", required=True, help="the run's latent cache folder")
    parser.add_argument("--users", required=True, help="the world users of the data (users.json beside pairs)")
    parser.add_argument("--pairs", type=int, default=384)
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--t-min", type=int, default=50)
    parser.add_argument("--t-max", type=int, default=950)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from diffpref.models.loading import load_pipeline
    from diffpref.experiments.ppd_eval import denoising_errors
    from diffpref.personalize.context import ContextBank
    from diffpref.personalize.pipeline import PersonalizedPipeline
    from diffpref.training.cache import PreferenceCache
    from diffpref.world.users import load_users

    cache = PreferenceCache(args.cache)
    banks = sorted(Path(args.cache).glob("context-*.safetensors"))
    if not banks:
        raise SystemExit(f"{args.cache} holds no context-*.safetensors: pass the cache folder of a PPD run")
    bank = ContextBank.load(banks[0])
    pipe = PersonalizedPipeline.from_base(load_pipeline("embedded"), args.adapter)
    encoder, unet = pipe.user_encoder.eval(), pipe.unet
    if encoder.config.num_anchors == 0:
        raise SystemExit(f"{args.adapter} has no text anchors (trained with ppd_anchors=0): no oracle tokens to build")
    words = encoder.config.anchor_words
    # Pick-a-Pic user ids of world data are the users' positions in users.json.
    users = {str(i): u for i, u in enumerate(load_users(args.users))}
    gen = torch.Generator().manual_seed(args.seed)
    rows = torch.randperm(len(cache), generator=gen)[:args.pairs]
    alphas = pipe.scheduler.alphas_cumprod
    brackets: dict[str, list[float]] = {"own": [], "other": [], "oracle": []}
    K, d = encoder.config.num_tokens, encoder.anchors.shape[1]
    with torch.no_grad():
        for start in range(0, len(rows), 32):
            idx = rows[start:start + 32]
            items = [cache[int(i)] for i in idx]
            latents = torch.stack([torch.stack([it["latents_0"], it["latents_1"]]) for it in items]).float()
            label = torch.tensor([float(it["label"]) for it in items])
            text = torch.stack([it["prompt_embeds"] for it in items]).float()
            gens = [torch.Generator().manual_seed(int(i)) for i in idx]
            own = encoder(*bank.sample_context(idx, gens, args.shots, args.shots))
            other = encoder(*bank.sample_context(idx[torch.randperm(len(idx), generator=gen)], gens, args.shots, args.shots))
            oracle = []
            for it in items:
                word = oracle_word(users[cache.users[int(it["user_index"])]].weights)
                oracle.append(encoder.anchors[words.index(word)].expand(K, d) if word in words else torch.zeros(K, d))
            oracle = torch.stack(oracle)
            t = torch.randint(args.t_min, args.t_max, (len(idx),), generator=gen)
            noise = torch.randn(len(idx), *latents.shape[2:], generator=gen)
            a = alphas[t].view(-1, 1, 1, 1)
            x = torch.cat([a.sqrt() * latents[:, 0] + (1 - a).sqrt() * noise, a.sqrt() * latents[:, 1] + (1 - a).sqrt() * noise])

            def errors(tokens):
                both = None if tokens is None else torch.cat([tokens, tokens])
                err = denoising_errors(unet, x, torch.cat([t, t]), torch.cat([noise, noise]), torch.cat([text, text]),
                                       both, pipe.num_user_tokens)
                return err[:len(idx)], err[len(idx):]

            ref0, ref1 = errors(None)
            for name, tokens in (("own", own), ("other", other), ("oracle", oracle)):
                m0, m1 = errors(tokens)
                bracket = torch.where(label >= 0.5, (m0 - ref0) - (m1 - ref1), (m1 - ref1) - (m0 - ref0))
                brackets[name] += bracket[tokens.abs().sum((1, 2)) > 0].tolist()
    result = {name: {"implicit_acc": float(np.mean(np.array(v) < 0)), "n": len(v), "mean_bracket": float(np.mean(v))}
              for name, v in brackets.items()}
    result["t_range"] = [args.t_min, args.t_max]
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
