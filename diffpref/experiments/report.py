"""``diffpref world report``: the world experiments as a markdown page with plots.

It reads what ``bench/world_experiments.sh`` left under ``--results`` (training histories,
summaries and evaluation JSON) and writes ``report.md`` plus PNG plots and image grids. Nothing
here invents a number: a missing result is reported as missing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

METHODS = ("dpo", "inpo", "kto", "mapo")
USERS = ("red_large", "dark_small")
SHOTS = (1, 2, 4, 8)


def _read(path: Path):
    """A result file, or None when it is missing or unfinished (an interrupted run leaves it empty)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _history(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _plot(out: Path, name: str, draw) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=110)
    draw(ax)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / name)
    plt.close(fig)
    return name


def trainer_section(results: Path, out: Path) -> list[str]:
    lines = ["## Single-user preference tuning (LoRA on the embedded model)", "",
             "Wall-clock includes the intermediate oracle evaluations (every `eval_every` steps); "
             "training time leaves them out.", "",
             "| method | user | steps | wall-clock (s) | training (s) | win rate vs base | adherence | base adherence |",
             "|---|---|---|---|---|---|---|---|"]
    curves = {}
    for method in METHODS:
        for user in USERS:
            summary = _read(results / f"{method}_{user}" / "summary.json")
            if summary is None:
                lines.append(f"| {method} | {user} | missing | | | | | |")
                continue
            ev = summary.get("eval", {})
            lines.append(f"| {method} | {user} | {summary['steps']} | {summary['wall_clock_s']} | "
                         f"{summary.get('train_s', '-')} | "
                         f"{ev.get('win_rate_vs_base', float('nan')):.3f} | {ev.get('adherence', float('nan')):.3f} | "
                         f"{ev.get('base_adherence', float('nan')):.3f} |")
            points = [(h["step"], h["win_rate_vs_base"]) for h in _history(results / f"{method}_{user}" / "history.jsonl")
                      if "win_rate_vs_base" in h]
            if ev:
                points.append((summary["steps"], ev["win_rate_vs_base"]))
            curves[(method, user)] = [(0, 0.5)] + points

    def draw(ax):
        for (method, user), points in curves.items():
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", label=f"{method} / {user}", linestyle="-" if user == USERS[0] else "--")
        ax.axhline(0.75, color="gray", linewidth=0.8)
        ax.set_xlabel("optimizer steps")
        ax.set_ylabel("oracle win rate vs base")
        ax.legend(fontsize=6)

    if curves:
        lines += ["", f"![win rate against steps]({_plot(out, 'win_rate_vs_steps.png', draw)})"]
    lines += ["", _inpo_ratio(curves), ""]
    return lines


def _inpo_ratio(curves) -> str:
    notes = []
    for user in USERS:
        dpo, inpo = curves.get(("dpo", user)), curves.get(("inpo", user))
        if not dpo or not inpo:
            continue
        target = dpo[-1][1]
        reached = next((step for step, wr in inpo if wr >= target and step > 0), None)
        ratio = f"{reached / dpo[-1][0]:.2f}" if reached else "not reached"
        notes.append(f"{user}: InPO reaches DPO's final win rate ({target:.3f} at step {dpo[-1][0]}) at step "
                     f"{reached if reached else '-'} (step ratio {ratio}, evaluated every eval_every steps)")
    return "; ".join(notes)


def _ceiling(result: dict, key: str = "ceiling_win_rate") -> str:
    """The eval's ``ceiling_win_rate`` or ``few_shot_ceiling_win_rate`` (diffpref.world.ceiling), or a dash
    for results written before it existed."""
    value = result.get(key)
    return "-" if value is None else f"{value:.3f}"


def _rate(value: float | None) -> str:
    """A rate, or "n/a" where the eval had nothing to measure it on (ppd_eval's ranking_accuracy is None
    when no user has held-out pairs)."""
    return "n/a" if value is None else f"{value:.3f}"


