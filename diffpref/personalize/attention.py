"""Decoupled user cross-attention (PPD, Dang et al. CVPR 2025; IP-Adapter's decoupled attention).

Every chosen cross-attention layer of the UNet reads a user as K extra tokens u, through new
projections of its own, with the same queries as the text:

    out = to_out( softmax(Q K^T / sqrt(d)) V  +  user_scale * softmax(Q K'^T / sqrt(d)) V' )
    K' = to_k_user(u),  V' = to_v_user(u)      (to_k_user starts as a copy of the layer's to_k,
                                                 to_v_user at zero: see below)

A fresh install starts as the base model exactly: ``to_v_user`` starts at zero (``value_init_scale=0``,
the default), so V' = 0 and the user term is exactly zero for any user tokens, as LoRA starts at
B = 0. Preference training therefore starts at DPO loss log 2 bit for bit. At the first step only
``to_v_user`` gets gradient (the others sit behind V' = 0); from the second step every trainable
weight does (K', the encoder). IP-Adapter copies to_v instead; with copies the personalized model
differs from the base before any training, and DPO's large beta turns that into a loss far from log 2.

How the user reaches the layers: the caller appends the user tokens to the text tokens,
``encoder_hidden_states = [text_tokens, user_tokens]`` (see `concat_user_tokens`), and every
cross-attention processor of the UNet knows that the last ``num_user_tokens`` positions are the
user. Passing them inside ``encoder_hidden_states`` keeps the stock UNet/pipeline signatures and
avoids ``cross_attention_kwargs``, which stock processors log as ignored on every forward.

"No user" is the zero user: ``to_k_user``/``to_v_user`` have no bias, so zero tokens give V' = 0
and the user term is exactly zero, whatever the scale (the same convention as IP-Adapter's zero
image tokens for the negative prompt). ``user_scale = 0`` skips the user branch entirely, so the
output is bit-identical to the text-only UNet.

Caveat: once installed, the UNet ALWAYS treats the last ``num_user_tokens`` positions as the user.
Calling it with plain text embeddings silently drops the last text tokens; always go through
`concat_user_tokens` (with ``None`` for "no user").

Generation: the user tokens stay the same for every denoising step, so a pipeline runs its loop
inside `fixed_user_tokens(unet)`: each user layer then projects K'/V' once per generation instead of
once per step, and only for the batch rows that hold a user (the zero "no user" rows, e.g. the
classifier-free-guidance unconditional half, add exactly nothing, so their user attention is skipped).

Another caveat (STYLE.md traps): ``pipe.enable_xformers_memory_efficient_attention()`` replaces
every attention processor with a plain xformers one and silently drops the user branch. Call
`guard_xformers_switch(pipe)` once after installing, and `assert_user_attention_intact(unet)`
where it matters (before training, before saving).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from diffpref.personalize.attention_processors import (
    TextOnlyAttnProcessor,
    UserAttnProcessor,
    check_backend,
    require_xformers,
)

# Set on the UNet by `install_user_attention`: which processors were installed where.
_INSTALL_ATTR = "_diffpref_user_attention"

# ----------------------------------------------------------------------------------------------
# Installation and access


def _cross_attention_modules(unet) -> dict[str, nn.Module]:
    """processor name (as in ``unet.attn_processors``) -> Attention module, for cross-attention layers only."""
    from diffusers.models.attention_processor import Attention

    return {
        f"{name}.processor": module
        for name, module in unet.named_modules()
        if isinstance(module, Attention) and module.is_cross_attention
    }


def _module_dict_key(name: str) -> str:
    return name.replace(".", "__")


def _chosen(name: str, blocks: str | Iterable[str]) -> bool:
    if blocks == "all":
        return True
    return any(name == prefix or name.startswith(prefix.rstrip(".") + ".") for prefix in blocks)


def _backend_of(processor) -> tuple[str, Callable | None]:
    """The attention backend a stock processor runs: ('xformers', its op) for diffusers' xformers one."""
    from diffusers.models.attention_processor import XFormersAttnProcessor

    if isinstance(processor, XFormersAttnProcessor):
        return "xformers", processor.attention_op
    return "sdpa", None


