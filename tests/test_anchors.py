"""Text-anchored user tokens: the anchor bank, the encoder's anchor mode, and PPD training with it."""

import pytest
import torch

from diffpref.personalize.anchors import build_text_anchors
from diffpref.personalize.encoder import UserEncoder
from diffpref.models.builders import tiny_sd15_pipeline
from diffpref.models.tokenizer import load_world_tokenizer, write_world_tokenizer
from diffpref.personalize.attention import install_user_attention


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_world_tokenizer(write_world_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer"))


def test_anchor_bank_is_the_mean_state_of_each_frequent_word(tokenizer):
    prompts = ["a red circle", "a blue circle", "a red star on a black background"]
    L = tokenizer.model_max_length
    gen = torch.Generator().manual_seed(0)
    states = [torch.randn(L, 6, generator=gen) for _ in prompts]
    anchors, words = build_text_anchors(prompts, tokenizer, lambda i: states[i], num_anchors=3)
    # Independent count: "red" and "circle" occur twice each, then single words; stop words never count.
    assert len(words) == 3 and set(words[:2]) == {"red", "circle"} and words[2] in {"blue", "star", "black", "background"}
    for row, word in enumerate(words):
        expected = []
        for prompt, st in zip(prompts, states):
            ids = tokenizer(prompt, padding="max_length", max_length=L).input_ids
            expected += [st[pos] for pos, t in enumerate(ids) if tokenizer.decode([t]).strip() == word]
        torch.testing.assert_close(anchors[row], torch.stack(expected).mean(0))


def test_anchor_bank_refuses_bad_input(tokenizer):
    with pytest.raises(ValueError, match="num_anchors"):
        build_text_anchors(["a red circle"], tokenizer, lambda i: torch.zeros(77, 4), num_anchors=0)
    # fewer words than asked for: every word, no padding rows
    L = tokenizer.model_max_length
    anchors, words = build_text_anchors(["a red circle"], tokenizer, lambda i: torch.ones(L, 4), num_anchors=8)
    assert sorted(words) == ["circle", "red"] and anchors.shape == (2, 4)
    with pytest.raises(ValueError, match="no prompts"):
        build_text_anchors([], tokenizer, lambda i: torch.zeros(77, 4), num_anchors=4)
    with pytest.raises(ValueError, match="states but the tokenizer"):
        build_text_anchors(["a red circle"], tokenizer, lambda i: torch.zeros(5, 4), num_anchors=4)


WORDS = ["w0", "w1", "w2", "w3", "w4"]


def anchored_encoder(**kw):
    torch.manual_seed(0)
    enc = UserEncoder(feature_dim=16, num_tokens=3, token_dim=8, hidden=16, layers=0, heads=2, num_anchors=5,
                      preference_dim=4, **kw)
    enc.set_anchors(torch.randn(5, 8), WORDS, torch.nn.functional.normalize(torch.randn(5, 4), dim=-1))
    return enc.eval()


def test_anchored_tokens_are_convex_mixtures_of_the_anchors_and_order_free():
    enc = anchored_encoder()
    with torch.no_grad():  # start from a non-uniform mixture
        enc.anchor_logits.weight.normal_()
    x = torch.randn(2, 4, 16)
    tokens, weights = enc(x, return_unscaled=True)
    assert tokens.shape == (2, 3, 8) and weights.shape == (2, 3, 5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3))
    assert (weights >= 0).all() and weights.std() > 0
    torch.testing.assert_close(tokens, torch.einsum("bka,ad->bkd", weights, enc.anchors))
    torch.testing.assert_close(enc(x[:, [3, 1, 0, 2]]), tokens)
    # the preference read-out: the tokens' average word direction against the image difference
    diff = torch.randn(2, 4)
    expected = enc.preference_log_scale.exp() * ((weights.mean(1) @ enc.anchor_directions) * diff).sum(-1)
    torch.testing.assert_close(enc.predict_preference(weights, diff), expected)


def test_anchored_encoder_starts_at_the_anchor_mean_and_round_trips(tmp_path):
    enc = anchored_encoder()
    tokens = enc(torch.randn(1, 2, 16))
    torch.testing.assert_close(tokens, enc.anchors.mean(0).expand(1, 3, 8))
    enc.save_pretrained(tmp_path / "enc")
    loaded = UserEncoder.from_pretrained(tmp_path / "enc").eval()
    assert loaded.config.anchor_words == WORDS
    torch.testing.assert_close(loaded.anchors, enc.anchors)
    torch.testing.assert_close(loaded.anchor_directions, enc.anchor_directions)
    x = torch.randn(1, 3, 16)
    torch.testing.assert_close(loaded(x), enc(x))


