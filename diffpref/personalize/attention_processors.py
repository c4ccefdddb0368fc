"""The attention processors of PPD's decoupled user cross-attention (see ``attention.py``).

``UserAttnProcessor``: text attention plus ``scale`` times an attention over the K user tokens at the
end of ``encoder_hidden_states``, through projections of its own. ``TextOnlyAttnProcessor``: for
layers without user conditioning, drops the user tokens and runs the stock processor. Both run on
sdpa or xformers (``BACKENDS``). Installing them on a UNet and reading their weights back is
``attention.py``'s job.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

BACKENDS = ("sdpa", "xformers")


def require_xformers():
    """Return ``xformers.ops``, or raise a RuntimeError that names the sdpa alternative."""
    if not torch.cuda.is_available():
        raise RuntimeError(
            "xformers memory-efficient attention needs a CUDA GPU and none is available. Keep the default "
            "'sdpa' backend (torch.nn.functional.scaled_dot_product_attention), which is memory-efficient on "
            "PyTorch 2 as well: set_user_attention_backend(unet, 'sdpa')."
        )
    try:
        import xformers.ops
    except ImportError as error:
        raise RuntimeError(
            "xformers is not installed, so the user attention cannot switch to it. Keep the default 'sdpa' "
            "backend (torch.nn.functional.scaled_dot_product_attention): set_user_attention_backend(unet, 'sdpa')."
        ) from error
    return xformers.ops


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; valid backends: {', '.join(BACKENDS)}")


def _split_user_tokens(encoder_hidden_states: torch.Tensor, num_user_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L + K, D] -> text [B, L, D], user [B, K, D]."""
    total = encoder_hidden_states.shape[1]
    if total <= num_user_tokens:
        raise ValueError(
            f"encoder_hidden_states has {total} tokens, but the user attention expects text tokens followed by "
            f"{num_user_tokens} user tokens; build it with concat_user_tokens(text_embeds, user_tokens, {num_user_tokens})"
        )
    text_length = total - num_user_tokens
    return encoder_hidden_states[:, :text_length], encoder_hidden_states[:, text_length:]


