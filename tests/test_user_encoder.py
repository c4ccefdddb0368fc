import hashlib

import numpy as np
import pytest
import torch

from diffpref.personalize.backbones import (OpenClipBackbone, UserBackbone, VLMBackbone, UserExample,
                                            example_features_from_embeddings)
from diffpref.personalize.encoder import (SET_TOKEN_SCALE_INIT, EvidenceUserEncoder, SetUserEncoder, UserEncoder,
                                         build_user_encoder, embed_user, load_user_embedding, mix_embeddings,
                                          save_user_embedding, user_cache_key)
from diffpref.world.captions import caption_vocabulary, sample_prompt
from diffpref.world.render import render, sample_attributes

FEATURES = 12


def make_examples(k: int, seed: int = 0) -> list[UserExample]:
    rng = np.random.default_rng(seed)
    return [UserExample(sample_prompt(rng), render(sample_attributes(rng)), np.asarray(render(sample_attributes(rng))))
            for _ in range(k)]


def tiny_encoder(**overrides) -> SetUserEncoder:
    torch.manual_seed(0)
    kwargs = dict(feature_dim=FEATURES, num_tokens=3, token_dim=8, hidden=16, layers=2, heads=2) | overrides
    return SetUserEncoder(**kwargs).eval()


class CountingBackbone:
    """Deterministic per-example features (seeded by the example's pixels), counting calls."""

    feature_dim = FEATURES
    summarizes_set = False

    def __init__(self):
        self.calls = 0

    def embed_examples(self, examples):
        self.calls += 1
        rows = []
        for ex in examples:
            seed = int(hashlib.sha256(ex.prompt.encode() + np.asarray(ex.preferred).tobytes()).hexdigest()[:8], 16)
            rows.append(torch.randn(FEATURES, generator=torch.Generator().manual_seed(seed)))
        return torch.stack(rows)


# ----------------------------------------------------------------------------------------------
# The head


def test_encoder_is_permutation_invariant():
    encoder = tiny_encoder()
    features = torch.randn(2, 6, FEATURES)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = encoder(features), encoder(features[:, perm])
    assert a.shape == (2, 3, 8)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_encoder_accepts_any_number_of_examples(k):
    encoder = tiny_encoder()
    with torch.no_grad():
        tokens = encoder(torch.randn(3, k, FEATURES))
    assert tokens.shape == (3, 3, 8) and torch.isfinite(tokens).all()
    # Final LayerNorm with gain SET_TOKEN_SCALE_INIT at init: each token is zero-mean with that standard
    # deviation (small tokens: the personalized model starts next to the base model).
    torch.testing.assert_close(tokens.mean(-1), torch.zeros(3, 3), atol=1e-5, rtol=0)
    std = tokens.var(-1, unbiased=False).sqrt()
    torch.testing.assert_close(std, torch.full((3, 3), SET_TOKEN_SCALE_INIT), atol=1e-4, rtol=0)


def test_padded_batch_matches_each_user_alone():
    encoder = tiny_encoder()
    ks = [1, 4, 2]
    users = [torch.randn(k, FEATURES) for k in ks]
    batch = torch.full((3, max(ks), FEATURES), 1e3)  # padding garbage must not leak in
    mask = torch.zeros(3, max(ks), dtype=torch.bool)
    for i, u in enumerate(users):
        batch[i, :len(u)] = u
        mask[i, :len(u)] = True
    with torch.no_grad():
        batched = encoder(batch, mask)
        alone = torch.cat([encoder(u[None]) for u in users])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="at least one real example"):
        encoder(batch, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="features must be"):
        encoder(torch.randn(4, FEATURES))


def test_encoder_trains_and_round_trips(tmp_path):
    encoder = tiny_encoder().train()
    before = {n: p.detach().clone() for n, p in encoder.named_parameters()}
    opt = torch.optim.SGD(encoder.parameters(), lr=1.0)
    encoder(torch.randn(2, 3, FEATURES)).pow(3).sum().backward()
    opt.step()
    assert all(not torch.equal(before[n], p) for n, p in encoder.named_parameters() if "norm_out" not in n)
    encoder.eval().save_pretrained(tmp_path / "enc")
    assert (tmp_path / "enc" / "diffusion_pytorch_model.safetensors").exists()
    loaded = UserEncoder.from_pretrained(tmp_path / "enc").eval()  # the base picks the class from the config
    assert type(loaded) is SetUserEncoder and loaded.config.num_tokens == 3 and loaded.config.token_dim == 8
    x = torch.randn(1, 5, FEATURES)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), encoder(x))


