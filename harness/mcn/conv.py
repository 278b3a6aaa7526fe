"""Convolution and transposed convolution: ``vl_nnconv`` and ``vl_nnconvt``.

This file owns MatConvNet's two BLAS-backed linear layers, forward and backward, and
their argument checks. Arrays cross the public boundary as ``H x W x C x N``; inside,
each call moves the data once to ``N x H x W x C`` so that an im2row matrix (one row per
output pixel, columns ordered ``(fh, fw, c)``) multiplies ``F.reshape(-1, K)`` directly:
the C-order reshape of an ``FH x FW x FC x K`` filter bank has exactly that row order.
The batch is processed in chunks so that the im2row buffer stays near ``_CHUNK_BYTES``.

``vl_nnconvt`` is built from the same three kernels, exactly as MatConvNet builds it
(src/bits/nnconv.cu, ConvolutionTranspose*): its forward pass is the data derivative of a
convolution with stride ``upsample`` and padding ``crop``, and its data derivative is that
convolution's forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from harness.mcn._util import McnError, as_4d, float_dtype, is_empty, pad4, pair

__all__ = ["vl_nnconv", "vl_nnconvt"]

# Upper bound on the im2row buffer of one chunk of images (one filter group).
_CHUNK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class _Geom:
    """One convolution's geometry, in the "forward convolution" sense (also for convt)."""

    fh: int
    fw: int
    pad: tuple[int, int, int, int]
    stride: tuple[int, int]
    dilate: tuple[int, int]
    groups: int
    ho: int
    wo: int

    @property
    def pointwise(self) -> bool:
        # A 1x1 filter with unit stride and no padding reads each pixel once: im2row is the
        # input itself.
        return self.fh == 1 and self.fw == 1 and self.stride == (1, 1) and self.pad == (0, 0, 0, 0)

    def tap(self, i: int, j: int) -> tuple[slice, slice]:
        """Rows and columns of the padded input read by filter tap (i, j) for all outputs."""
        (sy, sx), (dy, dx) = self.stride, self.dilate
        return (
            slice(i * dy, i * dy + (self.ho - 1) * sy + 1, sy),
            slice(j * dx, j * dx + (self.wo - 1) * sx + 1, sx),
        )


