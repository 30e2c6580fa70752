"""Logging: rank-aware loggers, tqdm progress on rank 0, metrics to JSONL (+ TensorBoard), throughput and MFU."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

__all__ = ["get_logger", "MetricLogger", "progress", "TrainProgress", "Throughput", "measure_matmul_peak", "matmul_rate",
           "count_flops", "read_jsonl"]


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


class _StderrHandler(logging.StreamHandler):
    """A StreamHandler on the *current* ``sys.stderr`` (tools and test capture replace it after a logger is made)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def get_logger(name: str) -> logging.Logger:
    """A logger that prints INFO on rank 0 and only WARNING+ on other ranks, prefixed with the rank."""
    logger = logging.getLogger(name)
    if not logger.handlers:
        h = _StderrHandler()
        rank = _rank()
        prefix = f"[rank {rank}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        h.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(h)
        logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
        logger.propagate = False
    return logger


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str = "", initial: int = 0, **kw):
    """tqdm on rank 0, silent elsewhere (and when OV3_NO_PROGRESS=1)."""
    disable = _rank() != 0 or os.environ.get("OV3_NO_PROGRESS") == "1"
    if not sys.stderr.isatty():
        kw.setdefault("mininterval", 30.0)  # a log file gets a line every 30 s, not one per update
    return tqdm(iterable, total=total, desc=desc, initial=initial, disable=disable, dynamic_ncols=True, **kw)


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d " if d else "") + f"{h}:{m:02d}:{s:02d}"


