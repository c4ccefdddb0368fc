"""The one config every preference trainer reads (YAML + ``key=value`` overrides)."""

from __future__ import annotations

from dataclasses import dataclass, field

from diffpref.training.objectives import OBJECTIVES, get_objective

# The registered objectives (diffpref.training.objectives), for help texts: validation reads the
# registry itself, so an objective registered after this import is valid too.
METHODS = tuple(OBJECTIVES)
MIXED_PRECISION = ("no", "fp16", "bf16")
NAN_POLICIES = ("stop", "skip")
LR_SCHEDULES = ("constant", "cosine", "linear")
OPTIMIZERS = ("adamw", "adamw8bit", "adafactor")
CONDITIONINGS = ("none", "ppd")

# Per-method beta defaults in the -beta/2 form of diffusion_dpo_loss (papers' settings for SD1.5).
DEFAULT_BETA = {name: o.default_beta for name, o in OBJECTIVES.items()}


def _choice(name: str, value, valid) -> None:
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(map(str, valid))}")


@dataclass
class TrainConfig:
    method: str = field(default="dpo", metadata={"help": f"objective: one of {', '.join(METHODS)} (the registry in diffpref.training.objectives); ppd: an alias of dpo with conditioning: ppd"})
    model: str = field(default="embedded", metadata={"help": "'embedded', a local diffusers folder, or a hub id"})
    data_path: str = field(default="", metadata={"help": "Pick-a-Pic parquet (file/folder/glob) or JSONL manifest"})
    output_dir: str = field(default="outputs/train", metadata={"help": "checkpoints, logs and the final LoRA/UNet"})
    max_train_steps: int = field(default=200, metadata={"help": "optimizer steps (micro-steps / accumulation)"})
    beta: float | None = field(default=None, metadata={"help": "preference strength; default per method (DPO 5000 in the -beta/2 form)"})
    learning_rate: float = field(default=1e-4, metadata={"help": "peak learning rate"})
    train_batch_size: int = field(default=4, metadata={"help": "pairs per process per micro-step"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-steps per optimizer step"})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank; 0 = full fine-tune with a frozen reference copy (for ppd: no LoRA)"})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (default: equal to the rank)"})
    lora_target_modules: str = field(default="to_q,to_k,to_v,to_out.0", metadata={"help": "comma-separated UNet modules that get LoRA"})
    mixed_precision: str = field(default="no", metadata={"help": "no | fp16 | bf16 (GPU); LoRA params stay fp32"})
    attention: str = field(default="sdpa", metadata={"help": "sdpa (default) | xformers (CUDA + xformers only)"})
    resume_from: str | None = field(default=None, metadata={"help": "a checkpoint folder, or 'latest' in output_dir"})
    timestep_min: int = field(default=0, metadata={"help": "training timesteps are drawn uniformly from [timestep_min, timestep_max) (the papers: all of them)"})
    timestep_max: int | None = field(default=None, metadata={"help": "upper end (exclusive) of the training timesteps (default: the scheduler's num_train_timesteps)"})
    seed: int = field(default=0, metadata={"help": "seed of data order, noise and timesteps"})
    tie_policy: str = field(default="drop", metadata={"help": "drop | soft: what ties in the data become"})
    resolution: int | None = field(default=None, metadata={"help": "training resolution (default: the model's native one)"})
    cache_dir: str | None = field(default=None, metadata={"help": "latent/text-embedding cache root (default: output_dir/../.cache)"})
    cache_batch_size: int = field(default=32, metadata={"help": "cache build: images per VAE call and prompts per text-encoder call (every process encodes its share)"})
    random_flip: bool = field(default=False, metadata={"help": "cache both orientations of every image and mirror each at random per step (the official Diffusion-DPO default). Off by default: it doubles the cache build and its disk, and would erase a taste about left and right"})
    process_group_timeout: int = field(default=7200, metadata={"help": "seconds a collective may wait (torch.distributed timeout): a cache build's barrier waits for the slowest share"})
    prompt_dropout: float = field(default=0.1, metadata={"help": "fraction of prompts replaced by '' (keeps guidance working)"})
    lr_scheduler: str = field(default="constant", metadata={"help": "constant | cosine | linear (after warm-up)"})
    lr_warmup_steps: int = field(default=0, metadata={"help": "linear warm-up optimizer steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "decoupled weight decay (AdamW, Adafactor); the papers' recipes use 0.01"})
    adam_beta1: float = field(default=0.9, metadata={"help": "Adam beta1"})
    adam_beta2: float = field(default=0.999, metadata={"help": "Adam beta2"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0 disables)"})
    optimizer: str = field(default="adamw", metadata={"help": "adamw | adamw8bit (bitsandbytes, GPU) | adafactor (transformers; the official SDXL recipe: lr from the config, no relative step)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute UNet activations in backward"})
    inversion_steps: int = field(default=10, metadata={"help": "InPO: points K of the fixed inversion grid round(linspace(0, timestep_max - 1, K + 1))[1:] (10: 100, 200, ..., 999, the public code's grid); every training t is one of them, and x_t is the DDIM inversion of x0 along the grid up to t"})
    inversion_cache: bool = field(default=True, metadata={"help": "InPO with the frozen reference and inversion_eta 0: invert every image along the grid once before training (K passes per image, K x 2 fp16 latents per pair on disk beside the latent cache) and read x_t from there, so a step costs a DPO step. false: invert every step (up to K passes); pays only below about one epoch, see docs/training.md"})
    inversion_eta: float = field(default=0.0, metadata={"help": "InPO: stochasticity of the inversion (0 = DDIM)"})
    inversion_model: str = field(default="reference", metadata={"help": "InPO: which model inverts x0 to x_t: reference | policy"})
    kto_desirable_weight: float = field(default=1.0, metadata={"help": "KTO: weight of liked images"})
    kto_undesirable_weight: float = field(default=1.0, metadata={"help": "KTO: weight of disliked images"})
    nan_policy: str = field(default="stop", metadata={"help": "stop | skip: what a non-finite loss does"})
    checkpointing_steps: int = field(default=100, metadata={"help": "optimizer steps between checkpoints (0: only at the end)"})
    checkpoints_total_limit: int = field(default=2, metadata={"help": "checkpoints kept (oldest deleted)"})
    eval_world: bool = field(default=False, metadata={"help": "evaluate on world data: the oracle win rate against the base model, judged by the eval_users' true rewards"})
    eval_every: int = field(default=0, metadata={"help": "eval_world: optimizer steps between evaluations (0: at the end only)"})
    eval_prompts: int = field(default=200, metadata={"help": "eval_world: prompt x seed pairs per evaluation (0: no evaluation)"})
    eval_sampling_steps: int = field(default=20, metadata={"help": "eval_world: sampling steps of evaluation generations"})
    eval_users: str | None = field(default=None, metadata={"help": "eval_world: users JSON (default: users.json beside data_path)"})
    report_to: str = field(default="tensorboard", metadata={"help": "accelerate tracker: tensorboard | wandb | none"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default)"})
    # PPD (conditioning: ppd, or a `ppd:` section in the YAML): DPO plus user conditioning. The base UNet
    # stays frozen; the user encoder head and the new user-attention projections train (plus LoRA when
    # lora_rank > 0). Keys of recipes that never shipped are gone: reports/ppd_experiments.md.
    conditioning: str = field(default="none", metadata={"help": "none | ppd: what the UNet is conditioned on besides the prompt (ppd: a user's few-shot choices, read by the ppd_* keys; a `ppd:` section in the YAML sets it)"})
    ppd_num_tokens: int = field(default=4, metadata={"help": "PPD: user tokens K read by the UNet"})
    ppd_blocks: str = field(default="all", metadata={"help": "PPD: 'all' or comma-separated UNet block prefixes that get user attention"})
    ppd_backbone: str = field(default="embedded", metadata={"help": "PPD: 'embedded' (world CLIP), an open_clip local-dir folder, or a local transformers vision-language model folder (AutoModelForImageTextToText: LLaVA-OneVision, Qwen2-VL, ...) that reads a user's examples in one prompt, as the paper does (ppd_vlm_* keys)"})
    ppd_shots_min: int = field(default=1, metadata={"help": "PPD: fewest context examples per training sample"})
    ppd_shots_max: int = field(default=8, metadata={"help": "PPD: most context examples per training sample"})
    ppd_user_dropout: float = field(default=0.1, metadata={"help": "PPD: fraction of samples trained with no user"})
    ppd_hidden: int = field(default=128, metadata={"help": "PPD: width of the user encoder head"})
    ppd_layers: int = field(default=2, metadata={"help": "PPD: set-transformer layers of the head"})
    ppd_heads: int = field(default=4, metadata={"help": "PPD: attention heads of the head"})
    ppd_encoder: str = field(default="set", metadata={"help": "PPD: 'set' (set-transformer head over the examples' backbone features; its tokens start at 0.05 scale) or 'evidence' (tokens = shared tokens + one learned linear map of the mean preferred-minus-rejected image embedding: the plain few-shot estimate of a linear taste, trained by every user's pairs)"})
    ppd_attention_lr: float | None = field(default=None, metadata={"help": "PPD: learning rate of the UNet's user projections (and LoRA); default learning_rate. The head's small fresh weights want a far larger rate than copies of the UNet's"})
    ppd_value_init_scale: float = field(default=0.0, metadata={"help": "PPD: the user value projections start as this multiple of the layer's to_v; 0 (default): at zero, so training starts as the base model exactly (DPO loss log 2 at step 0); above 0 the user branch starts as an echo of the text attention"})
    ppd_init_adapter: str | None = field(default=None, metadata={"help": "PPD: start the user encoder and the user projections from this trained adapter ('embedded-ppd' or a folder) instead of fresh; e.g. a round on its own on-policy pairs (`diffpref world policy-pairs`). Its encoder settings and token count must match this config's"})
    # VLM backbone (ppd_backbone = a transformers folder): the features of ppd_vlm_subsets sampled context sets per
    # user are computed once before training (sharded across processes, cached beside the latents).
    ppd_vlm_subsets: int = field(default=4, metadata={"help": "PPD, VLM backbone: context sets sampled per user (each of ppd_shots_min..ppd_shots_max of the user's pairs) whose features are precomputed; a training pair draws one that leaves it out"})
    ppd_vlm_image_size: int = field(default=384, metadata={"help": "PPD, VLM backbone: every example image is resized to this square before the processor (fixes its image tokens; 0: as stored)"})
    ppd_vlm_max_tokens: int = field(default=0, metadata={"help": "PPD, VLM backbone: token budget of one prompt (examples beyond it are left out; 0: the model's context length)"})
    ppd_vlm_max_new_tokens: int = field(default=32, metadata={"help": "PPD, VLM backbone: profile tokens generated before the hidden states are read (0: none, the last prompt token's states)"})
    ppd_vlm_pooling: str = field(default="concat", metadata={"help": "PPD, VLM backbone: 'concat' (every layer's last-token state, as the paper) or 'mean' over layers"})

    def __post_init__(self):
        if self.method == "ppd":
            # The alias older configs and commands use: PPD is DPO plus user conditioning.
            if self.conditioning not in ("none", "ppd"):
                raise ValueError(f"method: ppd means method: dpo with conditioning: ppd, but conditioning="
                                 f"{self.conditioning!r}; drop one of them")
            self.method, self.conditioning = "dpo", "ppd"
        _choice("method", self.method, tuple(OBJECTIVES))
        _choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        _choice("attention", self.attention, ("sdpa", "xformers"))
        _choice("tie_policy", self.tie_policy, ("drop", "soft"))
        _choice("nan_policy", self.nan_policy, NAN_POLICIES)
        _choice("lr_scheduler", self.lr_scheduler, LR_SCHEDULES)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("inversion_model", self.inversion_model, ("reference", "policy"))
        for name in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.timestep_min < 0 or (self.timestep_max is not None and self.timestep_max <= self.timestep_min):
            raise ValueError(f"need 0 <= timestep_min ({self.timestep_min}) < timestep_max ({self.timestep_max})")
        if self.cache_batch_size < 1 or self.process_group_timeout < 1:
            raise ValueError(f"cache_batch_size ({self.cache_batch_size}) and process_group_timeout "
                             f"({self.process_group_timeout}) must be >= 1")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank={self.lora_rank} must be >= 0 (0 = full fine-tune)")
        if not 0.0 <= self.prompt_dropout < 1.0:
            raise ValueError(f"prompt_dropout={self.prompt_dropout} must lie in [0, 1)")
        if self.beta is None:
            self.beta = get_objective(self.method).default_beta
        _choice("conditioning", self.conditioning, CONDITIONINGS)
        if self.conditioning == "ppd" and not 1 <= self.ppd_shots_min <= self.ppd_shots_max:
            raise ValueError(f"need 1 <= ppd_shots_min ({self.ppd_shots_min}) <= ppd_shots_max ({self.ppd_shots_max})")
        _choice("ppd_encoder", self.ppd_encoder, ("set", "evidence"))
        _choice("ppd_vlm_pooling", self.ppd_vlm_pooling, ("concat", "mean"))
        if min(self.ppd_vlm_image_size, self.ppd_vlm_max_tokens, self.ppd_vlm_max_new_tokens) < 0 or self.ppd_vlm_subsets < 1:
            raise ValueError("ppd_vlm_subsets must be >= 1 and ppd_vlm_image_size, ppd_vlm_max_tokens, "
                             "ppd_vlm_max_new_tokens >= 0")
        if self.conditioning == "ppd" and self.method != "dpo":
            raise ValueError(f"conditioning: ppd trains with Diffusion-DPO (PPD is DPO plus user conditioning); "
                             f"got method={self.method!r}: set method: dpo")
        if self.ppd_value_init_scale < 0:
            raise ValueError(f"ppd_value_init_scale={self.ppd_value_init_scale} must be >= 0 (the user values start as "
                             "this multiple of to_v; 0: the user branch starts at exactly zero)")
        if self.ppd_value_init_scale == 0 and self.ppd_attention_lr == 0 and not self.ppd_init_adapter:
            raise ValueError("ppd_value_init_scale=0 with ppd_attention_lr=0: the user values start at zero and are "
                             "frozen, so the user branch can never act; give the projections a learning rate or a start")
        if self.ppd_attention_lr is not None and self.ppd_attention_lr < 0:
            raise ValueError(f"ppd_attention_lr={self.ppd_attention_lr} must be >= 0 (0 freezes the user projections)")
        if self.lora_alpha is None:
            self.lora_alpha = float(self.lora_rank)
        if not self.data_path:
            raise ValueError("data_path is empty: point it at a Pick-a-Pic parquet or a JSONL manifest "
                             "(for the embedded world: `diffpref world make-data --out data/world ...`)")

    @property
    def caches_inversion(self) -> bool:
        """Whether InPO's x_t comes from the inversion cache: only a frozen, deterministic inversion is cacheable
        (inversion_model=policy follows the trained weights; inversion_eta > 0 draws fresh noise every step)."""
        return (get_objective(self.method).inverts and self.inversion_cache and self.inversion_model == "reference"
                and self.inversion_eta == 0.0)

    @property
    def uses_reference(self) -> bool:
        return get_objective(self.method).uses_reference

    @property
    def is_full_finetune(self) -> bool:
        return self.lora_rank == 0 and self.conditioning == "none"

    @property
    def is_lora(self) -> bool:
        return self.lora_rank > 0
