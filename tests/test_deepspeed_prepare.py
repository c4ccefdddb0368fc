"""prepare_training under DeepSpeed, without deepspeed installed: what accelerate 1.15's DeepSpeed prepare
demands (``Accelerator.prepare`` / ``_prepare_deepspeed``), played by a fake accelerator.

accelerate builds one DeepSpeed engine per Accelerator: ``prepare`` refuses two models in one call ("You can't
use same Accelerator() instance with multiple models when using DeepSpeed"), and with no DataLoader it needs an
integer ``train_micro_batch_size_per_gpu`` in the DeepSpeed config. So under DeepSpeed the trainer prepares one
container (the UNet and the conditioner's modules), fills the micro batch, accumulation and clipping from its
config, and keeps full fine-tuning's frozen reference unprepared in the training dtype. The real engine ran on
CPUs (docs/distributed.md, with a patched accelerate state); this test keeps the logic from rotting where
deepspeed is absent.
"""
import contextlib
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from diffpref.training.config import TrainConfig
from diffpref.training.objectives import NoiseSchedule
from diffpref.training.step import PreparedParts, deepspeed_settings, prepare_training


class _Engine(torch.nn.Module):
    """Stands for deepspeed's engine: holds the model as ``module`` and counts the calls through it."""

    def __init__(self, module):
        super().__init__()
        self.module, self.calls = module, []

    def forward(self, *args, **kwargs):
        self.calls.append(kwargs.get("part", -1))
        return self.module(*args, **kwargs)


class _DeepSpeedAccelerator:
    distributed_type = DistributedType.DEEPSPEED
    mixed_precision = "bf16"  # accelerate reads it from the DeepSpeed config's bf16.enabled
    device = torch.device("cpu")

    def __init__(self):
        config = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
                  "gradient_accumulation_steps": "auto", "zero_optimization": {"stage": 3}}
        self.restored = []  # whole_models_on_load gives transformers its DeepSpeed config back afterwards
        self.state = SimpleNamespace(deepspeed_plugin=SimpleNamespace(
            deepspeed_config=config, zero_stage=3, set_deepspeed_weakref=lambda: self.restored.append(True)))
        self.prepared = []

    def prepare(self, *args):
        models = [a for a in args if isinstance(a, torch.nn.Module)]
        if len(models) > 1:  # accelerate 1.15, Accelerator.prepare
            raise AssertionError("You can't use same `Accelerator()` instance with multiple models when using DeepSpeed")
        if self.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == "auto":
            raise ValueError("When using DeepSpeed, `accelerate.prepare()` requires you to pass at least one of "
                             "training or evaluation dataloaders ...")  # _prepare_deepspeed, no DataLoader given
        self.prepared.append(args)
        return tuple(_Engine(a.to(torch.bfloat16)) if isinstance(a, torch.nn.Module) else a for a in args)

    def unwrap_model(self, model):
        return model.module

    def autocast(self):  # accelerate: nothing under DeepSpeed (native_amp is off)
        return contextlib.nullcontext()


class _Cache:
    resolution = 32

    def __init__(self, dim):
        self.empty_prompt_cond = {"prompt_embeds": torch.zeros(4, dim)}

    def __len__(self):
        return 4


class _Conditioner:
    """One trainable module, as PPD's user encoder: its tokens are appended to the prompt."""

    def __init__(self, dim):
        self.dim, self.encoder = dim, None

    @property
    def modules(self):
        return [self.encoder]

    def setup(self, cfg, unet, cache, accelerator, tokenizer):
        self.encoder = torch.nn.Linear(self.dim, self.dim)
        return [{"params": list(self.encoder.parameters())}]

    def bind(self, modules):
        (self.encoder,) = modules

    def condition(self, prompt_embeds, indices, generators):
        return torch.cat([prompt_embeds, self.encoder(prompt_embeds[:, :1]).to(prompt_embeds.dtype)], dim=1)

    def without_user(self, prompt_embeds):
        return prompt_embeds


@pytest.fixture(scope="module")
def base():
    from diffpref.models.builders import tiny_sd15_pipeline

    pipe = tiny_sd15_pipeline(seed=0)
    return pipe.unet.state_dict(), dict(pipe.unet.config), pipe.scheduler.alphas_cumprod.clone()