def install_user_attention(
    unet,
    num_user_tokens: int,
    blocks: str | list[str] = "all",
    scale: float = 1.0,
    value_init_scale: float = 0.0,
    backend: str | None = None,
) -> nn.ModuleDict:
    """Give the cross-attention layers of ``unet`` a decoupled user branch; returns the new processors.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (SD1.5 / SDXL style).
        num_user_tokens: K, the number of user tokens appended to the text tokens.
        blocks: "all", or name prefixes of the layers that read the user (e.g. ``["up_blocks", "mid_block"]``);
            the other cross-attention layers get a `TextOnlyAttnProcessor`. Self-attention keeps its processor.
        scale: initial user scale.
        value_init_scale: ``to_v_user`` starts as this multiple of ``to_v``. 0 (default): at zero, so the
            UNet starts as the base model exactly. Above 0 the user branch starts as an echo of the text
            attention (and the model differs from the base before training); at 1 a second, text-like
            attention output doubles the layer's output and breaks prompt adherence.
        backend: 'sdpa' or 'xformers' for the new processors. None (default) keeps what each layer ran:
            after ``unet.enable_xformers_memory_efficient_attention()`` the user branch runs on xformers too.

    Returns:
        ``nn.ModuleDict`` of the `UserAttnProcessor` s, keyed by processor name with "." replaced by "__".
        The processors are also registered inside the UNet (``unet.parameters()`` / ``unet.to()`` see
        them), so freeze the base with ``unet.requires_grad_(False)`` BEFORE installing.
    """
    if hasattr(unet, _INSTALL_ATTR):
        raise ValueError("user attention is already installed on this UNet; build a fresh UNet to install it again")
    if blocks != "all" and (isinstance(blocks, str) or not list(blocks)):
        raise ValueError(f"blocks must be 'all' or a non-empty list of name prefixes, got {blocks!r}")
    cross = _cross_attention_modules(unet)
    if not cross:
        raise ValueError("this UNet has no cross-attention layers to condition on a user")
    if blocks != "all":
        for prefix in blocks:
            if not any(_chosen(name, [prefix]) for name in cross):
                available = sorted({".".join(name.split(".")[:2]) for name in cross})
                raise ValueError(
                    f"block prefix {prefix!r} matches no cross-attention layer; cross-attention lives under: "
                    f"{', '.join(available)} (or use blocks='all')"
                )

    if backend is not None:
        check_backend(backend)
    if value_init_scale < 0:
        raise ValueError(f"value_init_scale={value_init_scale} must be >= 0 (0: the user branch starts at exactly zero)")
    processors = dict(unet.attn_processors)
    user_processors: dict[str, UserAttnProcessor] = {}
    text_only: list[str] = []
    for name, attn in cross.items():
        # Installing after the stock xformers switch must not quietly fall back to sdpa on these layers.
        layer_backend, attention_op = (backend, None) if backend is not None else _backend_of(processors[name])
        if not _chosen(name, blocks):
            processors[name] = TextOnlyAttnProcessor(num_user_tokens, backend=layer_backend, attention_op=attention_op)
            text_only.append(name)
            continue
        processor = UserAttnProcessor(
            hidden_size=attn.to_k.out_features,
            cross_attention_dim=attn.to_k.in_features,
            num_user_tokens=num_user_tokens,
            scale=scale,
        )
        processor.set_backend(layer_backend, attention_op)
        # copies, not shared tensors: the user projections train on their own
        with torch.no_grad():
            processor.to_k_user.weight.copy_(attn.to_k.weight)
            processor.to_v_user.weight.copy_(attn.to_v.weight * value_init_scale)
        processor.to(device=attn.to_k.weight.device, dtype=attn.to_k.weight.dtype)
        processors[name] = processor
        user_processors[name] = processor
    if not user_processors:
        raise ValueError(f"blocks={blocks!r} selects no cross-attention layer")

    unet.set_attn_processor(processors)
    setattr(unet, _INSTALL_ATTR, dict(num_user_tokens=num_user_tokens, user=list(user_processors), text_only=text_only))
    return nn.ModuleDict({_module_dict_key(name): processor for name, processor in user_processors.items()})


