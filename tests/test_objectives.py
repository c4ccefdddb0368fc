"""Each objective moves the model toward the preferred images, and the same check fails when the preference is flipped.

The fixture: pairs of latents that share their random content and differ in one attribute (the
preferred image has a bright left half, the rejected one a bright right half), a base model (the
world's UNet fitted a few steps to both kinds alike) tuned with LoRA by the trainer's own
``prepare_training`` / ``training_step``, at high timesteps, where the attribute is left to the
model's prior because little of it is visible in x_t. The measure is the implicit reward
margin on held-out pairs: how much more the tuned model's denoising error fell (against the model
it started from, at the same noise and timesteps) on the preferred images than on the rejected
ones. A "flipped" objective is the same objective with each pair's preference reversed (for the
logistic objectives this is exactly the sign flip of the margin inside the loss): it must push the
margin the other way, so the directional check cannot pass by accident.
"""

from __future__ import annotations

import pytest
import torch

from diffpref.training.objectives import OBJECTIVES, get_objective, register_objective
from diffpref.training.step import adapters_disabled, prepare_training, training_step

METHODS = ["dpo", "inpo", "kto", "mapo", "sft"]
ATTRIBUTE = 2.0        # added to the bright half
SIZE, TOKENS = 8, 4    # 8x8 latents, 4 prompt tokens: enough for the world UNet, cheap on one core
STEPS = 16
BASE_STEPS = 20
TIMESTEPS = (700, 1000)  # trained on [700, 1000)
EVAL_TIMESTEPS = (750, 850, 950)
# Per objective: betas for this fixture's error gaps (~1e-2, where SD's are ~1e-3); SFT, whose signal is the
# weakest (it never sees a rejected image), gets more images per step.
SETTINGS = {"dpo": dict(beta=500.0), "inpo": dict(beta=500.0, inversion_steps=10), "kto": dict(beta=50.0),
            "mapo": dict(beta=0.1), "sft": dict(learning_rate=5e-3, train_batch_size=16)}
MARGIN = 1e-3  # measured (seeded): 4.5e-3 (SFT) to 4.5e-2 (DPO); flipped: -3.7e-3 (SFT) to -1.1e-1 (InPO)


def _with_attribute(content: torch.Tensor, side: int) -> torch.Tensor:
    """The attribute: a bright left (side 0) or right (side 1) half; mirror images of each other, so
    neither is easier for the network to learn than the other."""
    out = content.clone()
    half = SIZE // 2
    out[:, :, :, side * half:(side + 1) * half] += ATTRIBUTE
    return out


class _Cache:
    """What the trainer reads of a cache: items, their count, the empty prompt and the resolution."""

    resolution = SIZE * 4

    def __init__(self, items: list[dict], dim: int):
        self.items = items
        self.empty_prompt_cond = {"prompt_embeds": torch.zeros(TOKENS, dim)}

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _prompt(dim: int) -> torch.Tensor:
    return torch.randn(TOKENS, dim, generator=torch.Generator().manual_seed(0))


