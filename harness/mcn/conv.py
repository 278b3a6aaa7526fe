"""Convolution and transposed convolution: ``vl_nnconv`` and ``vl_nnconvt``.

MatConvNet's two linear layers, forward and backward, with its argument checks. Arrays
are ``H x W x C x N``, images last. ``vl_nnconv`` is a cross-correlation with zero
padding, stride, dilation and implicit filter groups; ``vl_nnconvt`` is built exactly as
MatConvNet builds it (src/bits/nnconv.cu, ConvolutionTranspose*): its forward pass is the
data derivative of a convolution with stride ``upsample`` and padding ``crop``, and its
data derivative is that convolution's forward pass. Output sizes come from
harness.mcn.geometry; the sums are computed as BLAS products by
harness.mcn.kernels.conv_gemm.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np

from harness.mcn.geometry import conv_output_size, convt_output_size, empty_filters_error
from harness.mcn.kernels import threads
from harness.mcn.kernels.conv_gemm import ConvGeometry, bias_sums, conv_backward, conv_forward
from harness.mcn.options import (
    McnError,
    as_4d,
    check_budget,
    float_dtype,
    is_empty,
    pad4,
    pair,
    positive_integer,
)

__all__ = ["vl_nnconv", "vl_nnconvt"]


# ----------------------------------------------------------------------------------------
#                                                                             vl_nnconv


def vl_nnconv(
    x: np.ndarray,
    f: np.ndarray | None,
    b: np.ndarray | None,
    dzdy: np.ndarray | None = None,
    *,
    pad: Any = 0,
    stride: Any = 1,
    dilate: Any = 1,
) -> np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mirrors matlab/vl_nnconv.m (src/vl_nnconv.cu, src/bits/nnconv.cu, nnsubsample.cu).

    Cross-correlation with zero padding ``pad = [T B L R]``, ``stride = [SY SX]``,
    ``dilate = [DY DX]`` and implicit filter groups G = C / FC (group g reads channels
    ``g*FC:(g+1)*FC`` and writes filters ``g*K/G:(g+1)*K/G``)::

        y[oy, ox, k, n] = b[k] + sum_{i, j, c} xpad[oy*SY + i*DY, ox*SX + j*DX, g*FC + c, n] f[i, j, c, k]

    with ``Ho = floor((H + T + B - (FH-1)*DY - 1) / SY) + 1``. ``f`` empty means no
    filtering: ``y = xpad[::SY, ::SX] + b`` (MatConvNet's Subsample, padding included).
    Backward returns ``(dzdx, dzdf, dzdb)``; ``dzdf`` and ``dzdb`` are summed over the
    batch, have the shapes of ``f`` and ``b``, and are empty when ``f`` or ``b`` is.
    """
    x = as_4d(x, "x")
    dt = float_dtype(x, "x")
    h, w, c, n = x.shape
    pad_, stride_, dilate_ = pad4(pad, "pad"), pair(stride, "stride"), pair(dilate, "dilate")
    if is_empty(f):
        ho, wo, _ = conv_output_size(x.shape, None, pad, stride, dilate)
        return _subsample(x, b, dzdy, pad_, stride_, (ho, wo), dt)

    f = as_4d(f, "f")
    _check_dtype(f, "f", dt)
    ho, wo, k = conv_output_size(x.shape, f.shape, pad, stride, dilate)
    pt, pb, pl, pr = pad_
    padded = (h + pt + pb) * (w + pl + pr) * c * n
    check_budget(
        dt.itemsize * (padded + ho * wo * k * n) * (1 if dzdy is None else 2),
        f"conv with pad={list(pad_)}, stride={list(stride_)}: the padded input and the output",
    )
    fh, fw, fc, _ = f.shape
    g = ConvGeometry(fh, fw, fc, k, pad_, stride_, dilate_, c // fc, ho, wo)
    bvec = _bias(b, k, dt, "one per filter")

    if dzdy is None:
        return conv_forward(x, f, g, bvec)
    dzdy = _dzdy(dzdy, (ho, wo, k, n), dt)
    # The bias derivative (a pass over dzdy) runs beside the products when worth a thread.
    later = threads.background if dzdy.size >= threads.PARALLEL_MIN else partial
    dzdb = later(_dzdb, dzdy, b, bvec)
    dzdx, dzdf = conv_backward(x, dzdy, f, g, (h, w), data=True)
    return dzdx, dzdf, dzdb()


def _subsample(
    x: np.ndarray,
    b: Any,
    dzdy: Any,
    pad: tuple[int, int, int, int],
    stride: tuple[int, int],
    out_hw: tuple[int, int],
    dt: np.dtype,
) -> np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """vl_nnconv with ``f = []`` (src/bits/nnsubsample.cu): pad with zeros, keep every stride-th
    pixel starting at the top-left padded corner, add the bias (one per channel)."""
    h, w, c, n = x.shape
    pt, _, pl, _ = pad
    sy, sx = stride
    ho, wo = out_hw
    check_budget(dt.itemsize * ho * wo * c * n, f"conv (no filters) with pad={list(pad)}: the output")
    bvec = _bias(b, c, dt, "one per input channel, as f is empty")
    # Output pixel (oy, ox) reads input row oy*sy - pt, column ox*sx - pl, when inside the image.
    oy0, ox0 = -(-pt // sy), -(-pl // sx)
    iy0, ix0 = oy0 * sy - pt, ox0 * sx - pl
    ny, nx = len(range(iy0, h, sy)), len(range(ix0, w, sx))
    inner = (slice(oy0, oy0 + ny), slice(ox0, ox0 + nx))
    src = (slice(iy0, h, sy), slice(ix0, w, sx))
    if dzdy is None:
        y = np.zeros((ho, wo, c, n), dtype=dt)
        y[inner] = x[src]
        if bvec is not None:
            y += bvec.reshape(-1, 1)
        return y
    d = _dzdy(dzdy, (ho, wo, c, n), dt)
    dzdx = np.zeros_like(x)
    dzdx[src] = d[inner]
    dzdb = _dzdb(d, b, bvec)
    return dzdx, _empty(dt), dzdb


# ----------------------------------------------------------------------------------------
#                                                                            vl_nnconvt


def vl_nnconvt(
    x: np.ndarray,
    f: np.ndarray,
    b: np.ndarray | None,
    dzdy: np.ndarray | None = None,
    *,
    upsample: Any = 1,
    crop: Any = 0,
    num_groups: Any = 1,
) -> np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mirrors matlab/vl_nnconvt.m (src/vl_nnconvt.cu, ConvolutionTranspose in src/bits/nnconv.cu).

    Filters are ``FH x FW x K x D`` with D the depth of ``x``; ``num_groups`` G divides D,
    and group g maps input channels ``g*D/G:(g+1)*D/G`` to outputs ``g*K:(g+1)*K``. The
    result is the adjoint of ``vl_nnconv(., f, [], 'stride', upsample, 'pad', crop)``::

        y[oy*UY + i - CT, ox*UX + j - CL, g*K + k, n] += x[oy, ox, d, n] f[i, j, k, d]   (+ b)

    of size ``(H-1)*UY - CT - CB + FH`` by ``(W-1)*UX - CL - CR + FW`` by ``K*G``.
    Backward returns ``(dzdx, dzdf, dzdb)`` with ``dzdf`` and ``dzdb`` summed over the batch.
    """
    x = as_4d(x, "x")
    dt = float_dtype(x, "x")
    h, w, d, n = x.shape
    up, crop_ = pair(upsample, "upsample"), pad4(crop, "crop")
    groups = positive_integer(num_groups, "num_groups")
    if is_empty(f):
        raise empty_filters_error(f)
    f = as_4d(f, "f")
    _check_dtype(f, "f", dt)
    hy, wy, ky = convt_output_size(x.shape, f.shape, upsample, crop, num_groups)
    ct, cb, cl, cr = crop_
    check_budget(
        dt.itemsize * (hy + ct + cb) * (wy + cl + cr) * ky * n * (1 if dzdy is None else 2),
        f"convt with upsample={list(up)}, crop={list(crop_)}: the output",
    )
    bvec = _bias(b, ky, dt, "K * num_groups, one per output channel")
    # The equivalent forward convolution maps the K*G-channel output back to x: stride
    # upsample, padding crop, implicit groups G, filters of depth K.
    fh, fw, k, _ = f.shape
    g = ConvGeometry(fh, fw, k, d, crop_, up, (1, 1), groups, h, w)

    if dzdy is None:
        y = conv_backward(None, x, f, g, (hy, wy), data=True)[0]
        if bvec is not None:
            y += bvec.reshape(-1, 1)
        return y
    dzdy = _dzdy(dzdy, (hy, wy, ky, n), dt)
    dzdx = conv_forward(dzdy, f, g, None)
    dzdf = conv_backward(dzdy, x, f, g, (hy, wy), data=False)[1]
    return dzdx, dzdf, _dzdb(dzdy, b, bvec)


# ----------------------------------------------------------------------------------------
#                                                                       argument checks


def _check_dtype(a: np.ndarray, name: str, dt: np.dtype) -> None:
    if a.dtype != dt:
        raise McnError(f"Expected {name} to have the dtype of x ({dt}). Received {name}.dtype={a.dtype}")


def _bias(b: Any, k: int, dt: np.dtype, what: str) -> np.ndarray | None:
    """Flattened bias vector (any shape with K elements, as MatConvNet accepts), or None."""
    if is_empty(b):
        return None
    b = np.asarray(b)
    _check_dtype(b, "b", dt)
    if b.size != k:
        raise McnError(f"Expected b to have {k} elements ({what}). Received b.shape={b.shape}")
    return b.reshape(-1)


def _dzdy(dzdy: Any, shape: tuple[int, ...], dt: np.dtype) -> np.ndarray:
    d = as_4d(dzdy, "dzdy")
    _check_dtype(d, "dzdy", dt)
    if d.shape != shape:
        raise McnError(f"Expected dzdy to have the output shape {shape}. Received dzdy.shape={d.shape}")
    return d


def _empty(dt: np.dtype) -> np.ndarray:
    # MATLAB's [] of the data class: what MatConvNet returns for an absent derivative.
    return np.zeros((0, 0), dtype=dt)


def _dzdb(dzdy: np.ndarray, b: Any, bvec: np.ndarray | None) -> np.ndarray:
    """Bias derivative: dzdy summed over pixels and images, in the shape b was given."""
    if bvec is None:
        return _empty(dzdy.dtype)
    # Summed in float64 (harness.mcn.kernels.conv_gemm.bias_sums picks the faster order).
    return bias_sums(dzdy).astype(dzdy.dtype).reshape(np.shape(b))
