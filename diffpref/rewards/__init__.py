"""Reward models that score generated images the way the preference-tuning papers report them.

``diffpref eval --rewards hpsv2=PATH,aesthetic=HEAD@BACKBONE,pickscore=DIR,clip=PATH`` generates the
same prompts and seeds with the base and the tuned model, scores both with each reward model, and
reports the mean reward and the win rate against the base. Weights come only from local files.

- ``specs``: the ``--rewards`` grammar, the missing-file messages (where to get each file), loading.
- ``base``: ``RewardModel``, the batching shared by every reward.
- ``openclip_rewards``: HPSv2, CLIP score and the LAION aesthetic predictor (open_clip backbones).
- ``pickscore``: PickScore (a transformers ``CLIPModel``).
- ``evaluate``: generation of base and tuned images, then scoring (``evaluate_rewards``).
"""

from diffpref.rewards.base import RewardModel
from diffpref.rewards.specs import REWARD_NAMES, RewardSpec, check_reward_files, load_reward, parse_rewards

__all__ = ["REWARD_NAMES", "RewardModel", "RewardSpec", "check_reward_files", "load_reward", "parse_rewards"]
