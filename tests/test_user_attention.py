"""Decoupled user cross-attention on tiny random SD1.5 / SDXL UNets."""

import math

import numpy as np
import pytest
import torch

from diffpref.models.builders import tiny_sd15_pipeline, tiny_sdxl_pipeline
from diffpref.personalize.attention import (
    TextOnlyAttnProcessor,
    UserAttnProcessor,
    assert_user_attention_intact,
    concat_user_tokens,
    guard_xformers_switch,
    install_user_attention,
    load_user_attention_state_dict,
    set_user_attention_backend,
    set_user_scale,
    user_attention_parameters,
    user_attention_state_dict,
)

K = 3  # user tokens
L = 6  # text tokens
BUILDERS = {"sd15": tiny_sd15_pipeline, "sdxl": tiny_sdxl_pipeline}


def unet_inputs(kind: str, seed: int = 0, batch: int = 2) -> dict:
    """Inputs of one UNet call; SDXL's tiny UNet takes pooled text [B, 16] and time ids [B, 6]."""
    g = torch.Generator().manual_seed(seed)
    width = 16 if kind == "sd15" else 32
    inputs = dict(
        sample=torch.randn(batch, 4, 16, 16, generator=g),
        timestep=torch.tensor([10, 500][:batch]),
        encoder_hidden_states=torch.randn(batch, L, width, generator=g),
    )
    if kind == "sdxl":
        inputs["added_cond_kwargs"] = dict(
            text_embeds=torch.randn(batch, 16, generator=g), time_ids=torch.rand(batch, 6, generator=g) * 64
        )
    return inputs


def run_unet(unet, inputs: dict, user: torch.Tensor | None = None, with_user_tokens: bool = True) -> torch.Tensor:
    inputs = dict(inputs)
    if with_user_tokens:
        inputs["encoder_hidden_states"] = concat_user_tokens(inputs["encoder_hidden_states"], user, K)
    with torch.no_grad():
        return unet(**inputs).sample


def random_user(kind: str, seed: int, batch: int = 2) -> torch.Tensor:
    width = 16 if kind == "sd15" else 32
    return torch.randn(batch, K, width, generator=torch.Generator().manual_seed(100 + seed))


@pytest.mark.parametrize("kind,blocks", [("sd15", "all"), ("sdxl", "all"), ("sdxl", ["up_blocks", "mid_block"])])
def test_scale_zero_and_no_user_are_bit_identical_to_the_stock_unet(kind, blocks):
    unet = BUILDERS[kind](0).unet
    inputs = unet_inputs(kind)
    reference = run_unet(unet, inputs, with_user_tokens=False)

    processors = install_user_attention(unet, K, value_init_scale=1.0, blocks=blocks, scale=0.0)
    assert len(processors) > 0 and all("." not in key for key in processors)
    if blocks != "all":
        kinds = {name: type(p) for name, p in unet.attn_processors.items() if "attn2" in name}
        assert kinds["down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"] is TextOnlyAttnProcessor
        assert kinds["up_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"] is UserAttnProcessor
    # self-attention keeps its stock processor
    assert all(type(p).__name__ == "AttnProcessor2_0" for n, p in unet.attn_processors.items() if "attn1" in n)

    assert torch.equal(run_unet(unet, inputs, random_user(kind, 0)), reference)  # scale 0: branch skipped
    assert torch.equal(run_unet(unet, inputs, None), reference)  # no user, scale 0
    # the zero user contributes exactly nothing even at scale 1 (no bias in to_k_user / to_v_user)
    set_user_scale(unet, 1.0)
    assert torch.equal(run_unet(unet, inputs, None), reference)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_user_changes_the_output_continuously_with_scale(kind):
    unet = BUILDERS[kind](0).unet
    inputs = unet_inputs(kind)
    reference = run_unet(unet, inputs, with_user_tokens=False)
    install_user_attention(unet, K, value_init_scale=1.0)
    user_a, user_b = random_user(kind, 0), random_user(kind, 1)

    out_a = run_unet(unet, inputs, user_a)
    out_b = run_unet(unet, inputs, user_b)

    def cosine(x, y):
        return float(torch.nn.functional.cosine_similarity(x.flatten(), y.flatten(), dim=0))

    set_user_scale(unet, 0.5)
    out_half = run_unet(unet, inputs, user_a)
    full = (out_a - reference).norm()
    assert 0 < (out_half - reference).norm() < full
    assert 0 < (out_a - out_half).norm() < full
    # half the scale moves the output the same way as the full one (a flipped sign would point it back),
    # and another user moves it another way
    assert cosine(out_half - reference, out_a - reference) > 0.9
    assert cosine(out_b - reference, out_a - reference) < cosine(out_half - reference, out_a - reference)
    set_user_scale(unet, 1e-4)
    assert (run_unet(unet, inputs, user_a) - reference).norm() < 1e-2 * full

    # one user broadcast to the batch equals the same user repeated
    set_user_scale(unet, 1.0)
    assert torch.allclose(run_unet(unet, inputs, user_a[:1]), run_unet(unet, inputs, user_a[:1].repeat(2, 1, 1)))


