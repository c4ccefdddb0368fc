"""A small CLIP tokenizer vocabulary built offline for the embedded world model.

The stock CLIP vocabulary has 49k entries, which would dominate a 64-wide text encoder. The
world needs a few dozen words, so we build a byte-level BPE vocabulary ourselves: every byte
(as CLIP writes it) plus one merge chain per known word. Unknown words still tokenize, into
characters, so free-text prompts never fail.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffpref.world.captions import caption_vocabulary

START, END = "<|startoftext|>", "<|endoftext|>"
# Words outside the captions that people type into prompts; kept whole so they get one token each.
EXTRA_WORDS = ("dark", "bright", "light", "big", "large", "small", "tiny", "center", "centered", "corner",
               "colorful", "minimal", "the", "of", "in", "with", "and", "object", "something", "picture")


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Standard BPE: repeatedly merge the lowest-ranked adjacent pair."""
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == float("inf"):
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
    return symbols


def build_vocabulary(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merge list in which each of ``words`` is a single token."""
    byte_chars = list(_bytes_to_unicode().values())
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        symbols = _apply_merges(symbols, ranks)
        # New merges rank below every existing one, so words finished earlier stay single tokens.
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            merged = pair[0] + pair[1]
            if merged not in vocab_list:
                vocab_list.append(merged)
            symbols = _apply_merges(symbols, ranks)
    vocab_list += [START, END]
    return {token: i for i, token in enumerate(vocab_list)}, merges


def write_world_tokenizer(out_dir: str | Path, model_max_length: int = 16) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json loadable by ``CLIPTokenizer.from_pretrained``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    words = sorted(set(caption_vocabulary()) | set(EXTRA_WORDS))
    vocab, merges = build_vocabulary(words)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": START,
        "eos_token": END,
        "unk_token": END,
        "pad_token": END,
        "do_lower_case": True,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": START, "eos_token": END, "unk_token": END, "pad_token": END}, indent=2))
    return out


def load_world_tokenizer(path: str | Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(path))
