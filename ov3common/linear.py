"""fp32 linear layers on a CPU through oneDNN instead of the BLAS behind ``torch.mm``.

On a CPU, ``nn.Linear`` in float32 runs ``addmm`` / ``mm`` on MKL (the pip wheels' BLAS). On some CPUs oneDNN's
float32 matrix multiply (what ``torch.ops.mkldnn._linear_pointwise`` runs; the library torch already uses for
convolutions) is much faster: on the AMD EPYC development VM of 2026-12-07 MKL ran these products at ~170-220
GFLOP/s and oneDNN at ~300-490 (512 x 2048 x 12288: forward 191 vs 459, input gradient 203 vs 396, weight gradient 167
vs 300), so a DiT-DH-S training step took ~0.5x the time. Where MKL is at its best (Intel CPUs) the two are closer.

:class:`OneDNNLinear` is ``nn.Linear`` with its three products (forward, input gradient, weight gradient) on oneDNN,
all in float32 (IEEE; no reduced-precision math mode): the same function, float32 round-off apart (~1e-6 relative,
as between any two GEMM libraries; tested against float64). It applies only where it can: a CPU tensor, float32
weights and inputs, no CPU autocast (bf16 goes through torch's own oneDNN path), plain (non-DTensor) parameters;
elsewhere it is ``F.linear``. Inside ``torch.compile`` the products are a torch custom op (:func:`onednn_mm`), so
a compiled model keeps them (inductor treats the op as one kernel call and fuses what is around it; with
``F.linear`` it would lower to MKL's GEMM: the compiled S/2 fp32 step took 1.8x the eager one's time on the AMD VM
before this); eager calls go through an ``autograd.Function`` with the same products (less dispatch cost). :func:`use_onednn_linear` turns a model's ``nn.Linear`` modules into it in place (parameters,
``state_dict`` names and optimizer state unchanged): ``mode`` ``"onednn"``, ``"aten"`` (leave the model alone) or
``"auto"`` (measure both once per process on a 512 x 1024 x 1024 forward + backward and take oneDNN where it is at
least 5 % faster).
"""

from __future__ import annotations

import functools
import logging
import time

import torch
import torch.nn.functional as F
from torch import nn

from ov3common.config import choice_field

MODES = ("auto", "onednn", "aten")
_HAS_ONEDNN = torch.backends.mkldnn.is_available()  # a constant (dynamo does not trace torch.backends calls)
_log = logging.getLogger("ov3common.linear")


