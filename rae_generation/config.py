"""Typed configs of the RAE modules (``configs/rae/*.yaml`` override these defaults; see ov3common.config)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ov3common.attention import ATTN_IMPLS
from ov3common.config import choice_field, path_field
from ov3common.linear import cpu_linear_field


@dataclass
class CacheConfig:
    """``python -m rae_generation.cache_latents``: encode a class-labelled image source into token shards."""

    RENAMED = {"out": "out_dir"}

    source: str = path_field("", "exists", required=True)  # ImageFolder dir, dir of .tar shards, or a .tar
    encoder: str = path_field("", "dir", required=True)
    out_dir: str = "runs/toy/rae/latents/train"
    image_size: int = 64
    batch_size: int = 64
    num_workers: int = 2
    shard_size: int = 8192  # samples per safetensors shard
    dtype: str = "float32"  # float32 | bfloat16 | float16 (storage dtype of the tokens)
    device: str = "auto"
    overwrite: bool = False
    limit: int = 0  # > 0: only the first `limit` samples (smoke runs)
    flip: bool = False  # also cache the tokens of each image mirrored left-right (RAE trains with random flips)


@dataclass
class ModelConfig:
    size: str = "toy"  # a key of rae_generation.models.DIT_SIZES
    width: int = 0  # 0 = the size's default (likewise below)
    depth: int = 0
    heads: int = 0
    head_width: int = 0
    head_depth: int = -1  # -1 = the size's default (0 = no head)
    head_heads: int = 0
    class_dropout: float = 0.1
    class_embed_std: float = 0.02  # DiT's init; the toy config uses more (conditioning is learned sooner)
    rope: bool = True
    pos_embed: bool = True
    qk_norm: bool = False
    grad_ckpt: bool = False
    attn: str = choice_field("sdpa", ATTN_IMPLS)  # sdpa | flash (flash-attn; CUDA bf16)


@dataclass
class DataConfig:
    latents: str = path_field("", "dir")  # a latent cache (make cache-rae-latents); empty = encode on the fly
    images: str = path_field("", "exists")  # on the fly: ImageFolder / shard dir
    encoder: str = path_field("", "dir")  # on the fly, and to decode previews; default = the cache's encoder
    image_size: int = 64
    norm: str = "position"  # position (RAE) | channel | none
    norm_eps: float = 1e-5
    stats_samples: int = 4096  # on the fly: images used once for the normalisation statistics
    num_workers: int = 0
    flip: bool = False  # random horizontal flip, p = 0.5 per sample and epoch (RAE); a cache needs `flip: true`


@dataclass
class FlowConfig:
    t_dist: str = "logit_normal"  # logit_normal | uniform (RAE's released configs use uniform)
    t_mean: float = 0.0
    t_std: float = 1.0
    shift: float = 0.0  # 0 = sqrt(N_tokens * C / shift_base)
    shift_base: float = 4096.0


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 256  # global (split over ranks)
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warmup from 0 (RAE's configs: none, `warmup_from_zero: false`)
    min_lr_ratio: float = 1.0  # the LR's floor, x lr (cosine: reached at the end; linear: at decay_end_step)
    # cosine: warmup, then cosine to lr * min_lr_ratio; linear (RAE): lr until constant_steps, then linear decay
    # to lr * min_lr_ratio at decay_end_step, constant after
    schedule: str = choice_field("cosine", ("cosine", "linear"))
    constant_steps: int = 0  # linear: the LR stays at lr until here (RAE: 40 epochs)
    decay_end_step: int = 0  # linear: lr * min_lr_ratio from here on (RAE: 800 epochs)
    grad_clip: float = 1.0
    ema_decay: float = 0.9995
    ema_warmup: bool = False  # decay min(ema_decay, (1 + step) / (10 + step)) early on
    precision: str = choice_field("fp32", ("fp32", "bf16"))  # bf16: autocast, fp32 master weights
    compile: bool = False  # torch.compile (inductor) the DiT-DH (CPU and GPU)
    log_every: int = 20
    tensorboard: bool = False  # also write the metrics as TensorBoard scalars to <out_dir>/tb
    ckpt_every: int = 500  # steps between checkpoints (and the last step); <= 0: the last step only
    keep_last: int = 2
    preview: bool = True  # a PNG grid of EMA samples at the end (needs an encoder)
    max_bad_steps: int = 5  # consecutive NaN/Inf steps that stop the run
    strategy: str = choice_field("ddp", ("ddp", "none"))
    device: str = "auto"
    threads: int = 0  # CPU threads per process (torch.set_num_threads); 0 = torch's default
    cpu_linear: str = cpu_linear_field()  # CPU fp32 nn.Linear: ov3common.linear (auto | onednn | aten)
    inject_nan_steps: list[int] = field(default_factory=list)  # tests only: a NaN loss at these (1-based) steps
    log_indices: bool = False  # tests only: write each step's sample indices to indices_rank<r>.jsonl


@dataclass
class GuidanceConfig:
    steps: int = 50
    method: str = "euler"  # euler | heun
    cfg_scale: float = 1.0
    interval: list[float] = field(default_factory=lambda: [0.0, 1.0])  # guidance only for t in [lo, hi]


@dataclass
class InTrainEvalConfig:
    """gFID of K samples of the live EMA model every ``every`` steps (eval.intraining; = the offline number)."""

    every: int = 0  # 0: off
    # the evaluator, by name (rae_generation imports nothing of eval): class(cfg.eval, ema, norm, shift, data,
    # cfg.sample, device), called with no argument -> {"eval/...": number}
    hook: str = "eval.intraining:RAEInTrainEval"
    real: str = path_field("", "exists")  # class-split folder, folder or npz of real images
    weights: str = path_field("", "file")  # FID Inception weights; "": make fid-weights' file
    per_class: int = 2  # K = per_class x classes
    seed: int = 0
    steps: int = 0  # 0: sample.steps
    cfg_scale: float = -1.0  # < 0: sample.cfg_scale
    batch_size: int = 32
    cache_dir: str = ""  # real-set statistics cache ("" = none)


@dataclass
class RAETrainConfig:
    """``python -m rae_generation.train``: DiT-DH flow matching on encoder tokens."""

    RENAMED = {"out": "out_dir", "train.dist": "train.strategy", "train.record_indices": "train.log_indices",
               "train.bf16": "train.precision", "train.max_grad_norm": "train.grad_clip"}
    out_dir: str = "runs/toy/rae"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: GuidanceConfig = field(default_factory=GuidanceConfig)
    eval: InTrainEvalConfig = field(default_factory=InTrainEvalConfig)


@dataclass
class SampleConfig:
    """``python -m rae_generation.sample``: class-conditional samples → ADM npz + labelled PNG grid."""

    run: str = path_field("", "dir", required=True)
    checkpoint: str = "latest"  # latest | a step folder name | a path
    weights: str = "ema"  # ema | model
    encoder: str = path_field("", "dir")  # default: the encoder recorded by the run
    per_class: int = 8
    classes: list[int] = field(default_factory=list)  # empty = all
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    guide_run: str = path_field("", "dir")  # AutoGuidance: the weaker model's run (may equal `run`)
    guide_checkpoint: str = "latest"  # e.g. an early step folder of the same run
    guide_weights: str = "ema"
    batch_size: int = 64
    seed: int = 0
    device: str = "auto"
    out: str = ""  # default: <run>/samples/samples.npz (+ grid.png beside it)
    save_tokens: bool = False  # also <stem>_tokens.safetensors (generated tokens, for the token classifier)
    grid_columns: int = 8  # samples per class shown in the grid
    grid_max_classes: int = 64