def _installed(unet) -> dict:
    info = getattr(unet, _INSTALL_ATTR, None)
    if info is None:
        raise ValueError("no user attention is installed on this UNet; call install_user_attention(unet, ...) first")
    return info


def user_attention_processors(unet) -> dict[str, UserAttnProcessor]:
    """processor name -> `UserAttnProcessor`, in the UNet's order (checks that none was replaced)."""
    assert_user_attention_intact(unet)
    processors = unet.attn_processors
    return {name: processors[name] for name in _installed(unet)["user"]}


def num_user_tokens_of(unet) -> int:
    """K, the number of user tokens the installed UNet expects after the text tokens."""
    return _installed(unet)["num_user_tokens"]


def user_attention_parameters(unet) -> list[nn.Parameter]:
    """The trainable new projections (to_k_user / to_v_user of every user layer), nothing else."""
    return [p for processor in user_attention_processors(unet).values() for p in processor.parameters()]


def user_attention_state_dict(unet) -> dict[str, torch.Tensor]:
    """The user projections, keyed as in ``unet.state_dict()`` (e.g.
    ``mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_k_user.weight``): stable across installs."""
    state = {}
    for name, processor in user_attention_processors(unet).items():
        for key, tensor in processor.state_dict().items():
            state[f"{name}.{key}"] = tensor.detach()
    return state


def load_user_attention_state_dict(unet, state: dict[str, torch.Tensor]) -> None:
    """Load `user_attention_state_dict` output into an installed UNet; keys and shapes must match exactly."""
    own = user_attention_state_dict(unet)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            "user attention state dict does not match the installed layers (same num_user_tokens/blocks and "
            f"UNet architecture needed).\n  missing keys ({len(missing)}): {missing[:5]}{' ...' if len(missing) > 5 else ''}"
            f"\n  unexpected keys ({len(unexpected)}): {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    bad_shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if state[k].shape != v.shape]
    if bad_shapes:
        raise ValueError("user attention state dict has wrong shapes (given vs installed): " + "; ".join(bad_shapes))
    with torch.no_grad():
        for key, tensor in own.items():
            tensor.copy_(state[key])


def set_user_scale(unet, scale: float) -> None:
    """Scale of the user branch in every user layer; 0 = "no user" (the branch is skipped)."""
    for processor in user_attention_processors(unet).values():
        processor.scale = float(scale)


@contextlib.contextmanager
def fixed_user_tokens(unet) -> Iterator[None]:
    """Inside, the UNet is called again and again with the same user tokens (one generation's steps).

    Each user layer then projects the user tokens to K'/V' on the first call only and reuses them
    while the same tokens come back (new or modified tokens are projected again), and runs the user
    attention on the batch rows that hold a user only: the zero user adds exactly nothing, so the
    classifier-free-guidance unconditional half costs nothing extra. Only under ``torch.no_grad()``;
    with gradients enabled the layers compute everything on every call, as outside.
    """
    processors = list(user_attention_processors(unet).values())
    before = [processor.reuse_user_projections for processor in processors]
    for processor in processors:
        processor.reuse_user_projections = True
    try:
        yield
    finally:
        for processor, previous in zip(processors, before):
            processor.reuse_user_projections = previous
            processor._fixed = None  # drop the cached projections and the tokens they hold


def set_user_attention_backend(unet, backend: str, attention_op: Callable | None = None) -> None:
    """Switch the user and text-only processors between 'sdpa' and 'xformers' (keeps the user branch)."""
    check_backend(backend)
    if backend == "xformers":
        require_xformers()  # fail before anything changes
    assert_user_attention_intact(unet)
    for processor in unet.attn_processors.values():
        if isinstance(processor, (UserAttnProcessor, TextOnlyAttnProcessor)):
            processor.set_backend(backend, attention_op)


