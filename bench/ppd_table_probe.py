"""Diagnostic (not a benchmark): PPD with a free per-user token table instead of the encoder.

Does DPO through the decoupled user attention learn when each training user has its own free tokens?
    OMP_NUM_THREADS=1 python bench/ppd_table_probe.py output_dir=runs/exp/table max_train_steps=400 ppd_token_scale_init=1.0 ppd_preference_weight=0
"""
import sys

import torch

from diffpref.personalize import training as T
from diffpref.personalize.attention import concat_user_tokens

orig_build = T.PPDConditioner.build.__func__

def build(cls, cfg, unet, cache, accelerator, tokenizer=None):
    self = orig_build(cls, cfg, unet, cache, accelerator, tokenizer=tokenizer)
    n_users = int(self.bank.user_index.max()) + 1
    d = int(unet.config.cross_attention_dim)
    # the table lives on the encoder module so the trainer optimises and checkpoints it
    self.encoder.user_table = torch.nn.Parameter(torch.randn(n_users, cfg.ppd_num_tokens, d) * cfg.ppd_token_scale_init)
    return self

def condition(self, prompt_embeds, indices, generators):
    tokens = self._encoder.user_table[self.bank.user_index[indices]]
    return concat_user_tokens(prompt_embeds, tokens.to(prompt_embeds.dtype), self.num_tokens), None, {}

T.PPDConditioner.build = classmethod(build)
T.PPDConditioner.condition = condition
from diffpref.cli import main

sys.exit(main(["train", "--config", "configs/embedded_ppd.yaml", *sys.argv[1:]]))