def _unet(base):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(base[1])
    unet.load_state_dict(base[0])
    return unet


def _inputs(unet, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dim = int(unet.config.cross_attention_dim)
    x = torch.randn(2, unet.config.in_channels, 8, 8, generator=gen)
    return x, torch.tensor([10, 500]), {"prompt_embeds": torch.randn(2, 4, dim, generator=gen)}


def _cfg(**kw):
    return TrainConfig(method="dpo", data_path="unused", report_to="none", train_batch_size=3,
                       gradient_accumulation_steps=2, max_grad_norm=0.5, **kw)


def test_full_finetune_prepares_one_engine_and_keeps_the_reference_whole_in_bf16(base):
    accelerator, unet = _DeepSpeedAccelerator(), _unet(base)
    parts = prepare_training(_cfg(lora_rank=0), accelerator, unet, _Cache(unet.config.cross_attention_dim),
                             NoiseSchedule(base[2]))
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["gradient_clipping"]) == (3, 2, 0.5)
    (call,) = accelerator.prepared  # one prepare call: the policy's container and the optimizer, no reference
    assert isinstance(call[0], PreparedParts) and call[0].unet is unet and len(call) == 2
    assert parts.raw_unet is unet and parts.models == [parts.models[0]] and isinstance(parts.models[0], _Engine)
    reference = parts.reference_unet
    assert reference is not unet and all(p.dtype == torch.bfloat16 and not p.requires_grad
                                         for p in reference.parameters())
    x, t, cond = _inputs(unet)
    with torch.no_grad():
        policy, ref = parts.policy(x, t, cond), parts.reference(x, t, cond)
        direct = reference(x.bfloat16(), t, encoder_hidden_states=cond["prompt_embeds"].bfloat16()).sample.float()
    assert parts.models[0].calls == [-1]  # the policy ran through the engine, the reference beside it
    # fp32 inputs against bf16 weights: the trainer casts per op (accelerate's autocast does nothing here)
    assert policy.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(ref, direct, rtol=0.05, atol=0.05)
    torch.testing.assert_close(policy, ref, rtol=0, atol=0)  # step 0: the policy is the base model


def test_conditioner_modules_go_through_the_same_engine(base):
    accelerator, unet = _DeepSpeedAccelerator(), _unet(base)
    dim = int(unet.config.cross_attention_dim)
    conditioner = _Conditioner(dim)
    encoder = None

    def setup(*args):
        nonlocal encoder
        groups = _Conditioner.setup(conditioner, *args)
        encoder = conditioner.encoder
        return groups

    conditioner.setup = setup
    parts = prepare_training(_cfg(lora_rank=4, conditioning="ppd"), accelerator, unet, _Cache(dim),
                             NoiseSchedule(base[2]), conditioner=conditioner)
    (call,) = accelerator.prepared
    assert accelerator.restored == [True]  # the conditioner's set-up (a VLM backbone) loaded outside ZeRO-3 init
    container = call[0]
    assert container.unet is unet and list(container.own) == [encoder]  # both trainable parts, one model
    assert conditioner.encoder.module is encoder  # export reads the module itself
    engine = parts.models[0]
    x, t, cond = _inputs(unet)
    with torch.no_grad():
        embeds = conditioner.condition(cond["prompt_embeds"], None, None)
        out = parts.policy(x, t, {"prompt_embeds": embeds})
    assert embeds.shape[1] == 5 and engine.calls == [0, -1]  # the encoder, then the UNet, through the engine
    assert torch.isfinite(out).all()
    trainable = {id(p) for g in parts.optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in encoder.parameters()} <= trainable  # the optimizer prepared with them trains them


def test_a_deepspeed_setting_that_contradicts_the_config_fails_naming_it():
    config = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": "auto"}
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=8 .* gives 3"):
        deepspeed_settings(_cfg(lora_rank=4), config)
    agreed = deepspeed_settings(_cfg(lora_rank=4), {"train_micro_batch_size_per_gpu": 3})
    assert agreed == {"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 2, "gradient_clipping": 0.5}