def _mm(a: torch.Tensor, b_t: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b_t.T (+ bias)`` on oneDNN in float32: ``a`` 2-D (copied if not contiguous: oneDNN reads it by rows),
    ``b_t`` 2-D with any strides (a transposed view is read in place)."""
    return torch.ops.mkldnn._linear_pointwise(a.contiguous(), b_t, bias, "none", [], "")


def _grads(mm, needs: tuple[bool, ...], a: torch.Tensor, b_t: torch.Tensor, has_bias: bool, g: torch.Tensor):
    """Gradients of ``mm(a, b_t, bias)`` w.r.t. the inputs that need one, each product through ``mm``."""
    ga = gb_t = gbias = None
    if needs[0]:
        ga = mm(g, b_t.t())
    if needs[1]:
        gb_t = mm(g.t(), a.t())  # the transposed gradient is copied into rows
    if has_bias and needs[2]:
        gbias = g.sum(0)
    return ga, gb_t, gbias


class _OneDNNMatmul(torch.autograd.Function):
    """The eager path (a custom op's dispatch cost ~1 % more per B/2 training step, measured)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        a = a.contiguous()
        ctx.save_for_backward(a, b_t)
        ctx.has_bias = bias is not None
        return _mm(a, b_t, bias)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        a, b_t = ctx.saved_tensors
        return _grads(_mm, ctx.needs_input_grad, a, b_t, ctx.has_bias, g)


@torch.library.custom_op("ov3::onednn_mm", mutates_args=())
def onednn_mm(a: torch.Tensor, b_t: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`_mm` as a torch custom op, the path inside ``torch.compile``: the compiled graph keeps it as one
    opaque kernel call (inductor fuses what is around it; given ``F.linear`` it would lower to MKL's GEMM)."""
    return _mm(a, b_t, bias)


@onednn_mm.register_fake
def _(a, b_t, bias=None):
    return a.new_empty(a.shape[0], b_t.shape[0])


def _setup(ctx, inputs, output):
    a, b_t, bias = inputs
    ctx.save_for_backward(a, b_t)
    ctx.has_bias = bias is not None


def _backward(ctx, g):
    a, b_t = ctx.saved_tensors
    return _grads(onednn_mm, ctx.needs_input_grad, a, b_t, ctx.has_bias, g)


onednn_mm.register_autograd(_backward, setup_context=_setup)


def onednn_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and type(weight) in (nn.Parameter, torch.Tensor) and weight.is_contiguous()
            and _HAS_ONEDNN and not torch.is_autocast_enabled("cpu"))


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    y = onednn_mm(x2, weight, bias) if torch.compiler.is_compiling() else _OneDNNMatmul.apply(x2, weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with the products on oneDNN where :func:`onednn_applies`, else ``F.linear`` itself."""
    if onednn_applies(x, weight):
        return _onednn_linear(x, weight, bias)
    return F.linear(x, weight, bias)


class OneDNNLinear(nn.Linear):
    """``nn.Linear`` whose float32 CPU products run on oneDNN (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def _fwd_bwd_seconds(fn, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, g: torch.Tensor) -> float:
    t = time.perf_counter()
    torch.autograd.grad(fn(x, w, b), (x, w, b), g)
    return time.perf_counter() - t


@functools.cache
def onednn_speedup(threads: int) -> float:
    """aten time / oneDNN time of a float32 512 x 1024 x 1024 linear, forward + backward, best of 3 interleaved
    rounds after a warm-up (once per process and thread count; ~0.1-0.3 s)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 1024, generator=gen, requires_grad=True)
    w = torch.randn(1024, 1024, generator=gen, requires_grad=True)
    b = torch.zeros(1024, requires_grad=True)
    g = torch.randn(512, 1024, generator=gen)
    fns = (F.linear, _onednn_linear)
    best = [float("inf")] * 2
    for _ in range(4):
        for i, fn in enumerate(fns):
            best[i] = min(best[i], _fwd_bwd_seconds(fn, x, w, b, g))
    return best[0] / best[1]


def cpu_linear_field():
    """The ``cpu_linear`` config field of the trainers and benches (``auto`` by default; see the module docstring)."""
    return choice_field("auto", MODES)


def uses_onednn_linear(model: nn.Module) -> bool:
    return any(isinstance(m, OneDNNLinear) for m in model.modules())


def use_onednn_linear(model: nn.Module, mode: str = "auto") -> int:
    """Turn ``model``'s ``nn.Linear`` modules into :class:`OneDNNLinear` in place (``mode``: auto | onednn | aten,
    see the module docstring); returns how many. A model with no parameter on a CPU is left alone (nothing to gain,
    no probe). Call it before ``compile`` / DDP / FSDP2."""
    if mode not in MODES:
        raise ValueError(f"cpu_linear: one of {MODES}, got {mode!r}")
    if (mode == "aten" or not torch.backends.mkldnn.is_available()
            or not any(p.device.type == "cpu" for p in model.parameters())):
        return 0
    if mode == "auto":
        s = onednn_speedup(torch.get_num_threads())
        if s < 1.05:
            _log.info("cpu_linear=auto: oneDNN linear %.2fx aten's on this CPU: keeping aten", s)
            return 0
        _log.info("cpu_linear=auto: oneDNN linear %.2fx aten's on this CPU: using it", s)
    n = 0
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = OneDNNLinear
            n += 1
    return n