class TrainProgress:
    """The progress of a training loop, on rank 0 (the one home for every trainer): step / total, loss, samples/s
    and ETA. On a terminal a tqdm bar (updated every step); otherwise (a log file) one line every ``log_every``
    steps through ``logger``. Samples/s and the ETA come from the steps since the previous line (or the last
    ``window`` steps on a terminal), so a resumed run's ETA is right from its first line.

    ``update(n_samples)`` after every step; ``update(n, loss=..., info="...")`` on the steps that have a loss
    (the trainer decides when a loss is worth a device sync)."""

    def __init__(self, total: int, initial: int = 0, desc: str = "train", log_every: int = 10,
                 logger: logging.Logger | None = None, enabled: bool | None = None, tty: bool | None = None):
        self.total, self.step, self.desc, self.log_every = int(total), int(initial), desc, max(1, int(log_every))
        self.enabled = (_rank() == 0 and os.environ.get("OV3_NO_PROGRESS") != "1") if enabled is None else enabled
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.log = logger or get_logger("progress")
        self._t, self._n, self._steps = time.perf_counter(), 0, 0
        self.samples_per_s = self.steps_per_s = float("nan")
        self.loss: float | None = None
        self._bar = (tqdm(total=self.total, initial=self.step, desc=desc, dynamic_ncols=True)
                     if self.enabled and self.tty else None)

    @property
    def eta_s(self) -> float:
        left = self.total - self.step
        return left / self.steps_per_s if self.steps_per_s > 0 else float("nan")

    def line(self) -> str:
        loss = f" | loss {self.loss:.4f}" if self.loss is not None else ""
        return (f"{self.desc} {self.step}/{self.total} ({100 * self.step / max(self.total, 1):.1f}%){loss} | "
                f"{self.samples_per_s:.1f} samples/s | ETA {_hms(self.eta_s)}")

    def update(self, n_samples: int = 0, loss: float | None = None, info: str = "") -> None:
        self.step += 1
        self._n += n_samples
        self._steps += 1
        if loss is not None:
            self.loss = float(loss)
        now = time.perf_counter()
        due = self.step % self.log_every == 0 or self.step == self.total
        if self._bar is not None or due:  # the rates are measured with the display off too (metrics.jsonl has them)
            dt = max(now - self._t, 1e-9)
            self.samples_per_s, self.steps_per_s = self._n / dt, self._steps / dt
        if self._bar is not None:
            self._bar.update(1)
            if due:
                self._bar.set_postfix_str((f"loss {self.loss:.4f} " if self.loss is not None else "")
                                          + f"{self.samples_per_s:.1f} samples/s")
        elif due and self.enabled:
            self.log.info("%s%s", self.line(), f" | {info}" if info else "")
        if due:
            self._t, self._n, self._steps = now, 0, 0

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.detach().float().item() if v.numel() == 1 else v.detach().float().tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricLogger:
    """Appends one JSON object per ``log`` call to ``<out_dir>/metrics.jsonl`` (rank 0 only); TensorBoard optional."""

    def __init__(self, out_dir: str | os.PathLike, tensorboard: bool = False, enabled: bool | None = None):
        self.enabled = (_rank() == 0) if enabled is None else enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._tb = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                get_logger(__name__).warning("tensorboard is not installed: metrics go to %s only", self.path)
            else:
                self._tb = SummaryWriter(str(Path(out_dir) / "tb"))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "time": round(time.time(), 3)}
        row.update({k: _jsonable(v) for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if isinstance(v, int | float) and k not in ("step", "time"):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows of a metrics.jsonl; a torn last line (a crash mid-write) is ignored."""
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


class Throughput:
    """Samples/s and model FLOPs utilisation over a sliding window of updates."""

    def __init__(self, flops_per_sample: float | None = None, peak_flops: float | None = None, window: int = 20):
        self.flops_per_sample = flops_per_sample
        self.peak_flops = peak_flops
        self.window = window
        self._hist: list[tuple[int, float]] = []

    def update(self, n_samples: int, seconds: float) -> dict[str, float]:
        self._hist = (self._hist + [(n_samples, seconds)])[-self.window :]
        n = sum(h[0] for h in self._hist)
        s = max(sum(h[1] for h in self._hist), 1e-9)
        out = {"samples_per_s": n / s}
        if self.flops_per_sample:
            out["tflops"] = n * self.flops_per_sample / s / 1e12
            if self.peak_flops:
                out["mfu"] = n * self.flops_per_sample / s / self.peak_flops
        return out


def matmul_rate(n: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                seconds: float = 0.25, onednn: bool = False) -> float:
    """Achieved FLOP/s of an ``n × n`` by ``n × n`` matmul (into a preallocated output) over about ``seconds``;
    ``onednn``: oneDNN's float32 matmul (``mkldnn::_linear_pointwise``, what :mod:`ov3common.linear` runs) instead
    of ``torch.mm``."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    if onednn:
        def mm(a, b, out):  # noqa: ARG001 - same call shape as torch.mm; oneDNN allocates its output
            return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    else:
        mm = torch.mm

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):
        mm(a, b, out=out)
    sync()
    iters, t0 = 0, time.perf_counter()
    while True:
        mm(a, b, out=out)
        iters += 1
        sync()
        dt = time.perf_counter() - t0
        if dt >= seconds and iters >= 3:
            return 2 * n**3 * iters / dt


def measure_matmul_peak(dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu", n: int | None = None,
                        seconds: float = 1.0) -> float:
    """The practical peak MFU is measured against: the best FLOP/s of square matmuls over a sweep of sizes
    (CPU 256-2048, GPU 2048-8192; ``n`` = one size only). A sweep, not one size: on the development CPU a
    2048² fp32 matmul reaches only ~2/3 of the rate of 256²-1536² ones (MKL switches blocking), and a peak
    that is too low would inflate MFU. On a CPU in float32 both torch.mm and oneDNN's matmul are swept (on the AMD
    EPYC VM of 2026-12-07 oneDNN ran ~2x MKL's rate) and the better counts."""
    device = torch.device(device)
    sizes = [n] if n else ([2048, 4096, 8192] if device.type == "cuda" else [256, 512, 1024, 1536, 2048])
    # CPU float32: torch.mm (MKL) and oneDNN (ov3common.linear's products), the better of the two
    libs = [False, True] if (device.type == "cpu" and dtype == torch.float32
                             and torch.backends.mkldnn.is_available()) else [False]
    return max(matmul_rate(s, dtype, device, seconds / len(sizes) / len(libs), onednn=lib)
               for s in sizes for lib in libs)


def _addmm_flops(self_shape, a_shape, b_shape, *args, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def _linear_pointwise_flops(x_shape, w_shape, *args, **kwargs) -> int:
    """``x [.., K]`` times ``w [N, K]ᵀ``."""
    return 2 * math.prod(x_shape) * w_shape[0]


def _sdpa_cpu_flops(q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    """``q kᵀ`` and ``p v`` of ``[B, H, N, D]`` attention (torch's formula for the GPU kernels)."""
    b, h, n, d = q_shape
    return 2 * b * h * n * k_shape[-2] * (d + v_shape[-1])


def _sdpa_cpu_backward_flops(grad_out_shape, q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    """The four gradient products (dV, dP, dQ, dK): twice the forward. Model FLOPs: the kernel's recomputation of
    the scores is not counted (torch's formula for the GPU kernels counts it: five products)."""
    return 2 * _sdpa_cpu_flops(q_shape, k_shape, v_shape)


def count_flops(fn: Callable, *args, **kwargs) -> int:
    """Total FLOPs of one call (forward, and backward if ``fn`` runs it), counted by torch's FlopCounterMode."""

    # In-place ``addmm_`` (the fused residual GEMM of ``encoder.models.residual_linear``) is absent from torch's
    # registry; it costs what ``addmm`` costs.
    # ov3common.linear's oneDNN products likewise: mkldnn::_linear_pointwise (x [.., K] times w [N, K]^T) in eager
    # code, the custom op ov3::onednn_mm around it in compiled graphs (the mode sees the outer op only).
    # SDPA's CPU kernel is absent too (it would count 0: attention done by SDPA on a CPU would look free next to
    # attention done by bmm); counted as model FLOPs, forward 2 and backward 4 products.
    mapping = {torch.ops.aten.addmm_: _addmm_flops,
               torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
               torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops}
    if hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        mapping[torch.ops.mkldnn._linear_pointwise] = _linear_pointwise_flops
    if hasattr(torch.ops.ov3, "onednn_mm"):  # registered once ov3common.linear is imported
        mapping[torch.ops.ov3.onednn_mm] = _linear_pointwise_flops
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())