def test_set_anchors_checks_shape_and_values():
    enc = anchored_encoder()
    with pytest.raises(ValueError, match="shape"):
        enc.set_anchors(torch.zeros(4, 8), directions=enc.anchor_directions)
    with pytest.raises(ValueError, match="NaN"):
        enc.set_anchors(torch.full((5, 8), float("nan")), directions=enc.anchor_directions)
    with pytest.raises(ValueError, match="directions"):
        enc.set_anchors(torch.zeros(5, 8))
    with pytest.raises(ValueError, match="num_anchors=0"):
        UserEncoder(feature_dim=12, num_tokens=2, token_dim=8, hidden=16, layers=0, heads=2).set_anchors(torch.zeros(5, 8))


def test_value_projection_starts_as_a_scaled_copy():
    unet = tiny_sd15_pipeline(0).unet
    processors = install_user_attention(unet, 2, value_init_scale=0.25)
    attention = {name: m for name, m in unet.named_modules() if name.endswith("attn2")}
    for key, processor in processors.items():
        attn = attention[key.replace("__", ".").removesuffix(".processor")]
        torch.testing.assert_close(processor.to_v_user.weight, 0.25 * attn.to_v.weight)
        assert torch.equal(processor.to_k_user.weight, attn.to_k.weight)


def test_anchor_evidence_picks_the_word_that_separates_the_choices():
    """Untrained head: the evidence alone puts the mixture on the word along which preferred beats rejected."""
    enc = anchored_encoder(anchor_evidence=True)
    D = enc.anchor_directions
    # Independent evidence: examples whose preferred image lies along word 3, rejected along word 1.
    pref, rej = D[3].expand(4, 4), D[1].expand(4, 4)
    features = torch.cat([torch.zeros(4, 4), pref, rej, pref - rej], dim=-1).unsqueeze(0)
    tokens, weights = enc(features, return_unscaled=True)
    evidence = (pref - rej)[0] @ D.T
    expected = torch.softmax(enc.evidence_log_scale.exp() * evidence, -1)
    torch.testing.assert_close(weights[0, 0], expected)
    assert int(weights[0].mean(0).argmax()) == int(evidence.argmax())
    with pytest.raises(ValueError, match="anchor_evidence"):
        UserEncoder(feature_dim=12, num_tokens=2, token_dim=8, hidden=16, layers=0, heads=2, num_anchors=5,
                    preference_dim=4, anchor_evidence=True)


def test_free_anchors_learn_beside_the_words_and_round_trip(tmp_path):
    """Learned anchors join the bank after the words; they start near the average word, receive
    gradient through the tokens and (via their learned directions) through the preference read-out."""
    enc = anchored_encoder(free_anchors=2, anchor_evidence=True)
    enc.train()
    bank = enc.all_anchors()
    assert bank.shape == (7, 8) and torch.equal(bank[:5], enc.anchors)
    assert not torch.equal(bank[5], bank[6])  # spread apart, so each gets its own gradient
    assert (bank[5:] - enc.anchors.mean(0)).norm(dim=-1).max() < 3 * enc.anchors.std(0).norm()
    with torch.no_grad():
        enc.anchor_logits.weight.normal_()
        enc.free_anchor_directions.normal_()
    # the evidence reads the learned directions too (independent: word directions, then the free ones)
    directions = torch.cat([enc.anchor_directions, enc.free_anchor_directions]).detach()
    with torch.no_grad():
        saved = enc.anchor_logits.weight.clone()
        enc.anchor_logits.weight.zero_()
        diff = torch.randn(4)
        probe = torch.cat([torch.zeros(4), diff, torch.zeros(4), diff]).expand(1, 2, 16)
        _, probe_weights = enc(probe, return_unscaled=True)
        expected = torch.softmax(enc.anchor_logits.bias + enc.evidence_log_scale.exp() * (diff @ directions.T), -1)
        torch.testing.assert_close(probe_weights[0, 0], expected)
        enc.anchor_logits.weight.copy_(saved)
    features = torch.randn(2, 3, 16)
    tokens, weights = enc(features, return_unscaled=True)
    assert weights.shape == (2, 3, 7)
    torch.testing.assert_close(tokens, torch.einsum("bka,ad->bkd", weights, enc.all_anchors()))
    loss = tokens.square().sum() + enc.predict_preference(weights, torch.randn(2, 4)).sum()
    loss.backward()
    assert enc.free_anchor_tokens.grad.abs().sum() > 0 and enc.free_anchor_directions.grad.abs().sum() > 0
    enc.save_pretrained(tmp_path / "enc")
    loaded = UserEncoder.from_pretrained(tmp_path / "enc").eval()
    assert loaded.config.free_anchors == 2
    torch.testing.assert_close(loaded.all_anchors(), enc.all_anchors())
    torch.testing.assert_close(loaded(features), enc.eval()(features))
    with pytest.raises(ValueError, match="free_anchors"):
        UserEncoder(feature_dim=16, num_tokens=3, token_dim=8, hidden=16, layers=0, heads=2, free_anchors=2)
