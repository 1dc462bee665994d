"""KFAC input statistics of convolutions without forming every patch (no factor maths elsewhere).

A Conv2d with kernel (k_h, k_w), stride s, dilation d and zero padding sees, at output position
r, the patch a_{n,r}[(c, i, j)] = x_pad[n, c, s_h r_h + d_h i, s_w r_w + d_w j] (D_in = C·k_h·k_w,
the weight's row-major order). KFAC needs (Eschenhagen et al., NeurIPS 2023)

- expand: Σ_{n,r} a aᵀ, a (C·k_h·k_w)² Gram matrix over N·R patches — N·R·D_in² products when the
  patches are unfolded (:func:`direct_patch_gram`);
- reduce: Σ_r a per input (N, D_in) — sums of strided windows of x, no unfold
  (:func:`conv_patch_sums`).

**Channel covariances per kernel offset** (stride 1, :func:`correlated_patch_gram`). The block
of kernel offsets (i, j), (i', j') is a channel covariance at the relative offset
Δ = (d_h (i' − i), d_w (j' − j)):

    A[(c,i,j), (c',i',j')] = Σ_n Σ_{u ∈ U(i') × U(j')} x[n, c, u − Δ] x[n, c', u],

with U(i') the image rows that offset i' reads (the output grid shifted by d_h i', cut to the
image: padding is zero). Only (2k_h − 1)(2k_w − 1) offsets Δ exist, against (k_h k_w)² offset
pairs, and for each one the sum runs over the whole image at once: the rows are cut into the
elementary intervals that the U(i') are unions of (a core shared by all offsets and thin edges),
and per pair of intervals one convolution weight-gradient (``torch.nn.grad.conv2d_weight``, x as
"input", the crop of x as "output gradient", dilation d) gives the covariances at every Δ. Cost
N·C²·(2k_h − 1)(2k_w − 1)·H·W against N·(k_h k_w)²·C²·H_out·W_out: about 3× fewer products for
3×3 kernels on 32×32 images; it is used where the count says so (:func:`patch_gram`).
Exactness is tested against the unfolded Gram in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from marglik.curvature.kfac import gram

#: numbers an unfolded chunk of patches may hold (chunks over samples)
MAX_CHUNK = 2**24


def explicit_padding(
    padding: str | tuple[int, int], kernel: tuple[int, int], dilation: tuple[int, int]
) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) zero padding of a Conv2d (``"same"`` as torch pads it)."""
    if not isinstance(padding, str):
        return padding[0], padding[0], padding[1], padding[1]
    pads = []
    for k, d in zip(kernel, dilation):
        total = 0 if padding == "valid" else d * (k - 1)
        pads += [total // 2, total - total // 2]
    return pads[0], pads[1], pads[2], pads[3]


def output_size(size: int, k: int, s: int, d: int, pad: int) -> int:
    """Output length of a convolution along one dimension (padding ``pad`` in total)."""
    return (size + pad - d * (k - 1) - 1) // s + 1


def unfold(x: Tensor, kernel, stride, dilation, pads) -> Tensor:
    """Patches (N, D_in, R) of x (N, C, H, W) with explicit (top, bottom, left, right) pads;
    ``F.unfold``'s layout, from one strided slice per kernel offset (``F.unfold`` loops over
    samples on CPU)."""
    P = patch_rows(x, kernel, stride, dilation, pads, batch_first=True)
    return P.reshape(x.shape[0], -1, P.shape[-2] * P.shape[-1])


def patch_rows(x: Tensor, kernel, stride, dilation, pads, rows=None, cols=None,
               batch_first: bool = False) -> Tensor:
    """Patch entries of x at kernel rows ``rows`` × columns ``cols`` (default: all).

    Returns (C, O, N, H_out, W_out), O = len(rows)·len(cols) offsets, or (N, C, O, H_out,
    W_out) with ``batch_first``: one copy of the k_h·k_w strided slices.
    """
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    xp = F.pad(x, (pads[2], pads[3], pads[0], pads[1]))
    h_out = output_size(x.shape[2], kh, sh, dh, pads[0] + pads[1])
    w_out = output_size(x.shape[3], kw, sw, dw, pads[2] + pads[3])
    if not batch_first:
        xp = xp.transpose(0, 1)
    slices = [
        xp[:, :, dh * i : dh * i + sh * (h_out - 1) + 1 : sh,
           dw * j : dw * j + sw * (w_out - 1) + 1 : sw]
        for i in (range(kh) if rows is None else rows)
        for j in (range(kw) if cols is None else cols)
    ]  # one slice per kernel offset (not per sample)
    return torch.stack(slices, 2 if batch_first else 1)


def direct_patch_gram(x: Tensor, kernel, stride, dilation, pads, rows=None, cols=None
                      ) -> Tensor:
    """Σ_{n,r} a aᵀ from the patches, in chunks of samples: (D_in, D_in), or with ``rows`` /
    ``cols`` the block of the entries at those kernel rows × columns (C·|rows|·|cols|)²."""
    N, C = x.shape[:2]
    n_off = (kernel[0] if rows is None else len(rows)) * (kernel[1] if cols is None else len(cols))
    R = output_size(x.shape[2], kernel[0], stride[0], dilation[0], pads[0] + pads[1]) * (
        output_size(x.shape[3], kernel[1], stride[1], dilation[1], pads[2] + pads[3])
    )
    size = C * n_off
    chunk = max(1, MAX_CHUNK // max(1, size * R))
    A = x.new_zeros(size, size)
    for start in range(0, N, chunk):  # chunks of samples bound the memory, not a loop per sample
        P = patch_rows(x[start : start + chunk], kernel, stride, dilation, pads, rows, cols)
        A += gram(P.reshape(size, -1).T)
    return A


def _extended_grid(shape, kernel, dilation, pads) -> tuple[int, int, int, int, int, int]:
    """The extended output grid (padding d(k − 1) on every side, stride 1) of an H × W input:
    (h_ext, w_ext, top, bottom, left, right) with the layer's own grid at rows [top, bottom) and
    columns [left, right) of it (own positions outside it read only padding: zero patches)."""
    H, W = shape[-2:]
    (kh, kw), (dh, dw) = kernel, dilation
    ph, pw = dh * (kh - 1), dw * (kw - 1)
    h_out = output_size(H, kh, 1, dh, pads[0] + pads[1])
    w_out = output_size(W, kw, 1, dw, pads[2] + pads[3])
    top, left = max(0, ph - pads[0]), max(0, pw - pads[2])
    bottom = max(top, min(H + ph, ph - pads[0] + h_out))
    right = max(left, min(W + pw, pw - pads[2] + w_out))
    return H + ph, W + pw, top, bottom, left, right


def _ring(shape, kernel, dilation, pads) -> list[tuple[int, int, int, int, list, list]]:
    """The strips of the extended grid around the layer's own grid: (r0, r1, c0, c1) (rows
    [r0, r1), columns [c0, c1)) with the kernel rows and columns whose taps reach the image
    there (the other entries of those patches read only padding: zero)."""
    H, W = shape[-2:]
    (kh, kw), (dh, dw) = kernel, dilation
    ph, pw = dh * (kh - 1), dw * (kw - 1)
    h_ext, w_ext, top, bottom, left, right = _extended_grid(shape, kernel, dilation, pads)
    strips = []
    for r0, r1, c0, c1 in ((0, top, 0, w_ext), (bottom, h_ext, 0, w_ext),
                           (top, bottom, 0, left), (top, bottom, right, w_ext)):
        rows = [i for i in range(kh) if r0 - ph + dh * i <= H - 1 and r1 - 1 - ph + dh * i >= 0]
        cols = [j for j in range(kw) if c0 - pw + dw * j <= W - 1 and c1 - 1 - pw + dw * j >= 0]
        if r1 > r0 and c1 > c0 and rows and cols:
            strips.append((r0, r1, c0, c1, rows, cols))
    return strips


def _ring_gram(x: Tensor, kernel, dilation, pads) -> Tensor:
    """Σ a aᵀ over the patches of the extended grid that lie outside the layer's own grid:
    per strip, the Gram of the patch entries that can be non-zero (:func:`_ring`)."""
    C = x.shape[1]
    (kh, kw), (dh, dw) = kernel, dilation
    ph, pw = dh * (kh - 1), dw * (kw - 1)
    xe = F.pad(x, (pw, pw, ph, ph))
    A = x.new_zeros(C * kh * kw, C * kh * kw)
    for r0, r1, c0, c1, rows, cols in _ring(x.shape, kernel, dilation, pads):
        offsets = torch.tensor([i * kw + j for i in rows for j in cols], device=x.device)
        keep = (torch.arange(C, device=x.device)[:, None] * (kh * kw) + offsets).reshape(-1)
        block = direct_patch_gram(xe[:, :, r0 : r1 + ph, c0 : c1 + pw], kernel, (1, 1),
                                  dilation, (0, 0, 0, 0), rows, cols)
        A.index_put_((keep[:, None], keep[None, :]), block, accumulate=True)
    return A


def correlated_patch_gram(x: Tensor, kernel, dilation, pads) -> Tensor:
    """Σ_{n,r} a aᵀ for a stride-1 convolution from channel covariances per kernel offset.

    See the module docstring. Args as :func:`direct_patch_gram` (stride 1).
    """
    C = x.shape[1]
    (kh, kw), (dh, dw) = kernel, dilation
    ph, pw = dh * (kh - 1), dw * (kw - 1)
    window = F.pad(x, (pw, pw, ph, ph))
    # cov[c', c, m_h, m_w] = Σ_n Σ_u x[n, c', u] x[n, c, u + (d_h (m_h − k_h + 1), …)]
    cov = torch.nn.grad.conv2d_weight(window, (C, C, 2 * kh - 1, 2 * kw - 1), x,
                                      dilation=(dh, dw))
    i, j, i2, j2 = torch.meshgrid(
        *(torch.arange(k, device=x.device) for k in (kh, kw, kh, kw)), indexing="ij"
    )
    blocks = cov[:, :, kh - 1 - i2 + i, kw - 1 - j2 + j]  # (c', c, i, j, i', j')
    D = C * kh * kw
    extended = blocks.permute(1, 2, 3, 0, 4, 5).reshape(D, D)
    return extended - _ring_gram(x, kernel, dilation, pads)


def patch_gram(x: Tensor, kernel, stride, dilation, pads) -> Tensor:
    """Σ_{n,r} a aᵀ (D_in, D_in) of a Conv2d's patches, by the cheaper exact route.

    Stride 1 where the count of products says so: channel covariances per kernel offset
    (:func:`correlated_patch_gram`); otherwise the unfolded Gram (:func:`direct_patch_gram`).
    """
    N, C, H, W = x.shape
    (kh, kw), (dh, dw) = kernel, dilation
    D = C * kh * kw
    h_out = output_size(H, kh, stride[0], dh, pads[0] + pads[1])
    w_out = output_size(W, kw, stride[1], dw, pads[2] + pads[3])
    direct = N * h_out * w_out * D * D
    if tuple(stride) != (1, 1) or direct <= 2**22 or H * W < 64:  # (tiny maps: slow kernels)
        return direct_patch_gram(x, kernel, stride, dilation, pads)
    ring = sum((r1 - r0) * (c1 - c0) * (C * len(rows) * len(cols)) ** 2
               for r0, r1, c0, c1, rows, cols in _ring(x.shape, kernel, dilation, pads))
    correlated = N * C * C * (2 * kh - 1) * (2 * kw - 1) * H * W + N * ring
    if correlated < 0.6 * direct:
        return correlated_patch_gram(x, kernel, dilation, pads)
    return direct_patch_gram(x, kernel, stride, dilation, pads)


def conv_patch_sums(x: Tensor, kernel, stride, dilation, pads) -> Tensor:
    """Σ_r a_{n,r} (N, D_in): per kernel offset, the sum of the strided window it reads."""
    N, C = x.shape[:2]
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    h_out = output_size(x.shape[2], kh, sh, dh, pads[0] + pads[1])
    w_out = output_size(x.shape[3], kw, sw, dw, pads[2] + pads[3])
    xp = F.pad(x, (pads[2], pads[3], pads[0], pads[1]))
    sums = [
        xp[:, :, dh * i : dh * i + sh * (h_out - 1) + 1 : sh,
           dw * j : dw * j + sw * (w_out - 1) + 1 : sw].sum((2, 3))
        for i in range(kh)
        for j in range(kw)
    ]  # k_h·k_w window sums (a loop over kernel offsets, not over samples)
    return torch.stack(sums, -1).reshape(N, C * kh * kw)