def _split_mask(
    attention_mask: torch.Tensor | None, text_length: int, num_user_tokens: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A cross-attention mask covers either the text only, or text + user tokens (the last dim)."""
    if attention_mask is None:
        return None, None
    length = attention_mask.shape[-1]
    if length == text_length:
        return attention_mask, None
    if length == text_length + num_user_tokens:
        return attention_mask[..., :text_length], attention_mask[..., text_length:]
    raise ValueError(
        f"cross-attention mask covers {length} tokens; expected {text_length} (text only) or "
        f"{text_length + num_user_tokens} (text + {num_user_tokens} user tokens)"
    )


class UserAttnProcessor(nn.Module):
    """Cross-attention over text tokens plus a decoupled attention over K user tokens.

    Follows diffusers' ``AttnProcessor2_0`` step by step, so with ``scale == 0`` (the user branch is
    not computed at all) the output is bit-identical to it on the text tokens.
    The user tokens are not passed through ``attn.norm_cross`` (as IP-Adapter's image tokens), but
    the user keys do go through ``attn.norm_k`` when the layer has one: they meet the same queries.
    """

    def __init__(
        self,
        hidden_size: int,
        cross_attention_dim: int,
        num_user_tokens: int,
        scale: float = 1.0,
        backend: str = "sdpa",
    ):
        super().__init__()
        if num_user_tokens < 1:
            raise ValueError(f"num_user_tokens must be >= 1, got {num_user_tokens}")
        self.hidden_size = hidden_size
        self.cross_attention_dim = cross_attention_dim
        self.num_user_tokens = num_user_tokens
        self.scale = float(scale)
        self.to_k_user = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_user = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.backend = "sdpa"
        self.attention_op: Callable | None = None
        self.set_backend(backend)
        # Set by `fixed_user_tokens`: reuse the user's K'/V' from call to call (see _fixed_user_projections).
        self.reuse_user_projections = False
        self._fixed: tuple | None = None

    def set_backend(self, backend: str, attention_op: Callable | None = None) -> None:
        """'sdpa' (default) or 'xformers' (needs CUDA and xformers; raises RuntimeError otherwise)."""
        check_backend(backend)
        if backend == "xformers":
            require_xformers()
        self.backend = backend
        self.attention_op = attention_op

    def extra_repr(self) -> str:
        return f"num_user_tokens={self.num_user_tokens}, scale={self.scale}, backend={self.backend!r}"

    def _attention(self, attn, query, key, value, mask):
        # query/key/value: (batch, seq, heads, head_dim); mask: (batch * heads, 1 or q_len, k_len) or None
        batch_size, query_length, heads, _ = query.shape
        if mask is not None:
            mask = mask.view(batch_size, heads, -1, mask.shape[-1])
        if self.backend == "xformers":
            xops = require_xformers()
            if mask is not None:
                # xformers does not broadcast the query dimension of the bias
                mask = mask.expand(-1, -1, query_length, -1)
            # xformers takes (batch, seq, heads, head_dim) and returns the same layout
            out = xops.memory_efficient_attention(query, key, value, attn_bias=mask, op=self.attention_op, scale=attn.scale)
            return out.transpose(1, 2)
        # sdpa takes (batch, heads, seq, head_dim); like AttnProcessor2_0 it uses the default 1/sqrt(d) scale
        return F.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=mask, dropout_p=0.0, is_causal=False
        )

    def _project_user(self, attn, user_states, head_dim, dtype):
        """User tokens (batch, K, D) -> K', V' (batch, K, heads, head_dim)."""
        user_states = user_states.to(self.to_k_user.weight.dtype)
        user_key = self.to_k_user(user_states).to(dtype).view(user_states.shape[0], -1, attn.heads, head_dim)
        user_value = self.to_v_user(user_states).to(dtype).view(user_states.shape[0], -1, attn.heads, head_dim)
        if attn.norm_k is not None:
            user_key = attn.norm_k(user_key)
        return user_key, user_value

    def _fixed_user_projections(self, attn, user_states, head_dim, dtype):
        """(rows, K', V') of the rows that hold a user, computed once while the same user tokens come back.

        "The same" is the same tensor memory, unchanged: storage address, shape and strides, and the
        version counter that every in-place write bumps (and the same projection weights, by the same
        test). The cache holds references to the tokens' and the weights' memory, so no other tensor can
        take those addresses while it lives. Zero rows ("no user") are left out: their V' is 0, they add
        exactly nothing.
        """
        weights = (self.to_k_user.weight, self.to_v_user.weight)
        signature = (user_states.data_ptr(), tuple(user_states.shape), user_states.stride(), user_states._version,
                     user_states.dtype, dtype, *((w.data_ptr(), w._version) for w in weights))
        if self._fixed is None or self._fixed[0] != signature:
            # a host sync (on a GPU), once per generation and layer
            found = user_states.flatten(1).ne(0).any(1).nonzero().flatten().tolist()
            user_key = user_value = rows = None
            if found:
                # consecutive rows (the guidance batch is [unconditional, conditional]) index as a view, not a copy
                consecutive = found == list(range(found[0], found[-1] + 1))
                rows = slice(found[0], found[-1] + 1) if consecutive else torch.tensor(found, device=user_states.device)
                user_key, user_value = self._project_user(attn, user_states[rows], head_dim, dtype)
            self._fixed = (signature, (user_states, *(w.detach() for w in weights)), rows, user_key, user_value)
        return self._fixed[2:]

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if encoder_hidden_states is None:
            raise ValueError("UserAttnProcessor is a cross-attention processor; it got no encoder_hidden_states")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        text_states, user_states = _split_user_tokens(encoder_hidden_states, self.num_user_tokens)
        batch_size, text_length, _ = text_states.shape
        text_mask, user_mask = _split_mask(attention_mask, text_length, self.num_user_tokens)
        text_mask = attn.prepare_attention_mask(text_mask, text_length, batch_size)

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            text_states = attn.norm_encoder_hidden_states(text_states)
        key = attn.to_k(text_states)
        value = attn.to_v(text_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        # (batch, seq, heads, head_dim)
        query = query.view(batch_size, -1, attn.heads, head_dim)
        key = key.view(batch_size, -1, attn.heads, head_dim)
        value = value.view(batch_size, -1, attn.heads, head_dim)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        # (batch, heads, seq, head_dim)
        hidden_states = self._attention(attn, query, key, value, text_mask)

        # scale 0 means "no user": the branch is not computed, the output is the text-only one bit for bit
        if self.scale != 0 and self.reuse_user_projections and not torch.is_grad_enabled():
            # inside `fixed_user_tokens`: K'/V' from the first step, the user attention on the user rows only
            rows, user_key, user_value = self._fixed_user_projections(attn, user_states, head_dim, query.dtype)
            if rows is not None:  # None: no row holds a user
                user_mask = attn.prepare_attention_mask(user_mask, self.num_user_tokens, batch_size)
                if user_mask is not None:  # (batch * heads, q, K) -> the rows' (rows * heads, q, K)
                    user_mask = user_mask.unflatten(0, (batch_size, attn.heads))[rows].flatten(0, 1)
                user_hidden_states = self._attention(attn, query[rows], user_key, user_value, user_mask)
                # in place is safe: no autograd here, and hidden_states is this call's own attention output
                hidden_states[rows] += self.scale * user_hidden_states
        elif self.scale != 0:
            user_key, user_value = self._project_user(attn, user_states, head_dim, query.dtype)
            user_mask = attn.prepare_attention_mask(user_mask, self.num_user_tokens, batch_size)
            user_hidden_states = self._attention(attn, query, user_key, user_value, user_mask)
            hidden_states = hidden_states + self.scale * user_hidden_states

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        # linear proj
        hidden_states = attn.to_out[0](hidden_states)
        # dropout
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states


class TextOnlyAttnProcessor:
    """Cross-attention for layers without user conditioning: drops the user tokens, then runs the stock
    ``AttnProcessor2_0`` (or ``XFormersAttnProcessor`` on the 'xformers' backend) on the text tokens."""

    def __init__(self, num_user_tokens: int, backend: str = "sdpa", attention_op: Callable | None = None):
        if num_user_tokens < 1:
            raise ValueError(f"num_user_tokens must be >= 1, got {num_user_tokens}")
        self.num_user_tokens = num_user_tokens
        self.set_backend(backend, attention_op)

    def set_backend(self, backend: str, attention_op: Callable | None = None) -> None:
        from diffusers.models.attention_processor import (
            AttnProcessor2_0,
            XFormersAttnProcessor,
        )

        check_backend(backend)
        if backend == "xformers":
            require_xformers()
            self.inner = XFormersAttnProcessor(attention_op=attention_op)
        else:
            self.inner = AttnProcessor2_0()
        self.backend = backend

    def __repr__(self) -> str:
        return f"TextOnlyAttnProcessor(num_user_tokens={self.num_user_tokens}, backend={self.backend!r})"

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if encoder_hidden_states is None:
            raise ValueError("TextOnlyAttnProcessor is a cross-attention processor; it got no encoder_hidden_states")
        text_states, _ = _split_user_tokens(encoder_hidden_states, self.num_user_tokens)
        attention_mask, _ = _split_mask(attention_mask, text_states.shape[1], self.num_user_tokens)
        return self.inner(attn, hidden_states, text_states, attention_mask, temb, *args, **kwargs)