def ppd_section(results: Path, out: Path) -> list[str]:
    ev = results / "ppd_eval"
    lines = ["## PPD: one model, personalized from K of a user's choices", "",
             "| users | K | win rate vs base | adherence | base adherence | ranking accuracy | attainable ceiling "
             "| ceiling from K choices |",
             "|---|---|---|---|---|---|---|---|"]
    series = {}
    for group in ("unseen", "seen"):
        for k in SHOTS:
            r = _read(ev / f"{group}_k{k}.json")
            if r is None:
                continue
            series.setdefault((f"{group} users", "-"), []).append((k, r["win_rate_vs_base"]))
            if "few_shot_ceiling_win_rate" in r:  # dashed: what a perfect generator makes of the mean of K choices
                series.setdefault((f"{group} users: ceiling from K choices", "--"), []).append(
                    (k, r["few_shot_ceiling_win_rate"]))
            lines.append(f"| {group} | {k} | {r['win_rate_vs_base']:.3f} | {r['adherence']:.3f} | "
                         f"{r['base_adherence']:.3f} | {_rate(r['ranking_accuracy'])} | {_ceiling(r)} | "
                         f"{_ceiling(r, 'few_shot_ceiling_win_rate')} |")
    full = _read(ev / "unseen_k4_full.json")
    if full:
        lines.append(f"| unseen (200 prompts) | 4 | {full['win_rate_vs_base']:.3f} | {full['adherence']:.3f} | "
                     f"{full['base_adherence']:.3f} | {_rate(full['ranking_accuracy'])} | {_ceiling(full)} | "
                     f"{_ceiling(full, 'few_shot_ceiling_win_rate')} |")

    def draw(ax):
        for (label, linestyle), pts in series.items():
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", linestyle=linestyle, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("shots K")
        ax.set_ylabel("oracle win rate vs base")
        ax.legend()

    if series:
        lines += ["", f"![win rate against shots]({_plot(out, 'ppd_shots.png', draw)})"]
    gap = _read(ev / "dpo_users_k4.json")
    if gap:
        lines += ["", "Per-user DPO LoRA (upper bound, trained on 1000 pairs of that user) vs PPD with 4 shots:", "",
                  "| user | DPO LoRA | PPD K=4 | gap |", "|---|---|---|---|"]
        for user in USERS:
            dpo = _read(results / f"dpo_{user}" / "summary.json")
            ppd = gap["per_user"].get(user, {}).get("win_rate")
            if dpo and ppd is not None:
                d = dpo["eval"]["win_rate_vs_base"]
                lines.append(f"| {user} | {d:.3f} | {ppd:.3f} | {d - ppd:+.3f} |")
    lines += upper_bound_lines(results)
    interp = _read(ev / "interpolation.json")
    if interp:
        a, b = interp["users"]

        def draw_interp(ax):
            mixes = [p["mix"] for p in interp["curve"]]
            ax.plot(mixes, [p[a] for p in interp["curve"]], marker="o", label=f"{a}'s reward")
            ax.plot(mixes, [p[b] for p in interp["curve"]], marker="o", label=f"{b}'s reward")
            ax.set_xlabel(f"mix weight of {b}")
            ax.set_ylabel("mean oracle reward")
            ax.legend()

        lines += ["", f"Interpolation {a} -> {b} (monotonic: {interp['monotonic']}):", "",
                  f"![interpolation]({_plot(out, 'interpolation.png', draw_interp)})"]
    return lines + [""]


def upper_bound_lines(results: Path) -> list[str]:
    """The issue's upper bound on the unseen users themselves (``bench/ppd_dpo_upper_bound.sh``): a DPO LoRA per
    user from 1000 of their own pairs, beside PPD from K of their choices, all on the same 60 prompts and seeds."""
    bound = _read(results / "ppd_dpo_upper_bound" / "summary.json")
    if not bound:
        return []
    ppd = {k: _read(results / "ppd_eval" / f"unseen_k{k}_p60.json") for k in (4, 32)}
    shots = [k for k, r in ppd.items() if r]
    lines = ["", "Per-user DPO LoRA on the unseen users themselves (the issue's upper bound: 1000 of the user's own "
             "pairs, shipped `embedded_dpo.yaml`) against PPD from K of their choices, the same 60 prompts and seeds "
             "(`bench/ppd_dpo_upper_bound.sh`):", "",
             "| user | DPO LoRA | " + " | ".join(f"PPD K={k}" for k in shots) + " | DPO - PPD K=4 |",
             "|---|---|" + "---|" * len(shots) + "---|"]

    def row(name: str, dpo: float, ppd_rates: dict[int, float | None]) -> str:
        cells = " | ".join("-" if v is None else f"{v:.3f}" for v in ppd_rates.values())
        gap = "-" if ppd_rates.get(4) is None else f"{dpo - ppd_rates[4]:+.3f}"
        return f"| {name} | {dpo:.3f} | {cells} | {gap} |"

    for user, result in bound["per_user"].items():
        lines.append(row(user, result["win_rate"], {k: ppd[k]["per_user"].get(user, {}).get("win_rate") for k in shots}))
    lines.append(row("**mean**", bound["win_rate_vs_base"], {k: ppd[k]["win_rate_vs_base"] for k in shots}))
    lines += ["", f"DPO LoRA adherence {bound['adherence']:.3f} (base {bound['base_adherence']:.3f})."]
    # other settings of the same bound (the script's DPO_OVERRIDES), e.g. longer training or another beta
    for path in sorted(results.glob("ppd_dpo_upper_bound_*/summary.json")):
        variant = _read(path)
        if not variant:
            continue
        curve = ", ".join(f"{rate:.3f} at step {step}" for step, rate in variant["win_rate_by_step"].items())
        lines.append(f"- `{variant.get('overrides') or path.parent.name}`: mean win rate {curve}; adherence "
                     f"{variant['adherence']:.3f} at the end.")
    return lines


