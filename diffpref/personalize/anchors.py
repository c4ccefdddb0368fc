"""Text anchors for user tokens: the text encoder's own states of the words people prompt with.

A UNet already knows how to follow text-encoder states; its decoupled user attention starts as a
copy of the text attention. User tokens that are mixtures of such states therefore steer
generation from the first step (a token near the state of "red", read through the copied
projections, makes objects red), while unconstrained tokens start as noise that the UNet has
never seen. The anchor bank is built from the training prompts: for each of the most frequent
words, the mean of its contextual states over the prompts it occurs in. There is deliberately no
zero "no preference" anchor: under a high-beta DPO loss the cheapest way to stop random early
user effects from adding variance is to switch the branch off, and a zero anchor lets the mixture
do exactly that within a few dozen steps (seen on the embedded world). "No user" stays what it is
everywhere else: zero tokens, or ``user_scale=0``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import torch

# Function words carry no taste; leaving them out keeps the bank for the words that do.
STOP_WORDS = frozenset({"a", "an", "the", "of", "on", "in", "with", "and", "at", "to", "is", "its", "by", "for"})


def build_text_anchors(prompts: Sequence[str], tokenizer, prompt_states: Callable[[int], torch.Tensor],
                       num_anchors: int, max_prompts: int = 4096) -> tuple[torch.Tensor, list[str]]:
    """``(anchors [A, D], words)``: the mean state of each of the ``A <= num_anchors`` most frequent words.

    ``prompt_states(i)`` gives the text conditioning ``[L, D]`` of ``prompts[i]`` (e.g. from the
    latent cache) with ``L`` the tokenizer's padded length. With fewer distinct content words than
    ``num_anchors``, every word is an anchor.
    """
    if num_anchors < 1:
        raise ValueError(f"num_anchors must be >= 1, got {num_anchors}")
    if not prompts:
        raise ValueError("no prompts to build text anchors from")
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    words: dict[int, str] = {}  # token id -> its word, decoded once per id rather than once per occurrence

    def word(token: int) -> str:
        if token not in words:
            words[token] = tokenizer.decode([token]).strip()
        return words[token]

    counts: Counter = Counter()
    sums: dict[int, torch.Tensor] = {}
    for i, prompt in enumerate(prompts[:max_prompts]):
        ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
        states = prompt_states(i).float()
        if states.shape[0] != len(ids):
            raise ValueError(f"prompt {i} has {states.shape[0]} states but the tokenizer gives {len(ids)} positions")
        for pos, token in enumerate(ids):
            if token in special or word(token).lower() in STOP_WORDS:
                continue
            counts[token] += 1
            sums[token] = sums[token] + states[pos] if token in sums else states[pos].clone()
    if not counts:
        raise ValueError("the prompts hold no content words to anchor user tokens on")
    chosen = [token for token, _ in counts.most_common(num_anchors)]
    anchors = torch.stack([sums[token] / counts[token] for token in chosen])
    return anchors, [word(token) for token in chosen]