def manual_attention(q, k, v, heads, bias=None):
    """softmax(Q K^T / sqrt(d)) V with plain matmuls; (B, S, H*d) in and out."""
    batch, q_len, inner = q.shape
    d = inner // heads
    q, k, v = (x.view(batch, -1, heads, d).transpose(1, 2) for x in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    if bias is not None:
        scores = scores + bias[:, None, None]  # (B, S) -> (B, 1, 1, S) over heads and queries
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, q_len, inner)


def test_processor_matches_an_independent_computation():
    unet = tiny_sd15_pipeline(0).unet
    install_user_attention(unet, K, value_init_scale=1.0, scale=0.7)
    attn = unet.mid_block.attentions[0].transformer_blocks[0].attn2
    processor = attn.processor
    assert isinstance(processor, UserAttnProcessor) and attn.heads > 1
    torch.manual_seed(1)
    with torch.no_grad():  # user projections unlike the text ones, so a swapped branch would show
        processor.to_k_user.weight.normal_(0, 0.3)
        processor.to_v_user.weight.normal_(0, 0.3)
    hidden = torch.randn(2, 10, attn.to_q.in_features)
    text, user = torch.randn(2, L, 16), torch.randn(2, K, 16)
    # mask the last text token and the last user token of the first sample
    bias = torch.zeros(2, 1, L + K)
    bias[0, 0, L - 1] = bias[0, 0, L + K - 1] = -10000.0

    with torch.no_grad():
        got = attn(hidden, encoder_hidden_states=concat_user_tokens(text, user, K))
        got_masked = attn(hidden, encoder_hidden_states=concat_user_tokens(text, user, K), attention_mask=bias)
        q = attn.to_q(hidden)
        for result, mask in ((got, None), (got_masked, bias)):
            text_out = manual_attention(q, attn.to_k(text), attn.to_v(text), attn.heads, None if mask is None else mask[:, 0, :L])
            user_out = manual_attention(
                q, processor.to_k_user(user), processor.to_v_user(user), attn.heads, None if mask is None else mask[:, 0, L:]
            )
            expected = attn.to_out[0](text_out + 0.7 * user_out)
            torch.testing.assert_close(result, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(got, got_masked, atol=1e-4)


def test_user_projections_start_as_copies_of_to_k_to_v():
    unet = tiny_sdxl_pipeline(0).unet
    processors = install_user_attention(unet, K, value_init_scale=1.0)
    attention = {name: m for name, m in unet.named_modules() if name.endswith("attn2")}
    for key, processor in processors.items():
        attn = attention[key.replace("__", ".").removesuffix(".processor")]
        for own, base in ((processor.to_k_user, attn.to_k), (processor.to_v_user, attn.to_v)):
            assert torch.equal(own.weight, base.weight) and own.weight is not base.weight
            assert own.bias is None and own.weight.data_ptr() != base.weight.data_ptr()
            before = base.weight.clone()
            with torch.no_grad():
                own.weight.add_(1.0)
            assert torch.equal(base.weight, before)


def test_parameters_and_state_dict_round_trip():
    unet = tiny_sd15_pipeline(0).unet
    processors = install_user_attention(unet, K, value_init_scale=1.0)
    params = user_attention_parameters(unet)
    expected = {id(p) for proc in processors.values() for p in (proc.to_k_user.weight, proc.to_v_user.weight)}
    assert len(params) == 2 * len(processors) and {id(p) for p in params} == expected
    user_names = {name for name, p in unet.named_parameters() if id(p) in expected}
    assert all(name.endswith(("to_k_user.weight", "to_v_user.weight")) for name in user_names)

    torch.manual_seed(3)
    with torch.no_grad():
        for p in params:
            p.add_(0.1 * torch.randn_like(p))
    inputs, user = unet_inputs("sd15"), random_user("sd15", 0)
    out = run_unet(unet, inputs, user)
    state = user_attention_state_dict(unet)
    assert set(state) == user_names  # the same names as in unet.state_dict()

    fresh = tiny_sd15_pipeline(0).unet
    install_user_attention(fresh, K, value_init_scale=1.0)
    assert not torch.equal(run_unet(fresh, inputs, user), out)
    load_user_attention_state_dict(fresh, {k: v.clone() for k, v in state.items()})
    assert torch.equal(run_unet(fresh, inputs, user), out)

    missing = dict(state)
    missing.pop(next(iter(missing)))
    with pytest.raises(ValueError, match="missing keys"):
        load_user_attention_state_dict(fresh, missing)
    with pytest.raises(ValueError, match="unexpected keys"):
        load_user_attention_state_dict(fresh, {**state, "up_blocks.9.attn2.processor.to_k_user.weight": torch.zeros(1)})
    partial = tiny_sd15_pipeline(0).unet
    install_user_attention(partial, K, value_init_scale=1.0, blocks=["up_blocks"])
    with pytest.raises(ValueError, match="unexpected keys"):
        load_user_attention_state_dict(partial, state)


def test_install_validates_its_arguments():
    unet = tiny_sd15_pipeline(0).unet
    with pytest.raises(ValueError, match="up_blocks"):
        install_user_attention(unet, K, value_init_scale=1.0, blocks=["decoder"])
    install_user_attention(unet, K, value_init_scale=1.0)
    with pytest.raises(ValueError, match="already installed"):
        install_user_attention(unet, K, value_init_scale=1.0)
    with pytest.raises(ValueError, match="concat_user_tokens"):
        run_unet(unet, dict(unet_inputs("sd15"), encoder_hidden_states=torch.randn(2, K, 16)), with_user_tokens=False)
    with pytest.raises(ValueError, match=r"\[B, 3, 16\]"):
        concat_user_tokens(torch.zeros(2, L, 16), torch.zeros(2, K, 8), K)
    with pytest.raises(ValueError, match="valid backends: sdpa, xformers"):
        set_user_attention_backend(unet, "flash")


xformers_usable = torch.cuda.is_available() and __import__("importlib").util.find_spec("xformers") is not None


@pytest.mark.skipif(xformers_usable, reason="checks the refusal without CUDA/xformers")
def test_xformers_switch_refuses_instead_of_dropping_the_user_branch():
    pipe = tiny_sd15_pipeline(0)
    install_user_attention(pipe.unet, K, value_init_scale=1.0, blocks=["up_blocks"])
    guard_xformers_switch(pipe)
    inputs, user = unet_inputs("sd15"), random_user("sd15", 0)
    out = run_unet(pipe.unet, inputs, user)

    with pytest.raises(RuntimeError, match="sdpa"):
        pipe.enable_xformers_memory_efficient_attention()
    with pytest.raises(RuntimeError, match="sdpa"):
        pipe.unet.enable_xformers_memory_efficient_attention()
    with pytest.raises(RuntimeError, match="sdpa"):
        set_user_attention_backend(pipe.unet, "xformers")
    assert_user_attention_intact(pipe.unet)
    # the stock disable would also reset every processor; guarded, it keeps ours (on sdpa)
    pipe.disable_xformers_memory_efficient_attention()
    assert_user_attention_intact(pipe.unet)
    assert torch.equal(run_unet(pipe.unet, inputs, user), out)

    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe.unet.set_attn_processor(AttnProcessor2_0())
    with pytest.raises(RuntimeError, match="replaced"):
        assert_user_attention_intact(pipe.unet)


def test_gradients_reach_only_the_user_projections():
    unet = tiny_sdxl_pipeline(0).unet
    unet.requires_grad_(False)
    install_user_attention(unet, K, value_init_scale=1.0)
    params = user_attention_parameters(unet)
    assert all(p.requires_grad for p in params)
    frozen = [p for p in unet.parameters() if all(p is not q for q in params)]
    assert frozen and not any(p.requires_grad for p in frozen)
    before = [p.detach().clone() for p in frozen]

    inputs = unet_inputs("sdxl")
    inputs["encoder_hidden_states"] = concat_user_tokens(inputs["encoder_hidden_states"], random_user("sdxl", 0), K)
    loss = unet(**inputs).sample.square().mean()
    loss.backward()
    assert all(p.grad.abs().sum() > 0 for p in params)
    assert all(p.grad is None for p in frozen)

    # a small step down the user projections' gradient lowers the loss: they, and only they, train
    torch.optim.SGD(params, lr=1e-2).step()
    with torch.no_grad():
        assert float(unet(**inputs).sample.square().mean()) < float(loss)
    assert all(torch.equal(p, b) for p, b in zip(frozen, before))


def test_full_pipeline_call_with_user_tokens():
    """With CFG the pipeline concatenates [negative, positive] embeddings, so both carry K user tokens:
    the negative side gets the zero user ("no user", as IP-Adapter's zero image tokens), the positive
    side the user, so guidance also pushes towards the user."""
    pipe = tiny_sd15_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    prompt_embeds, negative_embeds = pipe.encode_prompt(
        "a red circle", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt=""
    )

    def generate(positive, negative):
        return pipe(
            prompt_embeds=positive, negative_prompt_embeds=negative, num_inference_steps=2, guidance_scale=5.0,
            generator=torch.Generator().manual_seed(0), output_type="np",
        ).images

    reference = generate(prompt_embeds, negative_embeds)
    install_user_attention(pipe.unet, K, value_init_scale=1.0, blocks=["up_blocks", "mid_block"])
    guard_xformers_switch(pipe)
    user_a, user_b = torch.randn(2, 1, K, 16, generator=torch.Generator().manual_seed(7))
    negative = concat_user_tokens(negative_embeds, None, K)

    set_user_scale(pipe.unet, 0.0)
    assert np.array_equal(generate(concat_user_tokens(prompt_embeds, user_a, K), negative), reference)
    set_user_scale(pipe.unet, 1.0)
    image_a = generate(concat_user_tokens(prompt_embeds, user_a, K), negative)
    image_b = generate(concat_user_tokens(prompt_embeds, user_b, K), negative)
    assert image_a.shape == reference.shape
    assert not np.allclose(image_a, reference, atol=1e-5) and not np.allclose(image_a, image_b, atol=1e-5)


@pytest.fixture
def stand_in_xformers(monkeypatch):
    """No GPU here: a plain-torch stand-in for xformers.ops.memory_efficient_attention (same layouts:
    (B, M, H, K) or (B*H, M, K), bias over (.., Mq, Mk)), with CUDA reported available."""
    import sys
    import types

    import diffusers.models.attention_processor as stock

    def memory_efficient_attention(query, key, value, attn_bias=None, op=None, scale=None):
        four_d = query.ndim == 4
        if four_d:  # (B, M, H, K) -> (B, H, M, K)
            query, key, value = (x.transpose(1, 2) for x in (query, key, value))
        scores = query @ key.transpose(-1, -2) * (scale if scale is not None else query.shape[-1] ** -0.5)
        if attn_bias is not None:
            assert attn_bias.shape == scores.shape  # xformers does not broadcast
            scores = scores + attn_bias
        out = scores.softmax(-1) @ value
        return out.transpose(1, 2) if four_d else out

    fake = types.ModuleType("xformers")
    fake.ops = types.SimpleNamespace(memory_efficient_attention=memory_efficient_attention)
    monkeypatch.setitem(sys.modules, "xformers", fake)
    monkeypatch.setitem(sys.modules, "xformers.ops", fake.ops)
    monkeypatch.setattr(stock, "xformers", fake, raising=False)  # used by the stock XFormersAttnProcessor
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return fake


def test_xformers_backend_layout_with_a_stand_in_kernel(stand_in_xformers):
    """The xformers path's reshapes and masks give the sdpa path's output."""
    unet = tiny_sd15_pipeline(0).unet
    install_user_attention(unet, K, value_init_scale=1.0, blocks=["up_blocks"])
    inputs, user = unet_inputs("sd15"), random_user("sd15", 0)
    mask = torch.ones(2, L + K)
    mask[0, L - 2] = mask[1, L + 1] = 0
    inputs["encoder_attention_mask"] = mask
    sdpa = run_unet(unet, inputs, user)
    set_user_attention_backend(unet, "xformers")
    assert {p.backend for p in unet.attn_processors.values() if hasattr(p, "backend")} == {"xformers"}
    torch.testing.assert_close(run_unet(unet, inputs, user), sdpa, atol=1e-5, rtol=0)
    set_user_attention_backend(unet, "sdpa")
    assert torch.equal(run_unet(unet, inputs, user), sdpa)


def test_install_after_the_stock_xformers_switch_keeps_xformers(stand_in_xformers):
    """The trainer enables xformers before installing the user branch: the new processors must not fall
    back to sdpa, and an explicit backend= still wins. (The stock switch checks for a real xformers
    install, so the processors it leaves are set directly here.)"""
    from diffusers.models.attention_processor import XFormersAttnProcessor

    unet = tiny_sd15_pipeline(0).unet
    unet.set_attn_processor(XFormersAttnProcessor())
    install_user_attention(unet, K, value_init_scale=1.0, blocks=["up_blocks"])
    ours = [p for p in unet.attn_processors.values() if isinstance(p, (UserAttnProcessor, TextOnlyAttnProcessor))]
    assert ours and {p.backend for p in ours} == {"xformers"}
    assert all(isinstance(p.inner, XFormersAttnProcessor) for p in ours if isinstance(p, TextOnlyAttnProcessor))

    explicit = tiny_sd15_pipeline(0).unet
    explicit.set_attn_processor(XFormersAttnProcessor())
    install_user_attention(explicit, K, value_init_scale=1.0, blocks=["up_blocks"], backend="sdpa")
    assert {p.backend for p in explicit.attn_processors.values() if hasattr(p, "backend")} == {"sdpa"}

    plain = tiny_sd15_pipeline(0).unet
    install_user_attention(plain, K, value_init_scale=1.0)
    assert {p.backend for p in plain.attn_processors.values() if hasattr(p, "backend")} == {"sdpa"}


def test_a_fresh_install_adds_exactly_nothing_until_trained():
    """Default value_init_scale=0: to_v_user starts at zero, so any user tokens leave the output bit-identical
    to the base UNet (PPD training starts at DPO loss log 2); K' still starts as a copy of to_k."""
    from diffpref.models.builders import tiny_sd15_pipeline
    from diffpref.personalize.attention import user_attention_processors

    unet = tiny_sd15_pipeline(seed=0).unet
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 500])
    text = torch.randn(2, 16, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = unet(x, t, encoder_hidden_states=text).sample
    install_user_attention(unet, K)
    for name, processor in user_attention_processors(unet).items():
        assert torch.count_nonzero(processor.to_v_user.weight) == 0
        assert torch.count_nonzero(processor.to_k_user.weight) > 0
    users = torch.randn(2, K, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(2)) * 10
    with torch.no_grad():
        out = unet(x, t, encoder_hidden_states=concat_user_tokens(text, users, K)).sample
    assert torch.equal(out, base)
    with pytest.raises(ValueError, match="value_init_scale"):
        install_user_attention(tiny_sd15_pipeline(seed=0).unet, K, value_init_scale=-0.1)
