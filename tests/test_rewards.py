"""Reward models (HPSv2, CLIP score, aesthetic, PickScore) and `diffpref eval`, on tiny random models built from configs.

Every reward loads from a local file exactly as the real weights would (an HPSv2-style
``{"state_dict": ...}`` checkpoint, an aesthetic head with the LAION key layout, a transformers CLIP
folder) and is checked against an independent computation: the test's own model forward plus a
numpy cosine.
"""

import json
import shutil

import numpy as np
import pytest
import torch

from diffpref.cli import main
from diffpref.paths import embedded_clip_path, embedded_model_path
from diffpref.rewards import load_reward, parse_rewards
from diffpref.rewards.openclip_rewards import AestheticHead, clip_score, hps_score
from diffpref.rewards.pickscore import pick_score

OPENAI_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
OPENAI_STD = np.array([0.26862954, 0.26130258, 0.27577711])
# open_clip's model_configs format; 32 px images, so the preprocess resize and crop are the identity.
TINY_CLIP_CFG = {"embed_dim": 24,
                 "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
                 "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
PROMPTS = ["a red star", "a blue square on a white background", "a small green circle"]


def _cos(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def _images(n=3, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Tiny local reward weights in the real files' formats; returns {name: path}."""
    import open_clip
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    d = tmp_path_factory.mktemp("rewards")
    arch = d / "diffpref-test-tiny-clip.json"
    arch.write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(arch)
    torch.manual_seed(0)
    backbone = open_clip.create_model("diffpref-test-tiny-clip")
    torch.save({"state_dict": backbone.state_dict(), "epoch": 1}, d / "HPS_v2_compressed.pt")  # the HPSv2 layout
    torch.save(AestheticHead(TINY_CLIP_CFG["embed_dim"]).state_dict(), d / "sac+logos+ava1-l14-linearMSE.pth")

    tokenizer = CLIPTokenizer.from_pretrained(str(embedded_model_path() / "tokenizer"))
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                  num_attention_heads=2)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(d / "pickscore")
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    processor.save_pretrained(d / "processor")
    shutil.copytree(d / "pickscore", d / "pickscore_with_processor")
    processor.save_pretrained(d / "pickscore_with_processor")
    return {"arch": arch, "hps": d / "HPS_v2_compressed.pt", "head": d / "sac+logos+ava1-l14-linearMSE.pth",
            "pickscore": d / "pickscore", "processor": d / "processor", "pickscore_full": d / "pickscore_with_processor"}


def _spec(w):
    return (f"hpsv2={w['hps']}@{w['arch']},clip={embedded_clip_path()},"
            f"aesthetic={w['head']}@{w['hps']}@{w['arch']},pickscore={w['pickscore_full']}")


def _tiny_backbone(w):
    """The test's own load of the tiny open_clip checkpoint (not through open_clip's checkpoint loader)."""
    import open_clip

    model = open_clip.create_model("diffpref-test-tiny-clip")
    model.load_state_dict(torch.load(w["hps"], weights_only=True)["state_dict"])
    return model.eval()


def _openai_pixels(images):
    return torch.tensor(((images / 255.0 - OPENAI_MEAN) / OPENAI_STD).transpose(0, 3, 1, 2), dtype=torch.float32)


# ----------------------------------------------------------------------------- scores
def test_score_formulas_match_numpy():
    rng = np.random.default_rng(0)
    img, txt = rng.normal(size=(6, 8)), rng.normal(size=(6, 8))
    cos = _cos(img, txt)
    assert (cos < 0).any() and (cos > 0).any()
    t_img, t_txt = torch.tensor(img), torch.tensor(txt)
    np.testing.assert_allclose(clip_score(t_img, t_txt).numpy(), 100 * np.maximum(cos, 0), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(hps_score(t_img, t_txt).numpy(), 100 * cos, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(pick_score(t_img, t_txt, torch.tensor(100.0)).numpy(), 100 * cos, rtol=1e-5, atol=1e-4)


@torch.no_grad()
def test_hpsv2_and_aesthetic_load_from_files_and_match_an_independent_computation(weights):
    import open_clip

    images = _images()
    hps, aesthetic = (load_reward(s) for s in parse_rewards(
        f"hpsv2={weights['hps']}@{weights['arch']},aesthetic={weights['head']}@{weights['hps']}@{weights['arch']}"))
    model = _tiny_backbone(weights)
    image_emb = model.encode_image(_openai_pixels(images)).numpy()
    text_emb = model.encode_text(open_clip.get_tokenizer("diffpref-test-tiny-clip")(PROMPTS)).numpy()
    np.testing.assert_allclose(hps.score(images, PROMPTS), 100 * _cos(image_emb, text_emb), rtol=1e-4, atol=1e-3)

    # The aesthetic head is a chain of linear layers on the L2-normalised image embedding.
    state = {k: v.double().numpy() for k, v in torch.load(weights["head"], weights_only=True).items()}
    x = image_emb / np.linalg.norm(image_emb, axis=-1, keepdims=True)
    for i in (0, 2, 4, 6, 7):
        x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    np.testing.assert_allclose(aesthetic.score(images, PROMPTS), x[:, 0], rtol=1e-4, atol=1e-5)
    assert aesthetic.head.layers[0].in_features == TINY_CLIP_CFG["embed_dim"]  # the head follows the backbone


@torch.no_grad()
def test_clip_score_from_an_open_clip_folder_matches_an_independent_computation():
    from diffpref.models.world_clip import images_to_clip_input, load_world_clip

    images = _images(size=64, seed=1)
    (spec,) = parse_rewards(f"clip={embedded_clip_path()}")
    scores = load_reward(spec).score(images, PROMPTS, batch_size=2)
    model, _, tokenizer = load_world_clip()
    cos = _cos(model.encode_image(images_to_clip_input(images)).numpy(), model.encode_text(tokenizer(PROMPTS)).numpy())
    np.testing.assert_allclose(scores, 100 * np.maximum(cos, 0), rtol=1e-4, atol=1e-3)


@torch.no_grad()
def test_pickscore_loads_a_transformers_clip_folder_and_matches_an_independent_computation(weights):
    from transformers import CLIPModel

    images = _images(seed=2)
    (spec,) = parse_rewards(f"pickscore={weights['pickscore']}@{weights['processor']}")
    reward = load_reward(spec)
    model = CLIPModel.from_pretrained(str(weights["pickscore"])).eval()
    clip_mean, clip_std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    pixels = torch.tensor(((images / 255.0 - clip_mean) / clip_std).transpose(0, 3, 1, 2), dtype=torch.float32)
    image_emb = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output).numpy()
    tokens = reward.processor.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    text_emb = model.text_projection(model.text_model(**tokens).pooler_output).numpy()
    expected = model.logit_scale.exp().item() * _cos(image_emb, text_emb)
    np.testing.assert_allclose(reward.score(images, PROMPTS), expected, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- specs and errors
def test_reward_specs_default_the_architecture_and_refuse_bad_entries(tmp_path):
    hps, clip, aes, pick = parse_rewards("hpsv2=a.pt, clip=b.bin@ViT-B-32,aesthetic=h.pth@l14.bin,pickscore=dir@proc")
    assert (hps.arch, clip.arch, aes.arch) == ("ViT-H-14", "ViT-B-32", "ViT-L-14-quickgelu")
    assert (str(aes.path), str(aes.extra), str(pick.extra)) == ("h.pth", "l14.bin", "proc")
    with pytest.raises(ValueError, match=r"unknown reward 'imagereward'.*hpsv2"):
        parse_rewards("imagereward=x.pt")
    with pytest.raises(ValueError, match="more than once"):
        parse_rewards("clip=a.pt,clip=b.pt")
    with pytest.raises(ValueError, match=r"MLP head and its CLIP backbone.*improved-aesthetic-predictor"):
        parse_rewards("aesthetic=sac+logos+ava1-l14-linearMSE.pth")
    with pytest.raises(ValueError, match="neither an open_clip architecture"):
        load_reward(parse_rewards(f"clip={embedded_clip_path() / 'open_clip_model.safetensors'}@ViT-Nope")[0])


def test_missing_weights_are_named_with_where_to_get_them_before_any_generation(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red star\n")

    def run(rewards):
        # --model points nowhere: reaching generation would fail with another message.
        code = main(["eval", "--model", str(tmp_path / "no-model"), "--prompts", str(prompts), "--rewards", rewards])
        return code, capsys.readouterr().err

    code, err = run(f"hpsv2={tmp_path}/HPS_v2_compressed.pt")
    assert code == 2 and "'hpsv2'" in err and f"{tmp_path}/HPS_v2_compressed.pt" in err and "xswu/HPSv2" in err
    code, err = run(f"clip={embedded_clip_path()},aesthetic={tmp_path}/sac+logos+ava1-l14-linearMSE.pth@{tmp_path}/l14.bin")
    assert code == 2 and "'aesthetic'" in err and "christophschuhmann/improved-aesthetic-predictor" in err
    (tmp_path / "pick").mkdir()
    (tmp_path / "pick" / "config.json").write_text("{}")
    code, err = run(f"pickscore={tmp_path}/pick")
    assert code == 2 and "preprocessor_config.json" in err and "laion/CLIP-ViT-H-14-laion2B-s32B-b79K" in err
    code, err = run(f"pickscore={tmp_path}/PickScore_v1")
    assert code == 2 and "yuvalkirstain/PickScore_v1" in err


# ----------------------------------------------------------------------------- diffpref eval
def _eval(tmp_path, capsys, rewards, *extra):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    capsys.readouterr()
    code = main(["eval", "--model", "embedded", "--prompts", str(prompts), "--rewards", rewards, "--steps", "4",
                 "--device", "cpu", "--json", *extra])
    assert code == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def _random_lora(out_dir):
    """A random (non-zero) LoRA on the embedded UNet, saved in the diffusers format as training saves it."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(embedded_model_path() / "unet")
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v"]))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers=layers,
                                              unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
    return out_dir


def test_eval_end_to_end_with_and_without_a_lora(tmp_path, capsys, weights):
    base_only = _eval(tmp_path, capsys, _spec(weights))
    assert base_only["prompts"] == 3 and base_only["images"] == 3 and base_only["adapter"] is None
    for name in ("hpsv2", "clip", "aesthetic", "pickscore"):
        r = base_only[name]
        assert set(r) == {"mean_reward", "base_mean_reward", "win_rate_vs_base"}
        assert r["mean_reward"] == r["base_mean_reward"] and r["win_rate_vs_base"] == 0.5  # the model is its own base

    tuned = _eval(tmp_path, capsys, _spec(weights), "--adapter", str(_random_lora(tmp_path / "lora")))
    assert tuned["images"] == 6 and tuned["adapter"] == str(tmp_path / "lora")
    for name in ("hpsv2", "clip", "aesthetic", "pickscore"):
        r = tuned[name]
        assert np.isfinite([r["mean_reward"], r["base_mean_reward"]]).all() and 0 <= r["win_rate_vs_base"] <= 1
        # Same prompts and seeds: the base images, and so their rewards, are those of the first run.
        assert r["base_mean_reward"] == pytest.approx(base_only[name]["base_mean_reward"], rel=1e-5, abs=1e-6)
    assert any(tuned[n]["mean_reward"] != tuned[n]["base_mean_reward"] for n in ("hpsv2", "clip", "pickscore"))


def test_eval_with_a_ppd_adapter_reports_each_user_and_their_mean(tmp_path, capsys, weights):
    from diffpref.personalize.adapter import read_ppd_config
    from diffpref.personalize.encoder import save_user_embedding

    config = read_ppd_config("embedded-ppd")
    torch.manual_seed(0)
    for user in ("alice", "bob"):
        save_user_embedding(tmp_path / f"{user}.safetensors", torch.randn(config["num_tokens"], config["token_dim"]))
    users = tmp_path / "users.json"
    users.write_text(json.dumps([{"user_id": u, "embedding": f"{u}.safetensors"} for u in ("bob", "alice")]))
    result = _eval(tmp_path, capsys, f"clip={embedded_clip_path()},hpsv2={weights['hps']}@{weights['arch']}",
                   "--adapter", "embedded-ppd", "--users", str(users))
    assert result["users"] == ["alice", "bob"] and result["images"] == 9
    for name in ("clip", "hpsv2"):
        r = result[name]
        assert set(r["per_user"]) == {"alice", "bob"}
        assert r["win_rate_vs_base"] == pytest.approx(np.mean([u["win_rate_vs_base"] for u in r["per_user"].values()]))
        assert r["mean_reward"] == pytest.approx(np.mean([u["mean_reward"] for u in r["per_user"].values()]))

    # A PPD adapter without users, or users with a LoRA, is refused with the fix.
    prompts = tmp_path / "prompts.txt"
    assert main(["eval", "--prompts", str(prompts), "--rewards", f"clip={embedded_clip_path()}",
                 "--adapter", "embedded-ppd", "--device", "cpu", "--steps", "2"]) == 2
    assert "pass --users FILE" in capsys.readouterr().err