def assert_user_attention_intact(unet) -> None:
    """Raise RuntimeError if a user / text-only processor was replaced since `install_user_attention`."""
    info = _installed(unet)
    processors = unet.attn_processors
    expected = [(name, UserAttnProcessor) for name in info["user"]] + [(name, TextOnlyAttnProcessor) for name in info["text_only"]]
    replaced = [
        f"{name} ({type(processors.get(name)).__name__})"
        for name, kind in expected
        if not isinstance(processors.get(name), kind)
    ]
    if replaced:
        raise RuntimeError(
            f"{len(replaced)} user-attention processor(s) were replaced, so the user branch is gone: "
            f"{', '.join(replaced[:4])}{' ...' if len(replaced) > 4 else ''}. Something called set_attn_processor, "
            "set_default_attn_processor or enable_xformers_memory_efficient_attention after install_user_attention; "
            "use set_user_attention_backend / guard_xformers_switch instead, or reinstall and reload the user weights."
        )


def guard_xformers_switch(pipe):
    """Make ``pipe.enable/disable_xformers_memory_efficient_attention()`` (and the UNet's) keep the user branch.

    The stock switch replaces every attention processor with a plain one. The guarded one fails first
    with a clear RuntimeError if xformers/CUDA is missing, otherwise runs the stock switch (self-attention,
    VAE, ...) and puts the user and text-only processors back, moved to their own xformers (or sdpa) path.
    Patches the instances only; returns ``pipe``.
    """
    unet = pipe.unet
    _installed(unet)
    if getattr(pipe, "_diffpref_xformers_guarded", False):
        return pipe

    def guarded(stock_switch):
        def set_use_memory_efficient_attention_xformers(valid: bool, attention_op: Callable | None = None) -> None:
            if valid:
                require_xformers()
            assert_user_attention_intact(unet)
            ours = {
                name: processor
                for name, processor in unet.attn_processors.items()
                if isinstance(processor, (UserAttnProcessor, TextOnlyAttnProcessor))
            }
            stock_switch(valid, attention_op)
            for processor in ours.values():
                processor.set_backend("xformers" if valid else "sdpa", attention_op)
            processors = dict(unet.attn_processors)
            processors.update(ours)
            unet.set_attn_processor(processors)

        return set_use_memory_efficient_attention_xformers

    # enable_/disable_xformers_memory_efficient_attention of both the pipeline and the UNet go through
    # set_use_memory_efficient_attention_xformers; the instance attribute shadows the class method.
    pipe.set_use_memory_efficient_attention_xformers = guarded(pipe.set_use_memory_efficient_attention_xformers)
    unet.set_use_memory_efficient_attention_xformers = guarded(unet.set_use_memory_efficient_attention_xformers)
    pipe._diffpref_xformers_guarded = True
    return pipe


# ----------------------------------------------------------------------------------------------
# Inputs


def concat_user_tokens(
    text_embeds: torch.Tensor, user_tokens: torch.Tensor | None, num_user_tokens: int
) -> torch.Tensor:
    """[B, L, D] text + [B, K, D] user -> [B, L + K, D] ``encoder_hidden_states`` for an installed UNet.

    ``user_tokens=None`` is "no user" (zero tokens, whose user term is exactly zero); a [1, K, D] (or
    [K, D]) user is broadcast to the batch. With classifier-free guidance, give the negative prompt
    embeddings ``None`` (IP-Adapter's convention: the guidance then also pushes towards the user) and
    the positive ones the user.
    """
    batch_size, _, width = text_embeds.shape
    if user_tokens is None:
        user_tokens = text_embeds.new_zeros(batch_size, num_user_tokens, width)
    if user_tokens.ndim == 2:
        user_tokens = user_tokens.unsqueeze(0)
    if user_tokens.ndim != 3 or user_tokens.shape[1:] != (num_user_tokens, width):
        raise ValueError(
            f"user tokens must be [B, {num_user_tokens}, {width}] (or [1, {num_user_tokens}, {width}]) to match "
            f"text embeddings {tuple(text_embeds.shape)}; got {tuple(user_tokens.shape)}"
        )
    if user_tokens.shape[0] == 1 and batch_size != 1:
        user_tokens = user_tokens.expand(batch_size, -1, -1)
    elif user_tokens.shape[0] != batch_size:
        raise ValueError(f"user tokens have batch {user_tokens.shape[0]}, text embeddings {batch_size}; give 1 or {batch_size}")
    return torch.cat([text_embeds, user_tokens.to(device=text_embeds.device, dtype=text_embeds.dtype)], dim=1)
