"""PPD inside the shared trainer: user tokens from few-shot context, the base model as reference.

``PPDConditioner`` is the only PPD-specific piece of a training step. It appends each sample's
user tokens to the text conditioning (the encoder reads k of that user's *other* pairs, k varying
per sample; some samples get no user at all), and gives the reference pass the same conditioning
with the user removed, which is exactly the frozen base model. The objective is then plain
Diffusion-DPO (Dang et al., CVPR 2025, sec. 3: DPO with eps conditioned on (c, u)).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffpref.personalize.adapter import save_ppd_adapter
from diffpref.personalize.anchors import build_text_anchors
from diffpref.personalize.attention import concat_user_tokens, install_user_attention
from diffpref.personalize.context import ContextBank, build_context_bank
from diffpref.personalize.encoder import UserEncoder
from diffpref.training import randomness


def add_user_table(encoder: UserEncoder, num_users: int, num_tokens: int, dim: int, rank: int, seed: int) -> None:
    """Register the per-user token table on ``encoder`` (``ppd_user_table``): shared tokens plus per-user offsets.

    Offsets start at zero; with ``rank`` > 0 they are ``coordinates [U, rank] @ basis [rank, K * d]``.
    """
    device = next(encoder.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randn(num_tokens, dim, generator=gen)
    encoder.register_parameter("user_table_shared", torch.nn.Parameter(shared.to(device)))
    if rank:
        # A user is r coordinates in a taste space whose basis all users train together. The basis
        # starts small and random (zero would leave the coordinates without gradient).
        basis = torch.randn(rank, num_tokens * dim, generator=gen) * 0.1
        encoder.register_parameter("user_table_basis", torch.nn.Parameter(basis.to(device)))
    encoder.register_parameter("user_table", torch.nn.Parameter(
        torch.zeros(num_users, rank or num_tokens * dim, device=device)))


def user_table_tokens(shared: torch.Tensor, offsets: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """Tokens [B, K, d] of a user table's rows: ``shared [K, d]`` plus each row's offset (``offsets [B, K*d]``,
    or ``offsets [B, r] @ basis [r, K*d]`` for a low-rank table), layer-normed as the UNet reads them."""
    if basis is not None:
        offsets = offsets @ basis
    table = shared + offsets.view(len(offsets), *shared.shape)
    return torch.nn.functional.layer_norm(table, table.shape[-1:])


def start_from_adapter(encoder: UserEncoder, unet, adapter: str, num_tokens: int) -> None:
    """Copy a trained adapter's encoder head and user projections into a freshly built ``encoder`` and ``unet``
    (``ppd_init_adapter``); the shapes must match exactly, or a clear error names what differs."""
    from diffpref.personalize.adapter import (
        ENCODER_DIR,
        load_user_attention_weights,
        read_ppd_config,
        resolve_adapter,
    )

    path = resolve_adapter(adapter)
    trained_tokens = int(read_ppd_config(path)["num_tokens"])
    if trained_tokens != num_tokens:
        raise ValueError(f"ppd_init_adapter {path} makes {trained_tokens} user tokens, this config {num_tokens} "
                         "(ppd_num_tokens): they must match")
    trained = UserEncoder.from_pretrained(path / ENCODER_DIR)
    own, theirs = encoder.state_dict(), trained.state_dict()
    differ = sorted(k for k in set(own) | set(theirs) if k not in own or k not in theirs or own[k].shape != theirs[k].shape)
    if differ:
        raise ValueError(f"ppd_init_adapter {path}: its user encoder differs from this config's in {differ[:5]} "
                         "(set ppd_encoder, ppd_hidden, ppd_layers, ... as the adapter was trained)")
    encoder.load_state_dict(theirs)
    load_user_attention_weights(unet, path)


class PPDConditioner:
    def __init__(self, cfg, encoder: UserEncoder, bank: ContextBank, num_tokens: int, users: list[str]):
        self.cfg, self.encoder, self.bank, self.num_tokens, self.users = cfg, encoder, bank, num_tokens, users

    @classmethod
    def build(cls, cfg, unet, cache, accelerator, tokenizer=None) -> PPDConditioner:
        from diffpref.personalize.backbones import OpenClipBackbone

        backbone_path = None if cfg.ppd_backbone in ("embedded", "embedded-clip") else cfg.ppd_backbone
        with accelerator.main_process_first():
            backbone = OpenClipBackbone.from_pretrained(backbone_path, device=str(accelerator.device))
            bank = build_context_bank(cache, backbone, cfg.data_path, cfg.tie_policy, cfg.ppd_backbone,
                                      progress=accelerator.is_local_main_process)
        blocks = "all" if cfg.ppd_blocks == "all" else [b.strip() for b in cfg.ppd_blocks.split(",") if b.strip()]
        # The base is frozen before installing, so only the new user projections require grad.
        install_user_attention(unet, cfg.ppd_num_tokens, blocks=blocks, value_init_scale=cfg.ppd_value_init_scale)
        anchors = words = directions = None
        if cfg.ppd_anchors > 0:
            if tokenizer is None:
                raise ValueError("ppd_anchors > 0 needs the tokenizer to find the words of the training prompts")
            anchors, words = build_text_anchors(cache.prompts, tokenizer,
                                                lambda i: cache.prompt_cond(i)["prompt_embeds"], cfg.ppd_anchors)
            directions = backbone.embed_texts(words).float().cpu()
        del backbone  # frozen and fully cached: training never runs it
        evidence = cfg.ppd_encoder == "evidence"
        encoder = UserEncoder(feature_dim=bank.feature_dim, num_tokens=cfg.ppd_num_tokens,
                              token_dim=int(unet.config.cross_attention_dim), hidden=cfg.ppd_hidden,
                              layers=cfg.ppd_layers, heads=cfg.ppd_heads,
                              output_scale_init=cfg.ppd_token_scale_init,
                              preference_dim=bank.text.shape[1] if cfg.ppd_preference_weight > 0 or anchors is not None else 0,
                              num_anchors=0 if anchors is None else len(anchors),
                              anchor_evidence=anchors is not None and cfg.ppd_anchor_evidence,
                              free_anchors=cfg.ppd_free_anchors if anchors is not None else 0,
                              evidence_dim=bank.text.shape[1] if evidence else 0).to(accelerator.device)
        if cfg.ppd_init_adapter:
            start_from_adapter(encoder, unet, cfg.ppd_init_adapter, cfg.ppd_num_tokens)
        elif evidence:
            encoder.set_evidence_scale(bank.features(bank.context_rows))
        if anchors is not None:
            encoder.set_anchors(anchors, words, directions)
        if cfg.ppd_user_table:
            # One token set per training user, on the encoder module so that the trainer's optimizer,
            # checkpoints and resume cover it; ``export`` leaves it out of the shipped encoder. Every user
            # starts from the same shared tokens with a zero offset: a random start per user would be
            # noise the encoder cannot predict from a user's choices, and it swamped the regression
            # target (its error stayed at the tokens' variance). Now users differ only where DPO moved them.
            add_user_table(encoder, int(bank.user_index.max()) + 1, cfg.ppd_num_tokens,
                           int(unet.config.cross_attention_dim), cfg.ppd_table_rank, cfg.seed)
        encoder.train()
        return cls(cfg, encoder, bank, cfg.ppd_num_tokens, list(cache.users))

    @property
    def _encoder(self) -> UserEncoder:
        """The encoder itself, unwrapped from a distributed wrapper (for its own methods and parameters)."""
        return self.encoder.module if hasattr(self.encoder, "module") else self.encoder

    def condition(self, prompt_embeds: torch.Tensor, indices: torch.Tensor,
                  generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
        """(text conditioning with user tokens appended, auxiliary loss or None, metrics)."""
        features, mask = self.bank.sample_context(indices, generators, self.cfg.ppd_shots_min, self.cfg.ppd_shots_max)
        device = prompt_embeds.device
        aux, metrics = None, {}
        if self.cfg.ppd_preference_weight > 0:
            tokens, unscaled = self.encoder(features.to(device), mask.to(device), return_unscaled=True)
            # The trained pair is never in its own context, so this is a held-out prediction.
            logits = self._encoder.predict_preference(unscaled, self.bank.preference_diff(indices).to(device))
            aux = self.cfg.ppd_preference_weight * torch.nn.functional.softplus(-logits)
            metrics = {"user_pref_acc": float((logits.detach() > 0).float().mean())}
        else:
            tokens = self.encoder(features.to(device), mask.to(device))
        if self.cfg.ppd_user_table:
            # The UNet learns from each user's own DPO-found tokens (a low-noise signal per user); the
            # encoder learns to produce them from k of that user's other pairs. Layer norm keeps the
            # table at the scale and centring the encoder's output layer can reach.
            table = self.table_tokens(self.bank.user_index[indices].to(device))
            distill = self.cfg.ppd_distill_weight * (tokens - table.detach()).pow(2).mean(dim=(1, 2))
            aux = distill if aux is None else aux + distill
            metrics["distill_mse"] = float(distill.detach().mean())
            # What a user-blind encoder would score: the spread of the targets over the batch's users.
            metrics["table_spread"] = float(table.detach().var(dim=0, unbiased=False).mean())
            tokens = table
        keep = randomness.per_sample_uniform(generators) >= self.cfg.ppd_user_dropout
        tokens = tokens * keep.to(tokens.device, tokens.dtype).view(-1, 1, 1)  # zero tokens = no user
        return concat_user_tokens(prompt_embeds, tokens.to(prompt_embeds.dtype), self.num_tokens), aux, metrics

    def table_tokens(self, users: torch.Tensor) -> torch.Tensor:
        """The learned tokens [B, K, d] of training users ``users`` (indices into the table)."""
        encoder = self._encoder
        basis = encoder.user_table_basis if self.cfg.ppd_table_rank else None
        return user_table_tokens(encoder.user_table_shared, encoder.user_table[users], basis)

    def fit_encoder_to_table(self, steps: int, batch_size: int = 128, progress: bool = True) -> float:
        """Regress the encoder onto the final table tokens from k of each user's pairs; returns the last loss.

        During DPO the regression chases tokens that are still moving and under-fits them (its error
        stayed at the spread of the targets); against fixed targets it fits. Same context sampling as
        training (k in [ppd_shots_min, ppd_shots_max], any of the user's pairs).
        """
        encoder = self._encoder
        device = encoder.user_table.device
        with torch.no_grad():
            users = torch.arange(encoder.user_table.shape[0], device=device)
            targets = self.table_tokens(users).detach()
        head = [p for name, p in encoder.named_parameters() if not name.startswith("user_table")]
        optimizer = torch.optim.AdamW(head, lr=self.cfg.learning_rate, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
        gen = torch.Generator().manual_seed(self.cfg.seed + 1)
        rows_of_user = list(self.bank.by_user.items())
        loss = torch.tensor(float("nan"))
        for _ in tqdm(range(steps), desc="fit encoder to table", disable=not progress, dynamic_ncols=True):
            picks = torch.randint(len(rows_of_user), (batch_size,), generator=gen).tolist()
            # one row of each picked user; sample_context then draws k of that user's *other* pairs
            rows = torch.stack([rows_of_user[i][1][torch.randint(len(rows_of_user[i][1]), (1,), generator=gen)][0]
                                for i in picks])
            generators = [torch.Generator().manual_seed(int(s)) for s in torch.randint(2**31, (batch_size,), generator=gen)]
            features, mask = self.bank.sample_context(rows, generators, self.cfg.ppd_shots_min, self.cfg.ppd_shots_max)
            tokens = encoder(features.to(device), mask.to(device))
            loss = (tokens - targets[self.bank.user_index[rows].to(device)]).pow(2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        return float(loss.detach())

    def without_user(self, prompt_embeds: torch.Tensor) -> torch.Tensor:
        return concat_user_tokens(prompt_embeds[:, :-self.num_tokens], None, self.num_tokens)

    def export(self, unet, output_dir: Path, progress: bool = True) -> Path:
        fit_mse = None
        if self.cfg.ppd_user_table and self.cfg.ppd_encoder_fit_steps:
            fit_mse = self.fit_encoder_to_table(self.cfg.ppd_encoder_fit_steps, progress=progress)
        encoder = self._encoder
        if "user_table" in dict(encoder.named_parameters()):
            shipped = UserEncoder(**{k: v for k, v in encoder.config.items() if not k.startswith("_")})
            shipped.load_state_dict({k: v for k, v in encoder.state_dict().items() if not k.startswith("user_table")})
            encoder = shipped
        config = {
            "num_tokens": self.num_tokens, "blocks": self.cfg.ppd_blocks if self.cfg.ppd_blocks == "all"
            else [b.strip() for b in self.cfg.ppd_blocks.split(",")],
            "backbone": self.cfg.ppd_backbone, "backbone_kind": "open_clip", "token_dim": int(unet.config.cross_attention_dim),
            "feature_dim": self.bank.feature_dim, "base_model": self.cfg.model, "shots": [self.cfg.ppd_shots_min, self.cfg.ppd_shots_max],
            "trained_users": self.users,
        }
        if fit_mse is not None:
            config["encoder_fit_mse"] = fit_mse  # the encoder's final regression error onto the table tokens
        return save_ppd_adapter(output_dir, encoder, unet, config)