def app_section(results: Path, out: Path) -> list[str]:
    """The simulated raters of ``python -m diffpref.experiments.simulate`` (``app_raters.json``)."""
    sim = _read(results / "app_raters.json")
    if sim is None:
        return []
    modes = [m for m in ("active", "random") if m in sim]

    def draw(ax):
        for mode in modes:
            ax.plot(sim["ratings"], sim[mode], marker="o", label=f"{mode} pairs")
        ax.axhline(0.5, color="gray", linewidth=0.8)
        ax.set_xlabel("ratings given")
        ax.set_ylabel("oracle win rate vs base")
        ax.legend()

    lines = ["## The app: win rate after n ratings, active vs random pairs", "",
             f"{len(sim['users'])} simulated raters answer the rating service's pairs by their oracle; after each "
             f"rating their current tokens personalize {sim['prompts']} evaluation captions "
             f"({sim['steps']} sampling steps; an active pair is the most informative of {sim['candidates']} "
             f"candidates for each of {sim.get('candidate_prompts', 1)} prompts).", "",
             "| ratings | " + " | ".join(modes) + " |", "|---" * (len(modes) + 1) + "|"]
    for i, n in enumerate(sim["ratings"]):
        lines.append(f"| {n} | " + " | ".join(f"{sim[m][i]:.3f}" for m in modes) + " |")
    if all(f"{m}_decided" in sim for m in modes):
        lines += ["", "Answers that were not ties (a tie teaches the encoder nothing), mean per rater after "
                      f"{len(sim['ratings'])} ratings: " + ", ".join(f"{m} {sim[f'{m}_decided'][-1]:.1f}" for m in modes) + "."]
    if "random_at_8" in sim:
        reached = sim["active_reaches_random_at_8_after"]
        lines += ["", f"Random pairs reach {sim['random_at_8']:.3f} after 8 ratings; active pairs reach it after "
                      f"{reached if reached else 'more than ' + str(len(sim['ratings']))} ratings."]
    cmp = sim.get("comparison")
    if cmp is None and "random_at_8" in sim and "per_user" in sim:  # written before simulate compared the modes
        from diffpref.experiments.simulate import compare_modes

        cmp = compare_modes(sim["per_user"]["active"], sim["per_user"]["random"])
    if cmp is not None:
        diff, at5 = cmp["active_minus_random"], cmp.get("active_at_5_minus_random_at_8")
        lines += ["", f"Active minus random, per rater over the whole curve: {diff['mean']:+.3f} (90 % bootstrap "
                      f"interval over the {cmp['raters']} raters: {diff['ci90'][0]:+.3f} to {diff['ci90'][1]:+.3f})."
                  + (f" Active after 5 ratings minus random after 8: {at5['mean']:+.3f} ({at5['ci90'][0]:+.3f} to "
                     f"{at5['ci90'][1]:+.3f})." if at5 else "")]
    lines += ["", f"![active vs random]({_plot(out, 'app_active_vs_random.png', draw)})", ""]
    return lines


def write_report(results: str | Path, out: str | Path, grids: bool = True) -> Path:
    results, out = Path(results), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# The world experiments", "",
             "Produced by `bash bench/world_experiments.sh` then "
             f"`diffpref world report --results {results} --out {out}`.", ""]
    lines += trainer_section(results, out)
    lines += ppd_section(results, out)
    lines += app_section(results, out)
    if grids and (results / "embedded_ppd" / "ppd_config.json").exists():
        lines += grid_section(results, out)
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def grid_section(results: Path, out: Path, users=("red_large", "dark_small"), n: int = 8) -> list[str]:
    """Base (top row) vs personalized (bottom row) generations of the same captions and seeds."""
    from PIL import Image

    from diffpref.experiments.ppd_eval import as_examples, draw_pairs, generate_personalized
    from diffpref.experiments.preference_eval import eval_prompts, generate_world_images
    from diffpref.models.loading import load_pipeline
    from diffpref.personalize.pipeline import PersonalizedPipeline
    from diffpref.world.users import load_users

    pipe = PersonalizedPipeline.from_base(load_pipeline("embedded"), results / "embedded_ppd")
    pipe.set_progress_bar_config(disable=True)
    prompts, seeds = eval_prompts(n, 7)
    base = generate_world_images(pipe, prompts, seeds, 20, None, n, False, "base")
    lines = ["## Base (top) vs personalized with 4 shots (bottom)", ""]
    for i, name in enumerate(users):
        user = load_users(f"configs/users/{name}.json")[0]
        tokens = pipe.embed_user(as_examples(draw_pairs(pipe, user, 4, 0, 20, None, user_salt=100 + i)))
        tuned = generate_personalized(pipe, prompts, seeds, tokens, 1.0, 20, None, n)
        grid = np.concatenate([np.concatenate(list(base), axis=1), np.concatenate(list(tuned), axis=1)], axis=0)
        Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(out / f"grid_{name}.png")
        lines += [f"{name} ({user.weights}); captions: {', '.join(prompts)}", "", f"![{name}](grid_{name}.png)", ""]
    return lines