def _chunks(n: int, row_bytes: int) -> list[slice]:
    step = max(1, min(n, _CHUNK_BYTES // max(row_bytes, 1)))
    return [slice(s, min(s + step, n)) for s in range(0, n, step)]


def _to_padded_nhwc(x: np.ndarray, pad: tuple[int, int, int, int]) -> np.ndarray:
    """H x W x C x N -> zero-padded N x Hp x Wp x C, in one copy."""
    h, w, c, n = x.shape
    pt, pb, pl, pr = pad
    if pad == (0, 0, 0, 0):
        return np.ascontiguousarray(x.transpose(3, 0, 1, 2))
    xp = np.zeros((n, h + pt + pb, w + pl + pr, c), dtype=x.dtype)
    xp[:, pt : pt + h, pl : pl + w, :] = x.transpose(3, 0, 1, 2)
    return xp


def _from_padded_nhwc(xp: np.ndarray, pad: tuple[int, int, int, int]) -> np.ndarray:
    """Padded N x Hp x Wp x C -> H x W x C x N (contiguous), dropping the padding."""
    pt, pb, pl, pr = pad
    _, hp, wp, _ = xp.shape
    return np.ascontiguousarray(xp[:, pt : hp - pb, pl : wp - pr, :].transpose(1, 2, 3, 0))


def _from_nhwc(yn: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """N x H x W x K -> H x W x K x N, adding the bias during the one copy it costs."""
    out = np.empty(yn.shape[1:] + yn.shape[:1], dtype=yn.dtype)
    src = yn.transpose(1, 2, 3, 0)
    if bias is None:
        np.copyto(out, src)
    else:
        np.add(src, bias.reshape(-1, 1), out=out)
    return out


def _im2row(xp: np.ndarray, g: _Geom, cs: slice, out: np.ndarray) -> np.ndarray:
    """Fill ``out`` (n x Ho x Wo x FH x FW x FC) from padded NHWC ``xp``; return it as rows."""
    n, _, _, c = xp.shape
    if g.dilate[1] == 1 and cs == slice(0, c):
        # Undilated in x and all channels: the FW taps of one filter row are FW*C consecutive
        # numbers in xp, so each filter row is one block copy (much faster than FW copies).
        sn, sh, sw, _ = xp.strides
        for i in range(g.fh):
            rows, _ = g.tap(i, 0)
            window = np.lib.stride_tricks.as_strided(
                xp[:, rows],
                shape=(n, g.ho, g.wo, g.fw * c),
                strides=(sn, sh * g.stride[0], sw * g.stride[1], xp.itemsize),
            )
            out[:, :, :, i].reshape(n, g.ho, g.wo, g.fw * c)[...] = window
        return out.reshape(n * g.ho * g.wo, -1)
    for i in range(g.fh):
        for j in range(g.fw):
            rows, cols = g.tap(i, j)
            out[:, :, :, i, j, :] = xp[:, rows, cols, cs]
    return out.reshape(n * g.ho * g.wo, -1)


def _row2im_add(dcols: np.ndarray, g: _Geom, cs: slice, dxp: np.ndarray) -> None:
    """Adjoint of ``_im2row``: accumulate n x Ho x Wo x FH x FW x FC rows into ``dxp``."""
    for i in range(g.fh):
        for j in range(g.fw):
            rows, cols = g.tap(i, j)
            dxp[:, rows, cols, cs] += dcols[:, :, :, i, j, :]


def _group_slices(g: _Geom, fc: int, k: int) -> list[tuple[slice, slice]]:
    kg = k // g.groups
    return [(slice(q * fc, (q + 1) * fc), slice(q * kg, (q + 1) * kg)) for q in range(g.groups)]


def _conv_forward(xp: np.ndarray, f: np.ndarray, g: _Geom) -> np.ndarray:
    """y[n, oy, ox, k] = sum_{i,j,c} xp[n, oy*sy + i*dy, ox*sx + j*dx, c] f[i, j, c, k] (per group)."""
    n, _, _, c = xp.shape
    fh, fw, fc, k = f.shape
    y = np.empty((n, g.ho, g.wo, k), dtype=xp.dtype)
    groups = _group_slices(g, fc, k)
    if g.pointwise:
        x2, y2 = xp.reshape(-1, c), y.reshape(-1, k)
        for cs, ks in groups:
            y2[:, ks] = x2[:, cs] @ f[0, 0, :, ks]
        return y
    buf = np.empty(n * g.ho * g.wo * fh * fw * fc, dtype=xp.dtype)
    for ns in _chunks(n, g.ho * g.wo * fh * fw * fc * xp.itemsize):
        nb = ns.stop - ns.start
        cols = buf[: nb * g.ho * g.wo * fh * fw * fc].reshape(nb, g.ho, g.wo, fh, fw, fc)
        for cs, ks in groups:
            rows = _im2row(xp[ns], g, cs, cols)
            wg = f[:, :, :, ks].reshape(-1, ks.stop - ks.start)
            if g.groups == 1:
                np.matmul(rows, wg, out=y[ns].reshape(-1, k))
            else:
                y[ns].reshape(-1, k)[:, ks] = rows @ wg
    return y


def _conv_backward_data(dy: np.ndarray, f: np.ndarray, g: _Geom, padded_hw: tuple[int, int]) -> np.ndarray:
    """dxp = adjoint of ``_conv_forward`` in its input, on the padded N x Hp x Wp x C grid."""
    n = dy.shape[0]
    fh, fw, fc, k = f.shape
    c = fc * g.groups
    groups = _group_slices(g, fc, k)
    if g.pointwise:
        dxp = np.empty((n, *padded_hw, c), dtype=dy.dtype)
        dx2, dy2 = dxp.reshape(-1, c), dy.reshape(-1, k)
        for cs, ks in groups:
            dx2[:, cs] = dy2[:, ks] @ f[0, 0, :, ks].T
        return dxp
    dxp = np.zeros((n, *padded_hw, c), dtype=dy.dtype)
    buf = np.empty(n * g.ho * g.wo * fh * fw * fc, dtype=dy.dtype)
    for ns in _chunks(n, g.ho * g.wo * fh * fw * fc * dy.itemsize):
        nb = ns.stop - ns.start
        dcols = buf[: nb * g.ho * g.wo * fh * fw * fc].reshape(nb * g.ho * g.wo, fh * fw * fc)
        dy2 = dy[ns].reshape(-1, k)
        for cs, ks in groups:
            np.matmul(dy2[:, ks], f[:, :, :, ks].reshape(-1, ks.stop - ks.start).T, out=dcols)
            _row2im_add(dcols.reshape(nb, g.ho, g.wo, fh, fw, fc), g, cs, dxp[ns])
    return dxp


def _conv_backward_filter(xp: np.ndarray, dy: np.ndarray, fshape: tuple[int, ...], g: _Geom) -> np.ndarray:
    """df[i, j, c, k] = sum_{n, oy, ox} xp[n, oy*sy + i*dy, ox*sx + j*dx, c] dy[n, oy, ox, k]."""
    n, _, _, c = xp.shape
    fh, fw, fc, k = fshape
    groups = _group_slices(g, fc, k)
    df = np.zeros((fh * fw * fc, k), dtype=xp.dtype)
    if g.pointwise:
        x2, dy2 = xp.reshape(-1, c), dy.reshape(-1, k)
        for cs, ks in groups:
            df[:, ks] = x2[:, cs].T @ dy2[:, ks]
        return df.reshape(fshape)
    buf = np.empty(n * g.ho * g.wo * fh * fw * fc, dtype=xp.dtype)
    for ns in _chunks(n, g.ho * g.wo * fh * fw * fc * xp.itemsize):
        nb = ns.stop - ns.start
        cols = buf[: nb * g.ho * g.wo * fh * fw * fc].reshape(nb, g.ho, g.wo, fh, fw, fc)
        dy2 = dy[ns].reshape(-1, k)
        for cs, ks in groups:
            rows = _im2row(xp[ns], g, cs, cols)
            df[:, ks] += rows.T @ dy2[:, ks]
    return df.reshape(fshape)


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


def _dzdb(dyn: np.ndarray, b: Any, bvec: np.ndarray | None) -> np.ndarray:
    """Bias derivative: sum of NHWC dzdy over pixels and images, in the shape b was given.

    Zero padding around ``dyn`` is harmless, which lets convt pass its padded copy."""
    if bvec is None:
        return _empty(dyn.dtype)
    s = dyn.sum(axis=(0, 1, 2), dtype=np.float64)
    return s.astype(dyn.dtype).reshape(np.shape(b))


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
    pad_ = pad4(pad, "pad")
    stride_ = pair(stride, "stride")
    dilate_ = pair(dilate, "dilate")
    pt, pb, pl, pr = pad_

    if is_empty(f):
        if dilate_ != (1, 1):
            raise McnError(f"Expected dilate=1 when f is empty (no filters). Received dilate={dilate!r}")
        return _subsample(x, b, dzdy, pad_, stride_, dt)

    f = as_4d(f, "f")
    _check_dtype(f, "f", dt)
    fh, fw, fc, k = f.shape
    if c % fc != 0:
        raise McnError(
            f"Expected the filter depth f.shape[2] to divide the depth of x ({c}). Received f.shape={f.shape}"
        )
    groups = c // fc
    if k % groups != 0:
        raise McnError(
            f"Expected the number of filter groups ({groups} = {c} channels / depth {fc}) to divide the "
            f"number of filters f.shape[3]. Received f.shape={f.shape}"
        )
    ext_h, ext_w = (fh - 1) * dilate_[0] + 1, (fw - 1) * dilate_[1] + 1
    if h + pt + pb < ext_h or w + pl + pr < ext_w:
        raise McnError(
            f"Expected the (dilated) filter ({ext_h} x {ext_w}) to fit in the padded input "
            f"({h + pt + pb} x {w + pl + pr}). Received f.shape={f.shape}, x.shape={x.shape}, pad={pad!r}, "
            f"dilate={dilate!r}"
        )
    g = _Geom(
        fh,
        fw,
        pad_,
        stride_,
        dilate_,
        groups,
        (h + pt + pb - ext_h) // stride_[0] + 1,
        (w + pl + pr - ext_w) // stride_[1] + 1,
    )
    bvec = _bias(b, k, dt, "one per filter")

    xp = _to_padded_nhwc(x, pad_)
    if dzdy is None:
        return _from_nhwc(_conv_forward(xp, f, g), bvec)

    dyn = np.ascontiguousarray(_dzdy(dzdy, (g.ho, g.wo, k, n), dt).transpose(3, 0, 1, 2))
    dzdx = _from_padded_nhwc(_conv_backward_data(dyn, f, g, xp.shape[1:3]), pad_)
    dzdf = _conv_backward_filter(xp, dyn, f.shape, g)
    return dzdx, dzdf, _dzdb(dyn, b, bvec)


def _subsample(
    x: np.ndarray,
    b: Any,
    dzdy: Any,
    pad: tuple[int, int, int, int],
    stride: tuple[int, int],
    dt: np.dtype,
) -> np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """vl_nnconv with ``f = []`` (src/bits/nnsubsample.cu): pad with zeros, keep every stride-th
    pixel starting at the top-left padded corner, add the bias (one per channel)."""
    h, w, c, n = x.shape
    pt, pb, pl, pr = pad
    sy, sx = stride
    ho, wo = (h + pt + pb - 1) // sy + 1, (w + pl + pr - 1) // sx + 1
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
    dzdb = _empty(dt) if bvec is None else _dzdb(np.ascontiguousarray(d.transpose(3, 0, 1, 2)), b, bvec)
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
    up = pair(upsample, "upsample")
    crop_ = pad4(crop, "crop")
    if np.size(num_groups) != 1:
        raise McnError(f"Expected num_groups to be a positive integer. Received num_groups={num_groups!r}")
    groups = pair(num_groups, "num_groups")[0]
    ct, cb, cl, cr = crop_
    if is_empty(f):
        raise McnError(f"Expected f to be a non-empty FH x FW x K x D filter bank. Received f={f!r}")
    f = as_4d(f, "f")
    _check_dtype(f, "f", dt)
    fh, fw, k, fd = f.shape
    if fd % groups != 0:
        raise McnError(
            f"Expected num_groups to divide the filter bank depth f.shape[3] ({fd}). "
            f"Received num_groups={num_groups!r}"
        )
    if fd != d:
        raise McnError(f"Expected f.shape[3] to equal the depth of x ({d}). Received f.shape={f.shape}")
    hy, wy = (h - 1) * up[0] - ct - cb + fh, (w - 1) * up[1] - cl - cr + fw
    if hy < 1 or wy < 1:
        raise McnError(f"Expected crop to leave a non-empty output. Received crop={crop!r}")
    ky = k * groups
    bvec = _bias(b, ky, dt, "K * num_groups, one per output channel")
    # The equivalent forward convolution maps the K*G-channel output back to x: stride
    # upsample, padding crop, implicit groups G, filters of depth K.
    g = _Geom(fh, fw, crop_, up, (1, 1), groups, h, w)
    padded_hw = (hy + ct + cb, wy + cl + cr)

    xn = np.ascontiguousarray(x.transpose(3, 0, 1, 2))
    if dzdy is None:
        y = _from_padded_nhwc(_conv_backward_data(xn, f, g, padded_hw), crop_)
        if bvec is not None:
            y += bvec.reshape(-1, 1)
        return y

    dyp = _to_padded_nhwc(_dzdy(dzdy, (hy, wy, ky, n), dt), crop_)
    dzdx = _from_nhwc(_conv_forward(dyp, f, g), None)
    dzdf = _conv_backward_filter(dyp, xn, f.shape, g)
    return dzdx, dzdf, _dzdb(dyp, b, bvec)