def test_evidence_encoder_matches_an_independent_computation_and_round_trips(tmp_path):
    """tokens = LN(shared + W (scale * mean over examples of (phi(pref) - phi(rej)))), per user."""
    encoder = build_user_encoder("evidence", feature_dim=FEATURES, num_tokens=3, token_dim=8, evidence_dim=FEATURES // 4)
    # only the evidence weights: nothing of a set transformer sits unused under DDP
    assert sorted(n for n, _ in encoder.named_parameters()) == ["evidence_map.weight", "evidence_tokens"]
    features = torch.randn(2, 5, FEATURES)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    with torch.no_grad():
        blind = encoder(features, mask)  # W starts at zero: every user gets the shared tokens
        torch.testing.assert_close(blind[0], blind[1])
        encoder.evidence_map.weight.normal_()
    per_example = torch.randn(100, FEATURES)
    per_example[:, -FEATURES // 4:] *= 0.3
    encoder.set_evidence_scale(per_example)
    scale = 1.0 / float(per_example[:, -FEATURES // 4:].pow(2).mean().sqrt())
    with torch.no_grad():
        got = encoder(features, mask)
    for b, k in enumerate((5, 2)):
        evidence = features[b, :k, -FEATURES // 4:].mean(0) * scale
        raw = encoder.evidence_tokens + (encoder.evidence_map.weight @ evidence).view(3, 8)
        expected = (raw - raw.mean(-1, keepdim=True)) / (raw.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
        torch.testing.assert_close(got[b], expected.detach())
    # order of the examples does not matter; padding rows do not either
    torch.testing.assert_close(encoder(features[:, [4, 2, 0, 1, 3]], mask[:, [4, 2, 0, 1, 3]]).detach()[0], got[0])
    encoder.save_pretrained(tmp_path / "enc")
    loaded = UserEncoder.from_pretrained(tmp_path / "enc")
    assert type(loaded) is EvidenceUserEncoder
    torch.testing.assert_close(loaded(features, mask).detach(), got)  # the scale buffer travels with it


def test_evidence_encoder_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match="feature_dim = 4 \\* evidence_dim"):
        EvidenceUserEncoder(feature_dim=10, evidence_dim=3)
    encoder = EvidenceUserEncoder(feature_dim=12, evidence_dim=3)
    with pytest.raises(ValueError, match="RMS"):
        encoder.set_evidence_scale(torch.zeros(4, 12))
    with pytest.raises(ValueError, match="features must be"):
        encoder(torch.randn(1, 2, 16))
    with pytest.raises(ValueError, match="unknown user encoder 'anchors'; choose one of set, evidence"):
        build_user_encoder("anchors", feature_dim=12)
    with pytest.raises(TypeError, match="base class"):
        UserEncoder()(torch.randn(1, 2, 12))


def _old_style_config(folder, **keys):
    """Rewrite a saved encoder's config.json as the one pre-split UserEncoder class wrote it."""
    import json

    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update({"_class_name": "UserEncoder", "hidden": 128, "layers": 0, "heads": 4, "output_scale_init": 1.0,
                   "preference_dim": 0, "num_anchors": 0, "anchor_words": None, "anchor_evidence": False,
                   "free_anchors": 0, "evidence_dim": config.get("evidence_dim", 0)} | keys)
    path.write_text(json.dumps(config))


def test_encoders_saved_before_the_split_load_as_their_head(tmp_path, capfd):
    """An old config (one class, both heads' keys, retired keys at 0) loads as the right class, silently."""
    encoder = EvidenceUserEncoder(feature_dim=12, num_tokens=2, token_dim=8, evidence_dim=3)
    with torch.no_grad():
        encoder.evidence_map.weight.normal_()
    encoder.save_pretrained(tmp_path / "old")
    _old_style_config(tmp_path / "old")
    capfd.readouterr()
    loaded = UserEncoder.from_pretrained(tmp_path / "old")
    assert type(loaded) is EvidenceUserEncoder
    # diffusers' logger writes to the stderr file descriptor: the pre-split keys are dropped, not warned about
    assert "not expected" not in capfd.readouterr().err
    x = torch.randn(2, 3, 12)
    torch.testing.assert_close(loaded(x).detach(), encoder(x).detach())
    _old_style_config(tmp_path / "old", num_anchors=5)  # a retired recipe's encoder: a clear refusal
    with pytest.raises(ValueError, match="retired"):
        UserEncoder.from_pretrained(tmp_path / "old")


# ----------------------------------------------------------------------------------------------
# embed_user, cache, mixing, files


def test_cache_hit_skips_backbone_and_key_ignores_order():
    encoder, backbone, cache = tiny_encoder(), CountingBackbone(), {}
    examples = make_examples(4)
    first = embed_user(encoder, backbone, examples, cache)
    assert first.shape == (3, 8) and backbone.calls == 1
    shuffled = [examples[i] for i in (2, 0, 3, 1)]
    assert user_cache_key(shuffled) == user_cache_key(examples)
    assert embed_user(encoder, backbone, shuffled, cache) is first and backbone.calls == 1
    # A PIL image and its pixel array are the same example.
    as_arrays = [UserExample(ex.prompt, np.asarray(ex.preferred), ex.rejected) for ex in examples]
    assert user_cache_key(as_arrays) == user_cache_key(examples)
    # Another user, or the same user without cache, runs the backbone; results agree with the cached ones.
    assert user_cache_key(examples[:3]) != user_cache_key(examples)
    other = make_examples(4, seed=1)
    other[0] = UserExample(other[0].prompt + " ", other[0].preferred, other[0].rejected)
    assert user_cache_key(other) != user_cache_key(make_examples(4, seed=1))
    embed_user(encoder, backbone, examples[:3], cache)
    assert backbone.calls == 2 and len(cache) == 2
    torch.testing.assert_close(embed_user(encoder, backbone, shuffled, None), first, atol=1e-5, rtol=0)
    assert backbone.calls == 3


def test_mix_embeddings_arithmetic():
    a, b = torch.randn(3, 8), torch.randn(3, 8)
    assert torch.equal(mix_embeddings({"a": (a, 1.0), "b": (b, 0.0)}), a)
    assert torch.equal(mix_embeddings({"a": (a, 0.0), "b": (b, 2.5)}), b)
    torch.testing.assert_close(mix_embeddings({"a": (a, 0.5), "b": (b, 0.5)}), (a + b) / 2)
    torch.testing.assert_close(mix_embeddings({"a": (a, 3.0), "b": (b, 1.0)}), 0.75 * a + 0.25 * b)
    with pytest.raises(ValueError, match="'b'.*>= 0"):
        mix_embeddings({"a": (a, 1.0), "b": (b, -0.1)})
    with pytest.raises(ValueError, match="all weights are zero"):
        mix_embeddings({"a": (a, 0.0), "b": (b, 0.0)})
    with pytest.raises(ValueError, match="differ in shape"):
        mix_embeddings({"a": (a, 1.0), "b": (b[:2], 1.0)})


def test_user_embedding_file_round_trip(tmp_path):
    tokens = torch.randn(4, 8)
    meta = {"user": "alice", "num_examples": 4, "backbone": "world-clip", "prompts": ["a red star"]}
    path = save_user_embedding(tmp_path / "u" / "alice.safetensors", tokens, meta)
    loaded, loaded_meta = load_user_embedding(path)
    assert torch.equal(loaded, tokens) and loaded_meta == meta
    from safetensors.torch import save_file
    save_file({"x": tokens}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a user embedding"):
        load_user_embedding(tmp_path / "other.safetensors")


# ----------------------------------------------------------------------------------------------
# Backbones


@pytest.fixture(scope="module")
def world_clip_dir(tmp_path_factory):
    from diffpref.models.world_clip import build_world_clip, save_world_clip

    torch.manual_seed(0)
    return save_world_clip(build_world_clip().eval(), tmp_path_factory.mktemp("clip") / "world-clip")


def test_open_clip_backbone_features(world_clip_dir):
    backbone = OpenClipBackbone.from_pretrained(f"local-dir:{world_clip_dir}")
    assert isinstance(backbone, UserBackbone) and backbone.feature_dim == 4 * 64
    examples = make_examples(3)
    features = backbone.embed_examples(examples)
    assert features.shape == (3, 256) and not features.requires_grad
    text, pref, rej, diff = features.split(64, dim=-1)
    for part in (text, pref, rej):
        torch.testing.assert_close(part.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(diff, pref - rej)
    assert not torch.allclose(pref, rej)
    # A trainer's cached embeddings give the same features through the same function.
    rejected = np.stack([np.asarray(ex.rejected) for ex in examples])  # a uint8 (k, H, W, 3) batch works too
    cached = example_features_from_embeddings(backbone.embed_texts([ex.prompt for ex in examples]),
                                              backbone.embed_images([ex.preferred for ex in examples]),
                                              backbone.embed_images(rejected))
    torch.testing.assert_close(cached, features)
    encoder = tiny_encoder(feature_dim=backbone.feature_dim)
    assert embed_user(encoder, backbone, examples).shape == (3, 8)
    with pytest.raises(FileNotFoundError, match="local-dir"):
        OpenClipBackbone.from_pretrained(world_clip_dir.parent)
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        OpenClipBackbone.from_pretrained(("ViT-H-14", world_clip_dir / "missing.pt"))


@pytest.fixture(scope="module")
def tiny_vlm_dir(tmp_path_factory):
    """A random tiny LLaVA (CLIP vision tower + Llama) with a word-level tokenizer, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    specials = ["<unk>", "<pad>", "<s>", "</s>", "<image>"]
    words = ["Caption", "Preferred", "Dispreferred", "image", ":", "user", "preferences", "profile", "."]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(specials + words + caption_vocabulary()))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", extra_special_tokens={"image_token": "<image>"})
    # 32 px, patch 8: 16 patches + CLS; "default" drops CLS -> 16 placeholder tokens per image.
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                               num_additional_image_tokens=1, vision_feature_select_strategy="default")
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=32, patch_size=8, projection_dim=16),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
        vision_feature_layer=-1)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    # A random model may emit EOS at once; a damped EOS logit makes it write a profile of some length.
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id].zero_()
    path = tmp_path_factory.mktemp("vlm") / "tiny-llava"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_vlm_backbone_embeds_the_set(tiny_vlm_dir):
    backbone = VLMBackbone.from_pretrained(tiny_vlm_dir, max_new_tokens=4)
    assert isinstance(backbone, UserBackbone) and backbone.summarizes_set
    assert backbone.feature_dim == 3 * 16
    examples = make_examples(2)
    prompt = backbone.build_prompt(examples)
    assert prompt.count("<image>") == 4 and "Dispreferred image:" in prompt
    first = backbone.embed_examples(examples)
    assert first.shape == (1, 48) and torch.isfinite(first).all() and not first.requires_grad
    assert isinstance(backbone.last_profile, str)
    torch.testing.assert_close(backbone.embed_examples(examples), first, atol=0, rtol=0)  # greedy: deterministic
    assert not torch.allclose(backbone.embed_examples(make_examples(2, seed=5)), first)
    # The head takes the single summary row as a set of one.
    encoder = tiny_encoder(feature_dim=backbone.feature_dim)
    assert embed_user(encoder, backbone, examples).shape == (3, 8)
    mean = VLMBackbone(backbone.model, backbone.processor, max_new_tokens=4, layer_pooling="mean")
    torch.testing.assert_close(mean.embed_examples(examples), first.view(3, 16).mean(0, keepdim=True))
    with pytest.raises(ValueError, match="layer_pooling"):
        VLMBackbone(backbone.model, backbone.processor, layer_pooling="max")


def test_vlm_backbone_uses_the_chat_template(tiny_vlm_dir):
    backbone = VLMBackbone.from_pretrained(tiny_vlm_dir, max_new_tokens=2, layer_pooling="mean")
    backbone.processor.chat_template = (
        "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
        "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
        "{% if add_generation_prompt %} profile :{% endif %}")
    examples = make_examples(3)
    prompt = backbone.build_prompt(examples)
    assert prompt.count("<image>") == 6 and prompt.endswith(" profile :")
    features = backbone.embed_examples(examples)
    assert features.shape == (1, 16) and torch.isfinite(features).all()
