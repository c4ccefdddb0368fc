"""The one place that turns a training config into the parts ``train`` is given.

    conditioner, evaluator = build_parts(cfg)
    train(cfg, conditioner, evaluator)

The trainer knows no conditioner or evaluator in particular; ``diffpref train`` and
``train/train.py`` call this, so a config alone decides what a run conditions on
(``conditioning: ppd``) and how it is evaluated (``eval_world: true``). Both imports are lazy:
a plain DPO run never imports the personalization or the world code.
"""

from __future__ import annotations

from pathlib import Path


def build_parts(cfg) -> tuple[object | None, object | None]:
    """(conditioner or None, evaluator or None) of ``cfg``."""
    conditioner = None
    if cfg.conditioning == "ppd":
        from diffpref.personalize.training import PPDConditioner

        conditioner = PPDConditioner(cfg)
    return conditioner, world_evaluator(cfg)


def world_evaluator(cfg):
    """The oracle win rate against the base model on world captions, when ``eval_world`` asks for it."""
    if not cfg.eval_world or cfg.eval_prompts == 0:
        return None
    if cfg.conditioning != "none":
        raise ValueError(f"eval_world judges the model without a user, which says nothing about conditioning: "
                         f"{cfg.conditioning}; set eval_world: false and evaluate the adapter with `diffpref world eval --adapter DIR --users FILE`")
    users_file = Path(cfg.eval_users) if cfg.eval_users else Path(cfg.data_path).parent / "users.json"
    if not users_file.is_file():
        raise FileNotFoundError(f"eval_world: true needs the world users who judge the model, but {users_file} does "
                                "not exist; set eval_users to a users JSON (make-data writes users.json beside the "
                                "pairs) or eval_world: false")
    from diffpref.experiments.preference_eval import TrainingEvaluator

    return TrainingEvaluator(cfg, users_file)
