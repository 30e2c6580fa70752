"""CPU execution of the eval networks (FID Inception, LPIPS trunk): fused convolution + ReLU.

:class:`ConvReLU` holds a convolution (with bias) followed by a ReLU. On CPU in float32 it runs
``torch.ops.mkldnn._convolution_pointwise`` with the ReLU as a post-op and the weights reordered once into oneDNN's
blocked layout (what inductor's freezing does for a compiled model), instead of aten's convolution, which reorders
the weights on every call, plus a separate ReLU pass over the output. Elsewhere (CUDA, autocast, float64) it is
``relu(conv2d(x))``. Outputs are bitwise those of conv2d + ReLU on the same CPU (tested), at any batch size.
``forward(x, relu=False)`` gives the convolution alone; :meth:`ConvReLU.merged` makes one wider convolution of several
that read the same input.
The eval networks also run inside :func:`ov3common.heap.heap_reuse` (large activation blocks reused between batches).
"""

from __future__ import annotations

import torch


class ConvReLU(torch.nn.Module):
    """``relu(conv(x))`` of a ``Conv2d`` with bias (see the module docstring); weights copied, frozen."""

    def __init__(self, conv: torch.nn.Conv2d):
        super().__init__()
        if conv.bias is None:
            raise ValueError("ConvReLU needs a convolution with a bias (fold the batch norm first)")
        self.weight = torch.nn.Parameter(conv.weight.detach().clone(), requires_grad=False)
        self.bias = torch.nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self.padding, self.stride = list(conv.padding), list(conv.stride)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"ConvReLU: zero padding given as numbers only, got {conv.padding_mode} {conv.padding}")
        self._packed: torch.Tensor | None = None

    def pack(self, input_size: list[int]) -> None:
        """Reorder the weights for oneDNN once, for inputs of ``input_size`` (N, C, H, W; any size runs after)."""
        w = self.weight.detach().contiguous(memory_format=torch.channels_last)
        self._packed = torch.ops.mkldnn._reorder_convolution_weight(w, self.padding, self.stride, self.dilation,
                                                                    self.groups, input_size)

    def _apply(self, fn, recurse=True):  # .to(device) / .float(): a packed copy would be stale
        self._packed = None
        return super()._apply(fn, recurse)

    @classmethod
    def merged(cls, parts: list[ConvReLU]) -> ConvReLU:
        """One ConvReLU computing ``parts`` (same input, same geometry) at once: their output channels concatenated
        in order (one wider convolution instead of several narrow ones over the same input)."""
        first = parts[0]
        geometry = [(p.weight.shape[1:], p.padding, p.stride, p.dilation, p.groups) for p in parts]
        if any(g != geometry[0] for g in geometry) or first.groups != 1:
            raise ValueError(f"ConvReLU.merged: the parts differ in input or geometry: {geometry}")
        weight = torch.cat([p.weight.detach() for p in parts])
        conv = torch.nn.Conv2d(weight.shape[1], weight.shape[0], tuple(weight.shape[2:]), first.stride, first.padding,
                               first.dilation, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(weight)
            conv.bias.copy_(torch.cat([p.bias.detach() for p in parts]))
        return cls(conv)

    def forward(self, x: torch.Tensor, relu: bool = True) -> torch.Tensor:
        """``relu(conv(x))``; ``relu=False``: ``conv(x)`` alone (the same packed weights)."""
        if (x.device.type == "cpu" and x.dtype == torch.float32 and self.weight.dtype == torch.float32
                and torch.backends.mkldnn.is_available() and not torch.is_autocast_enabled("cpu")):
            if self._packed is None:
                self.pack(list(x.shape))
            return torch.ops.mkldnn._convolution_pointwise(x, self._packed, self.bias, self.padding, self.stride,
                                                           self.dilation, self.groups, "relu" if relu else "none",
                                                           [], "")
        y = torch.nn.functional.conv2d(x, self.weight.to(x.dtype), self.bias.to(x.dtype), self.stride, self.padding,
                                       self.dilation, self.groups)
        return torch.relu_(y) if relu else y


def fuse_sequential(seq: torch.nn.Sequential) -> torch.nn.Sequential:
    """A copy of ``seq`` with each ``Conv2d`` directly followed by a ``ReLU`` replaced by one :class:`ConvReLU`."""
    mods, out, i = list(seq), [], 0
    while i < len(mods):
        m = mods[i]
        if (isinstance(m, torch.nn.Conv2d) and m.bias is not None and i + 1 < len(mods)
                and isinstance(mods[i + 1], torch.nn.ReLU)):
            out.append(ConvReLU(m))
            i += 2
        else:
            out.append(m)
            i += 1
    return torch.nn.Sequential(*out)
