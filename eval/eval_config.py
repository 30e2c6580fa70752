"""The ``make eval-all`` config (:mod:`eval.eval_all`): the encoder rows, which pieces to run, and each piece's
protocol settings. Loaded with :func:`ov3common.config.parse_cli` (typed; unknown keys rejected by name);
``configs/eval/toy.yaml`` and ``configs/eval/real.yaml`` fill it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from eval.inception import DEFAULT_WEIGHTS
from ov3common.config import choice_field, path_field


@dataclass
class RowConfig:
    name: str = ""
    encoder: str = ""        # encoder export folder (config.json + model.safetensors)
    encoder_run: str = ""    # encoder trainer run dir (metrics.jsonl → curves)
    llava: str = ""          # LLaVA run dir (predictions or a model for llava.predictor)
    rae: str = ""            # RAE run dir (samples.npz or a model for gfid.sampler)


@dataclass
class FidConfig:
    weights: str = DEFAULT_WEIGHTS
    cache_dir: str = "runs/fid_cache"
    batch_size: int = 32
    kid_subsets: int = 20
    bootstrap: int = 200      # resamples of the FID interval over samples (0: no interval)
    fused: bool = True        # BN folded into the convolutions, channels_last (same features within 1e-5)
    precision: str = choice_field("fp32", ("fp32", "bf16"))  # bf16 shifts FID; measured by eval.bench_fid


@dataclass
class LpipsConfig:
    net: str = "alex"
    backbone: str = "auto"   # auto | pretrained | random | none (no LPIPS)
    backbone_path: str = ""


@dataclass
class BenchmarkConfig:
    """A benchmark file or folder (:mod:`eval.benchmarks` formats), required with the pieces that read it."""

    path: str = path_field("")
    image_root: str = ""
    split: str = "test"
    limit_per_category: int = 0


@dataclass
class PopeConfig(BenchmarkConfig):  # piece pope
    parser: str = "llava"


@dataclass
class SeedConfig(BenchmarkConfig):  # pieces seedbench*
    data_type: str = "image"


@dataclass
class LlavaConfig:
    predictor: str = "eval.adapters:llava_predictor"   # function(run_dir, device, batch_size, max_new_tokens)
    batch_size: int = 8
    max_new_tokens: int = 16
    ranker: str = "eval.adapters:llava_ranker"   # function(run_dir, device, batch_size): SeedBench answer ranking


@dataclass
class RfidConfig:
    images: str = path_field("", "dir")  # required with piece rfid
    max_images: int = 128     # the protocol's set size (0: every image of the folder)
    batch_size: int = 32
    allow_partial: bool = False   # score a folder with fewer images than max_images, marking the cell


@dataclass
class GfidConfig:
    real: str = path_field("data/toy/classes/val")   # class-split folder, folder or (ADM) npz
    real_per_class: int = 4
    per_class: int = 2
    batch_size: int = 32
    seed: int = 0
    steps: int = 0            # 0 = the RAE run's default
    cfg_scale: float = -1.0   # < 0 = the RAE run's default
    sampler: str = "eval.adapters:rae_sampler"   # function(run_dir, device, seed, steps, cfg_scale)
    regenerate: bool = True       # a found npz that breaks the protocol is regenerated when the run can sample
    allow_partial: bool = False   # else score it anyway, marking the cell (default: refuse)


@dataclass
class ToygenConfig:
    """The toy world's generation metrics (piece ``toygen``, :mod:`eval.toygen`): samples <rae>/samples/samples.npz,
    real images gfid.real (every image of the class split)."""
    classifier: str = "runs/toy/rae/pixel_classifier"   # make rae-classacc's pixel classifier (its pixel_dir)
    image_size: int = 64
    bootstrap: int = 200      # resamples of the toy FID's interval


@dataclass
class CompareConfig:
    allow_protocol_mismatch: bool = False   # compare rows whose sampling manifests differ in a protocol field



@dataclass
class EvalAllConfig:
    """Evaluate every available piece for every encoder row and write reports/summary.{json,md} + figures."""

    RENAMED = {"out": "out_dir"}
    out_dir: str = "reports"
    device: str = "auto"
    toy: bool = True
    rows: list[RowConfig] = field(default_factory=list)  # configs/eval/toy.yaml: the toy rows
    only: list[str] = field(default_factory=list)  # evaluate only these rows (name or slug) into <out>/<slug>/row.json
    reuse_rows: bool = True  # a full run takes a row from its row.json when inputs, settings and code are unchanged
    # only fill fid.cache_dir with the real sets' Inception features (gfid.real; the rfid originals at each row's
    # encoder size) and stop: make demo runs it early, so the row evaluations at its end skip those passes
    references_only: bool = False
    pieces: list[str] = field(default_factory=lambda: ["seedbench", "seedbench_blind", "seedbench_rank", "pope",
                                                       "gfid", "toygen", "rfid"])
    fid: FidConfig = field(default_factory=FidConfig)
    lpips: LpipsConfig = field(default_factory=LpipsConfig)
    pope: PopeConfig = field(default_factory=PopeConfig)
    seedbench: SeedConfig = field(default_factory=SeedConfig)
    llava: LlavaConfig = field(default_factory=LlavaConfig)
    rfid: RfidConfig = field(default_factory=RfidConfig)
    gfid: GfidConfig = field(default_factory=GfidConfig)
    toygen: ToygenConfig = field(default_factory=ToygenConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
