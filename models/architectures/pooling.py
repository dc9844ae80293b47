"""2-D max pooling whose window equals its stride, as maxima of strided slices.

Why: PyTorch's CPU ``max_pool2d`` computes an argmax index per output even when nobody asks
for it (``max_pool2d_with_indices``, also under ``inference_mode``), and was the largest
single cost of the LCNN: a third of its forward pass. Non-overlapping windows need no index:
the maximum of ``k`` strided views is the same value, bit for bit (a maximum rounds nothing),
in a tenth of the time (2x2 pooling of 8 x 8 x 200 x 40: 0.20 against 2.2 ms on one core).
``max_pool1d`` has no such cost (80 x 7975 by 3: 0.26 ms, strided slices 0.38 ms), so 1-D
pooling stays PyTorch's. Only what the LCNN uses is covered: window == stride, no padding,
no dilation, remainder dropped (``ceil_mode=False``).
"""

from __future__ import annotations

import torch
from torch import nn


def strided_max(x: torch.Tensor, kernel: int, dim: int) -> torch.Tensor:
    """Max over non-overlapping windows of ``kernel`` along ``dim`` (remainder dropped)."""
    n = x.shape[dim] // kernel * kernel
    if n == 0:
        raise ValueError(f"max pooling by {kernel} needs at least {kernel} values along "
                         f"dim {dim}, got {x.shape[dim]}")
    out = x.narrow(dim, 0, n)
    pooled = out.narrow(dim, 0, n - kernel + 1)[(slice(None),) * (dim % x.dim())
                                                 + (slice(None, None, kernel),)]
    for offset in range(1, kernel):
        part = out.narrow(dim, offset, n - offset)[(slice(None),) * (dim % x.dim())
                                                   + (slice(None, None, kernel),)]
        pooled = torch.maximum(pooled, part)
    return pooled


class StridedMaxPool2d(nn.Module):
    """``nn.MaxPool2d(kernel)`` (square, stride = kernel) on (batch, channels, h, w)."""

    def __init__(self, kernel: int) -> None:
        super().__init__()
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return strided_max(strided_max(x, self.kernel, -2), self.kernel, -1)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}"