def _pairs(n: int, prompt: torch.Tensor, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    content = torch.randn(n, 4, SIZE, SIZE, generator=gen) * 0.5
    good, bad = _with_attribute(content, 0), _with_attribute(content, 1)
    first = torch.arange(n) % 2 == 0  # the preferred image sits on either side
    items = [{"latents_0": (good if f else bad)[i], "latents_1": (bad if f else good)[i], "label": float(f),
              "prompt_embeds": prompt} for i, f in enumerate(first.tolist())]
    return items


def _ratings(pairs: list[dict]) -> list[dict]:
    """Each pair as two rated images (as ``build_rating_cache`` turns pairs into ratings)."""
    out = []
    for p in pairs:
        won = p["label"] >= 0.5
        out.append({"latents": p["latents_0"], "liked": float(won), "prompt_embeds": p["prompt_embeds"]})
        out.append({"latents": p["latents_1"], "liked": float(not won), "prompt_embeds": p["prompt_embeds"]})
    return out


def flipped(name: str) -> str:
    """Register ``<name>_flipped``: the objective with every preference reversed."""
    base = get_objective(name)

    def fn(x):
        batch = dict(x.batch)
        if base.data == "ratings":
            batch["liked"] = 1.0 - batch["liked"]
        else:
            batch["label"] = 1.0 - batch["label"]
        x.batch = batch
        return base.fn(x)

    register_objective(f"{name}_flipped", fn, default_beta=base.default_beta, data=base.data,
                       uses_reference=base.uses_reference, inverts=base.inverts)
    return f"{name}_flipped"


@pytest.fixture(scope="module")
def base_state():
    """The base model: the world UNet fitted for a few steps to both kinds of image alike, so that it
    starts as a fair denoiser of either and only the preference can favour one."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from diffpref.models.builders import WORLD_SCHEDULER_CONFIG, WORLD_UNET_CONFIG

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**WORLD_UNET_CONFIG)
    alphas = DDIMScheduler(**WORLD_SCHEDULER_CONFIG).alphas_cumprod
    prompt = _prompt(int(unet.config.cross_attention_dim))
    pairs = _pairs(16, prompt, seed=1)
    x0 = torch.cat([torch.stack([p["latents_0"] for p in pairs]), torch.stack([p["latents_1"] for p in pairs])])
    optimizer = torch.optim.Adam(unet.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(5)
    for _ in range(BASE_STEPS):
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(TIMESTEPS[0], TIMESTEPS[1], (len(x0),), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        pred = unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, encoder_hidden_states=prompt.expand(len(x0), -1, -1)).sample
        loss = (pred - noise).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


@pytest.fixture
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def _implicit_margin(unet, held_out: list[dict], prompt: torch.Tensor, schedule, inverted: bool) -> float:
    """Mean over held-out pairs, noise and timesteps of (start_err - tuned_err) on preferred minus on rejected.

    ``inverted``: at InPO's latents (the start model's DDIM inversion of x0, target its implied noise),
    where InPO's implicit reward lives; otherwise at forward-noised latents."""
    from diffpref.inversion import ddim_invert

    gen = torch.Generator().manual_seed(99)
    good = torch.stack([p["latents_0"] if p["label"] >= 0.5 else p["latents_1"] for p in held_out])
    bad = torch.stack([p["latents_1"] if p["label"] >= 0.5 else p["latents_0"] for p in held_out])
    x0, n = torch.cat([good, bad]), len(held_out)
    cond = prompt.expand(2 * n, -1, -1)
    margins = []
    with torch.no_grad():
        for t_value in EVAL_TIMESTEPS:
            t = torch.full((2 * n,), t_value)
            if inverted:
                with adapters_disabled(unet):
                    inv = ddim_invert(lambda z, s: unet(z, s, encoder_hidden_states=cond).sample, x0, t,
                                      schedule.alphas_cumprod, num_steps=SETTINGS["inpo"]["inversion_steps"])
                x_t, target = inv.x_t, inv.eps_star
            else:
                target = torch.randn(n, 4, SIZE, SIZE, generator=gen).repeat(2, 1, 1, 1)
                x_t = schedule.add_noise(x0, target, t)
            tuned = (unet(x_t, t, encoder_hidden_states=cond).sample - target).pow(2).mean(dim=(1, 2, 3))
            with adapters_disabled(unet):
                start = (unet(x_t, t, encoder_hidden_states=cond).sample - target).pow(2).mean(dim=(1, 2, 3))
            gain = start - tuned
            margins.append((gain[:n] - gain[n:]).mean())
    return float(torch.stack(margins).mean())


def _train_and_measure(method: str, accelerator, base_state: dict) -> float:
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from diffpref.models.builders import WORLD_SCHEDULER_CONFIG, WORLD_UNET_CONFIG
    from diffpref.training.config import TrainConfig
    from diffpref.training.objectives import NoiseSchedule

    unet = UNet2DConditionModel(**WORLD_UNET_CONFIG)
    unet.load_state_dict(base_state)
    dim = int(unet.config.cross_attention_dim)
    prompt = _prompt(dim)
    train_pairs, held_out = _pairs(16, prompt, seed=1), _pairs(16, prompt, seed=2)
    objective = get_objective(method)
    items = _ratings(train_pairs) if objective.data == "ratings" else train_pairs
    base = method.removesuffix("_flipped")
    cfg = TrainConfig(method=method, data_path="unused", lora_rank=8, max_train_steps=STEPS, prompt_dropout=0.0,
                      timestep_min=TIMESTEPS[0], timestep_max=TIMESTEPS[1], report_to="none",
                      **{"learning_rate": 1e-2, "train_batch_size": 8, **SETTINGS[base]})
    scheduler = DDIMScheduler(**WORLD_SCHEDULER_CONFIG)
    schedule = NoiseSchedule(scheduler.alphas_cumprod.clone())
    parts = prepare_training(cfg, accelerator, unet, _Cache(items, dim), schedule)
    for step in range(STEPS):
        result = training_step(parts, step)
        assert result.skipped == 0 and torch.isfinite(torch.tensor(result.metrics["loss"]))
    return _implicit_margin(parts.raw_unet, held_out, prompt, schedule, inverted=base == "inpo")


def moves_toward_preferred(margin: float) -> None:
    assert margin > MARGIN, f"implicit reward margin {margin:.2e} did not rise above {MARGIN}"


@pytest.mark.parametrize("flip", [False, True], ids=["as-shipped", "sign-flipped"])
@pytest.mark.parametrize("method", METHODS)
def test_objective_moves_the_model_toward_the_preferred_attribute(method, flip, accelerator, base_state):
    name = flipped(method) if flip else method
    try:
        margin = _train_and_measure(name, accelerator, base_state)
    finally:
        if flip:
            OBJECTIVES.pop(name)
    if not flip:
        moves_toward_preferred(margin)
    else:  # the same check fails: the flipped loss moves the model toward the rejected images instead
        with pytest.raises(AssertionError):
            moves_toward_preferred(margin)
        assert margin < -MARGIN
