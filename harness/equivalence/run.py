"""Run both sides on the same batch and collect every tensor; build the Report.

The reference runs ``vl_simplenn`` (LRN with the exact power, since Keras has no
``fast_pow``) with ``dzdy = 1``. The Keras model runs layer by layer under one
GradientTape so that every layer's output, the loss's derivative with respect to it and
every parameter derivative are at hand. Weights are loaded from the net into the Keras
layers the alignment names; a Keras Conv2D/Dense without MatConvNet's filter groups gets
the filters embedded block-diagonally (so the forward pass can still be compared) and
the off-diagonal parameter derivatives are reported.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from harness.equivalence.align import Alignment, align, keras_kind
from harness.equivalence.metrics import measure, nonfinite_summary
from harness.equivalence.report import Report, Row
from harness.equivalence.tolerance import tolerance_for
from harness.mcn.net import Net
from harness.mcn.options import McnError, as_4d, is_empty
from harness.mcn.simplenn import vl_simplenn, vl_simplenn_tidy

__all__ = ["compare"]

CONVENTIONS = {
    "master": "loss summed over pixels, divided by the batch size N (MatConvNet master); "
    "derivatives are those of that loss on both sides",
    "beta25": "loss summed over pixels and over the batch (MatConvNet v1.0-beta25); "
    "derivatives are those of that loss on both sides",
}


class _Weights:
    """Loads net parameters into the aligned Keras layers; maps gradients back."""

    def __init__(self, net: Net, model, alignment: Alignment, dtype: str, load: bool = True):
        self.notes: list[str] = []
        self.problems: list[str] = []
        self.embedded: dict[str, tuple[int, tuple]] = {}  # keras layer -> (groups, mcn filter shape)
        self.dtype = dtype
        self.load = load
        # with load=False: (pair index, name, net's values in Keras layout, Keras' own values)
        self.kept: list[tuple[int, str, np.ndarray, np.ndarray]] = []
        for pair in alignment.pairs:
            if pair.param_layer is None:
                continue
            layer = net.layers[pair.index]
            klayer = model.get_layer(pair.param_layer)
            try:
                self._load(layer, klayer, pair.index)
            except McnError as err:
                self.problems.append(f"layer '{layer.name}' -> Keras '{klayer.name}': {err}")

    def _load(self, layer, klayer, index: int) -> None:
        current = klayer.get_weights()
        cls = type(klayer).__name__
        if layer.type == "bnorm":
            g, b, m = (np.asarray(v, dtype=np.float64) for v in layer.weights[:3])
            eps_k = float(klayer.epsilon)
            m = m.reshape(-1, 2)
            values = []
            if klayer.scale:
                values.append(g.ravel())
            if klayer.center:
                values.append(b.ravel())
            values += [m[:, 0], m[:, 1] ** 2 - eps_k]
            names = (["w{1}"] if klayer.scale else []) + (["w{2}"] if klayer.center else [])
            self._set(klayer, values, current, index, [*names, "w{3}.mean", "w{3}.var"])
            return
        f = np.asarray(layer.weights[0], dtype=np.float64)
        b = layer.weights[1] if len(layer.weights) > 1 else None
        f = f.reshape(f.shape + (1,) * (4 - f.ndim))
        kernel_shape = current[0].shape
        if cls == "Dense":
            want = f.reshape(-1, f.shape[3])
            if want.shape != kernel_shape and f.shape[0] * f.shape[1] == 1:
                want = self._embed(klayer, f, kernel_shape, dense=True)
        else:
            want = f
            if want.shape != kernel_shape:
                want = self._embed(klayer, f, kernel_shape, dense=False)
        values = [want]
        has_bias = len(current) > 1
        if has_bias:
            values.append(
                np.zeros(current[1].shape) if is_empty(b) else np.asarray(b, dtype=np.float64).ravel()
            )
        elif not is_empty(b) and np.any(b):
            self.notes.append(
                f"Keras layer '{klayer.name}' has no bias where MatConvNet's '{layer.name}' has one"
            )
        self._set(klayer, values, current, index, ["w{1}", "w{2}"])

    def _embed(self, klayer, f: np.ndarray, kernel_shape: tuple, dense: bool) -> np.ndarray:
        fh, fw, fc, k = f.shape
        cin = kernel_shape[-2] if not dense else kernel_shape[0] // (fh * fw)
        wrong_window = not dense and tuple(kernel_shape[:2]) != (fh, fw)
        if kernel_shape[-1] != k or cin % fc or (fh * fw > 1 and dense) or wrong_window:
            raise McnError(
                f"Expected a kernel of shape {f.shape if not dense else (fh * fw * fc, k)}. "
                f"Received Keras kernel shape {kernel_shape}"
            )
        groups = cin // fc
        full = np.zeros((fh, fw, cin, k))
        kg = k // groups
        for g in range(groups):
            full[:, :, g * fc : (g + 1) * fc, g * kg : (g + 1) * kg] = f[..., g * kg : (g + 1) * kg]
        self.embedded[klayer.name] = (groups, f.shape)
        self.notes.append(
            f"Keras layer '{klayer.name}' cannot hold MatConvNet's {groups} filter groups "
            f"(kernel {kernel_shape} vs filters {f.shape}): weights "
            + ("embedded block-diagonally" if self.load else "compared block-diagonally")
            + "; its parameter derivative off the diagonal blocks is reported as a mismatch"
            " (fix: Conv2D(..., groups=" + str(groups) + "))"
        )
        return full.reshape(kernel_shape)

    def _set(self, klayer, values: list[np.ndarray], current: list[np.ndarray], index: int, names) -> None:
        if [np.shape(v) for v in values] != [c.shape for c in current]:
            raise McnError(
                f"Expected parameter shapes {[c.shape for c in current]}. "
                f"Received MatConvNet shapes {[np.shape(v) for v in values]}"
            )
        if self.load:
            klayer.set_weights([np.asarray(v, dtype=c.dtype) for v, c in zip(values, current, strict=True)])
        else:
            for name, v, c in zip(names, values, current, strict=False):
                self.kept.append(
                    (index, name, np.asarray(v, dtype=np.float64), np.asarray(c, dtype=np.float64))
                )

    def grads_to_mcn(
        self, layer, klayer, grads: list
    ) -> list[tuple[str, np.ndarray | None, np.ndarray | None]]:
        """(tensor name, Keras derivative in MatConvNet layout, off-diagonal part or None)."""
        out = []
        if layer.type == "bnorm":
            names = (["dzdw{1}"] if klayer.scale else []) + (["dzdw{2}"] if klayer.center else [])
            for name, g in zip(names, grads, strict=False):
                j = int(name[5]) - 1
                out.append((name, _fit(g, np.shape(layer.weights[j])), None))
            return out
        f = np.asarray(layer.weights[0])
        f = f.reshape(f.shape + (1,) * (4 - f.ndim))
        gk = np.asarray(grads[0])
        off = None
        if klayer.name in self.embedded:
            groups, fshape = self.embedded[klayer.name]
            fh, fw, fc, k = fshape
            full = gk.reshape(fh, fw, fc * groups, k)
            kg = k // groups
            diag = np.zeros(fshape)
            mask = np.ones(full.shape, bool)
            for g in range(groups):
                diag[..., g * kg : (g + 1) * kg] = full[:, :, g * fc : (g + 1) * fc, g * kg : (g + 1) * kg]
                mask[:, :, g * fc : (g + 1) * fc, g * kg : (g + 1) * kg] = False
            off = full[mask]
            gk = diag
        out.append(("dzdw{1}", _fit(gk, f.shape), off))
        b = layer.weights[1] if len(layer.weights) > 1 else None
        if len(grads) > 1 and not is_empty(b):
            out.append(("dzdw{2}", _fit(grads[1], np.shape(b)), None))
        return out


def _fit(g, shape: tuple) -> np.ndarray:
    """A Keras parameter derivative in the shape of the MatConvNet parameter, or as it is
    when the sizes differ (a Keras layer of another shape: its row reports the mismatch)."""
    g = np.asarray(g)
    return g.reshape(shape) if g.size == int(np.prod(shape)) else g


def _as_mcn(t: np.ndarray) -> np.ndarray:
    """A Keras tensor (N,H,W,C), (N,K) or scalar in MatConvNet's layout."""
    t = np.asarray(t)
    if t.ndim == 4:
        return t.transpose(1, 2, 3, 0)
    if t.ndim == 2:
        return t.T[None, None]
    return t


def _row(pair_name, pair_type, keras, tensor, ref, got, tol, note="", scale=0.0, same_layout=False) -> Row:
    ref = np.asarray(ref, dtype=np.float64)
    if got is None:
        return Row(
            pair_name, pair_type, keras, tensor, False, int(ref.size), int(ref.size), note=note or "missing"
        )
    got = np.asarray(got, dtype=np.float64)
    if ref.size == got.size and ref.shape != got.shape:
        # MatConvNet drops trailing singleton dimensions; compare element for element
        if ref.ndim != 4 or got.ndim != 4 or ref.shape[:3] != got.shape[:3]:
            got = got.reshape(ref.shape)
    if ref.shape != got.shape:
        return Row(
            pair_name, pair_type, keras, tensor, False, int(ref.size), int(ref.size),
            note=f"shape mismatch: MatConvNet {ref.shape} (H x W x C x N) vs Keras {got.shape}",
        )  # fmt: skip
    m = measure(ref, got, tol, floor=scale)
    if m.numel == 0:
        return Row(pair_name, pair_type, keras, tensor, True, 0, 0, tolerance=tol, note=note)
    worst = m.worst
    if same_layout:
        keras_idx = [int(i) for i in worst]
    else:
        keras_idx = [int(worst[3]), int(worst[0]), int(worst[1]), int(worst[2])] if ref.ndim == 4 else None
    return Row(
        pair_name,
        pair_type,
        keras,
        tensor,
        m.ok,
        m.numel,
        m.mismatches,
        m.max_abs,
        m.max_rel,
        tol,
        [int(i) for i in worst],
        keras_idx,
        m.ref_value,
        m.got_value,
        "; ".join(n for n in (note, m.note()) if n),
        nonfinite_ref=m.nonfinite_ref,
        nonfinite_keras=m.nonfinite_got,
    )


def compare(
    net: Net,
    model,
    x: np.ndarray,
    labels: Any,
    dtype: str = "float64",
    mode: str = "normal",
    dialect: str = "master",
    mapping: dict[str, list[str]] | None = None,
    seed: int = 0,
    weights: str = "net",
) -> Report:
    """Compare ``net`` (MatConvNet reference) with a Keras ``model`` on one batch.

    ``x`` is ``H x W x C x N`` (MatConvNet layout), ``labels`` 1-based (0 = ignore).
    The net's weights are loaded into ``model`` (or into a float64 clone of it when it
    computes in another precision than ``dtype``). With ``weights="model"`` the model
    keeps its own weights (to check a port's own weight transfer): each parameter is then
    compared too (rows ``w{j}``, in Keras' layout). Returns a Report with a
    row per aligned layer and tensor.
    """
    import tensorflow as tf

    tol = tolerance_for(dtype)
    np_dtype = np.float64 if dtype == "float64" else np.float32
    net = vl_simplenn_tidy(net)
    net = _cast_net(net, np_dtype)
    x = as_4d(np.asarray(x, dtype=np_dtype), "x")
    bad_x = nonfinite_summary(x, "x (the input batch)")
    if bad_x:
        raise McnError(f"{bad_x}: a comparison on non-finite input cannot tell anything apart")
    labels_arr = np.asarray(labels, dtype=np.float64)
    n = x.shape[3]
    model = with_dtype(model, dtype)
    alignment = align(net, model, mapping)
    if weights not in ("net", "model"):
        raise McnError(f"Expected weights 'net' or 'model'. Received weights={weights!r}")
    params = _Weights(net, model, alignment, dtype, load=weights == "net")
    problems = _nonfinite_parameters(net, model)

    # dropout masks drawn by the reference and shared with the Keras side ('normal' mode)
    rng = np.random.default_rng(seed)
    res = vl_simplenn(net, x, 1.0, labels_arr, mode=mode, dialect=dialect, lrn_exact=True, rng=rng)
    masks = {
        i: res[i + 1].aux
        for i, layer in enumerate(net.layers)
        if layer.type == "dropout" and mode == "normal"
    }

    klayers = [l for l in model.layers if keras_kind(l) != "input"]
    dropout_mask = {}
    for pair in alignment.pairs:
        if pair.index in masks:
            for name in pair.keras:
                dropout_mask[name] = masks[pair.index].transpose(3, 0, 1, 2)
    training = mode == "normal"
    xk = tf.constant(x.transpose(3, 0, 1, 2))
    outputs: dict[str, Any] = {}
    pre: dict[str, Any] = {}
    tf_dtype = tf.float64 if dtype == "float64" else tf.float32
    # BatchNormalization(training=True) updates its moving statistics: put them back after
    # the run, so that comparing leaves the model as it was (and a second comparison with
    # weights="model" sees the model's own moments)
    frozen = [(v, np.array(v.numpy())) for v in model.non_trainable_variables]
    with tf.GradientTape() as tape:
        tape.watch(xk)
        h = tf.cast(xk, tf_dtype)
        for kl in klayers:
            kind = keras_kind(kl)
            if kind == "dropout":
                # a mask of another shape (the model's tensor differs there, which the
                # rows report) is not applied: the mask would not broadcast
                if kl.name in dropout_mask and tuple(dropout_mask[kl.name].shape) == tuple(h.shape):
                    h = h * tf.constant(dropout_mask[kl.name], dtype=h.dtype)
            elif kind in ("conv", "convt") and getattr(kl, "activation", None) is not None and _nonlinear(kl):
                act = kl.activation
                kl.activation = _identity
                try:
                    z = kl(h)
                finally:
                    kl.activation = act
                pre[kl.name] = z
                h = act(z)
            elif kind == "bnorm":
                h = kl(h, training=training)
            else:
                h = kl(h)
            outputs[kl.name] = h
        final = h
        loss_pair = (
            alignment.pairs[-1]
            if alignment.pairs and alignment.pairs[-1].type in ("softmaxloss", "loss")
            else None
        )
        probabilities = loss_pair is not None and (
            loss_pair.fused_activation == "softmax"
            or any(keras_kind(model.get_layer(k)) == "softmax" for k in loss_pair.keras)
        )
        loss = (
            _keras_loss(final, labels_arr, n, dialect, probabilities)
            if loss_pair is not None
            else tf.reduce_sum(final)
        )
    # tensors per pair
    rows: list[Row] = []
    carry = xk
    carry_name = "input"
    pair_tensor: dict[int, tuple[Any, str]] = {}
    for pair in alignment.pairs:
        if pair.type in ("softmaxloss", "loss"):
            break
        if pair.fused_activation:
            # output of the previous pair's layer after its activation
            carry = outputs[_fused_owner(alignment, pair).param_layer]
            carry_name = f"{_fused_owner(alignment, pair).param_layer}(activation)"
        elif pair.keras:
            last = pair.keras[-1]
            if pair.param_layer and pair.param_layer in pre and last == pair.param_layer:
                carry, carry_name = pre[last], f"{last}(pre-activation)"
            else:
                carry, carry_name = outputs[last], last
        pair_tensor[pair.index] = (carry, pair.keras_label if pair.keras else f"({carry_name})")
    targets = [t for t, _ in pair_tensor.values()]
    variables = {
        pair.index: model.get_layer(pair.param_layer).trainable_variables
        for pair in alignment.pairs
        if pair.param_layer
    }
    flat_vars = [v for vs in variables.values() for v in vs]
    grads = tape.gradient(loss, [xk, *targets, *flat_vars])  # one backward pass for all
    del tape
    for v, value in frozen:
        v.assign(value)
    dx_input, dtargets = grads[0], grads[1 : 1 + len(targets)]
    rest = iter(grads[1 + len(targets) :])
    param_grads = {idx: [next(rest) for _ in vs] for idx, vs in variables.items()}

    rows.append(_row("input", "data", "input", "dzdx", res[0].dzdx, _as_mcn(dx_input.numpy()), tol.backward))
    for (idx, (tensor, klabel)), dt in zip(pair_tensor.items(), dtargets, strict=True):
        pair = alignment.pairs[idx]
        layer = net.layers[idx]
        note = "; ".join(pair.notes)
        for kidx, wname, ref_w, keras_w in params.kept:
            if kidx == idx:
                rows.append(
                    _row(
                        layer.name,
                        layer.type,
                        pair.param_layer,
                        wname,
                        ref_w,
                        keras_w,
                        tol.forward,
                        "",
                        0.0,
                        True,
                    )
                )
        rows.append(
            _row(
                layer.name,
                layer.type,
                klabel,
                "x",
                res[idx + 1].x,
                _as_mcn(tensor.numpy()),
                tol.forward,
                note,
            )
        )
        rows.append(
            _row(
                layer.name,
                layer.type,
                klabel,
                "dzdx",
                res[idx + 1].dzdx,
                None if dt is None else _as_mcn(dt.numpy()),
                tol.backward,
            )
        )
        if pair.param_layer:
            kl = model.get_layer(pair.param_layer)
            gk = [None if g is None else g.numpy() for g in param_grads[idx]]
            mapped = params.grads_to_mcn(layer, kl, gk) if all(g is not None for g in gk) else []
            for name, g, off in mapped:
                j = int(name[5]) - 1
                scale = _bias_scale(res[idx + 1].dzdx) if j == 1 else 0.0
                if j == 0 and layer.type == "bnorm":
                    scale = _gain_scale(res[idx].x, res[idx + 1].dzdx, layer.epsilon)
                elif j == 0 and layer.type == "conv":
                    scale = _filter_scale(res[idx].x, res[idx + 1].dzdx)
                rows.append(
                    _row(layer.name, layer.type, kl.name, name, res[idx].dzdw[j], g, tol.parameter, "", scale)
                )
                if off is not None:
                    rows.append(
                        _row(
                            layer.name,
                            layer.type,
                            kl.name,
                            "dzdw{1}*",
                            np.zeros(off.shape),
                            off,
                            tol.parameter,
                            "Keras-only weights off MatConvNet's group blocks (MatConvNet has none)",
                            # the reference is all zeros here: measure against the real gradient
                            float(np.max(np.abs(res[idx].dzdw[0]))),
                        )
                    )
    if loss_pair is not None:
        layer = net.layers[loss_pair.index]
        rows.append(
            _row(layer.name, layer.type, loss_pair.keras_label, "loss", res[-1].x, loss.numpy(), tol.forward)
        )
    limitations = []
    if any(l.type in ("lrn", "normalize") for l in net.layers):
        limitations.append(
            "LRN compared with the exact power (MatConvNet's CPU fast_pow differs by up to 3.3e-3)"
        )
    bnorms = [i for i, l in enumerate(net.layers) if l.type == "bnorm"]
    if mode == "test" and bnorms:
        text = (
            "test mode: MatConvNet's backward pass through bnorm uses batch statistics (vl_simplenn "
            "calls vl_nnbnorm without 'moments'), Keras differentiates through the stored moments"
        )
        limitations.append(text)
        _mark_limited(rows, net, bnorms[-1], text)
    report = Report(
        rows=rows,
        dtype=dtype,
        mode=mode,
        dialect=dialect,
        convention=CONVENTIONS[dialect],
        alignment_problems=alignment.problems + params.problems,
        notes=params.notes,
        limitations=limitations,
        problems=problems,
    )
    report.first_divergence = _first_divergence(report, net)
    return report


def _nonfinite_parameters(net: Net, model) -> list[str]:
    """Every parameter that holds NaN or Inf, on either side (after the weights were
    loaded): such a net or model is never called equivalent, whether or not the batch
    happens to reach the bad element."""
    out = []
    for layer in net.layers:
        for j, w in enumerate(layer.weights):
            text = nonfinite_summary(w, f"MatConvNet layer '{layer.name}' weights{{{j + 1}}}")
            if text:
                out.append(text)
    for v in model.weights:
        text = nonfinite_summary(np.asarray(v.numpy()), f"Keras variable '{getattr(v, 'path', v.name)}'")
        if text:
            out.append(text)
    return out


def with_dtype(model, dtype: str):
    """The model itself if it computes in ``dtype``, else a clone that does (same
    architecture, layer names and weights): float64 comparisons need float64 layers."""
    import keras

    # the InputLayer computes nothing (and reports float32 whatever Input's dtype)
    layers = [l for l in model.layers if type(l).__name__ != "InputLayer"]
    if all(getattr(l, "compute_dtype", dtype) == dtype for l in layers):
        return model

    def clone(layer):
        config = layer.get_config()
        config["dtype"] = dtype
        return layer.__class__.from_config(config)

    shape = tuple(model.inputs[0].shape[1:])
    copy = keras.models.clone_model(
        model, clone_function=clone, input_tensors=keras.Input(shape, dtype=dtype)
    )
    copy.set_weights([np.asarray(w, dtype=dtype) for w in model.get_weights()])
    return copy


def _bias_scale(dzdy: np.ndarray) -> float:
    """A bias derivative sums dzdy over H, W and N; where it cancels to ~0 (a bias
    followed by bnorm, whose output ignores it) both sides hold rounding noise of that
    sum, so its scale is the largest per-channel sum of |dzdy|, not its own size."""
    d = np.abs(as_4d(np.asarray(dzdy, dtype=np.float64)))
    return float(d.sum(axis=(0, 1, 3)).max())


def _filter_scale(x: np.ndarray, dzdy: np.ndarray) -> float:
    """A filter derivative sums x .* dzdy over positions and images; where it cancels to ~0
    (filters followed by bnorm, whose output ignores their scale) both sides hold rounding
    noise of those products, bounded by max|x| times the largest per-filter sum of |dzdy|."""
    return _bias_scale(dzdy) * float(np.max(np.abs(np.asarray(x, dtype=np.float64)), initial=0.0))


def _gain_scale(x: np.ndarray, dzdy: np.ndarray, epsilon) -> float:
    """A bnorm gain derivative is ``(sum(dzdy .* x) - mu * sum(dzdy)) / sigma`` per channel;
    where the layers after it ignore the scale (another bnorm) it cancels to ~0 and both
    sides hold rounding noise of those terms, so its scale is theirs, not its own size."""
    x = as_4d(np.asarray(x, dtype=np.float64))
    d = np.abs(as_4d(np.asarray(dzdy, dtype=np.float64)))
    mu = x.mean(axis=(0, 1, 3))
    sigma = np.sqrt(x.var(axis=(0, 1, 3)) + float(np.asarray(epsilon, dtype=float).ravel()[0]))
    terms = (d * np.abs(x)).sum(axis=(0, 1, 3)) + np.abs(mu) * d.sum(axis=(0, 1, 3))
    with np.errstate(divide="ignore", invalid="ignore"):  # sigma 0: epsilon 0 on a constant channel
        return float((terms / sigma).max())


def _identity(z):
    return z


def _nonlinear(kl) -> bool:
    name = getattr(kl.activation, "__name__", "")
    return name not in ("linear", "identity", "_identity")


def _fused_owner(alignment: Alignment, pair):
    for p in reversed(alignment.pairs[: pair.index]):
        if p.param_layer:
            return p
    raise AssertionError("fused activation without an owner")


def _keras_loss(final, labels: np.ndarray, n: int, dialect: str, probabilities: bool):
    import tensorflow as tf

    scores = final if len(final.shape) == 4 else final[:, None, None, :]
    k = scores.shape[-1]
    lab = np.asarray(labels, dtype=np.float64)
    lab = lab.reshape(lab.shape + (1,) * (4 - lab.ndim)) if lab.ndim > 2 else lab.reshape(1, 1, 1, -1)
    lab = np.broadcast_to(lab[:, :, :1, :], (scores.shape[1], scores.shape[2], 1, n)).transpose(3, 0, 1, 2)[
        ..., 0
    ]
    weights = tf.constant((lab > 0).astype(np.float64), dtype=scores.dtype)
    onehot = tf.one_hot(np.maximum(lab, 1).astype(np.int32) - 1, k, dtype=scores.dtype)
    if probabilities:
        per_pixel = -tf.math.log(tf.reduce_sum(scores * onehot, axis=-1))
    else:
        per_pixel = tf.reduce_logsumexp(scores, axis=-1) - tf.reduce_sum(scores * onehot, axis=-1)
    total = tf.reduce_sum(weights * per_pixel)
    return total / n if dialect == "master" else total


def _mark_limited(rows: list[Row], net: Net, last_bnorm: int, text: str) -> None:
    """Backward rows that the test-mode bnorm quirk changes: every derivative at or before
    the last bnorm layer, except the derivative at that layer's own output."""
    order = {l.name: i for i, l in enumerate(net.layers)}
    for r in rows:
        i = order.get(r.layer, -1)
        backward = r.tensor == "dzdx" or r.tensor.startswith("dzdw")
        if r.nonfinite_ref or r.nonfinite_keras:
            continue  # a known difference never excuses a NaN or an Inf
        if backward and i <= last_bnorm and not (i == last_bnorm and r.tensor == "dzdx"):
            r.limitation = text


def _first_divergence(report: Report, net: Net) -> dict | None:
    """Forward divergences point at the earliest layer whose output differs; with a
    clean forward pass, the backward pass is read from the loss down: a derivative that
    differs first at the output of layer i was made wrong by layer i+1; a parameter
    derivative that differs while its layer's output derivative agrees, by that layer."""
    names = [l.name for l in net.layers]
    bad = [r for r in report.rows if not r.ok and not r.limitation]
    if not bad:
        return None
    fwd = [r for r in bad if r.tensor in ("x", "loss") or r.tensor.startswith("w{")]
    if fwd:
        r = min(fwd, key=lambda r: names.index(r.layer))
        return {"layer": r.layer, "keras": r.keras, "tensor": r.tensor, "culprit": r.layer}
    order = {n: i for i, n in enumerate(names)}
    order["input"] = -1
    r = max(bad, key=lambda r: (order[r.layer], r.tensor.startswith("dzdw")))
    culprit = r.layer
    if r.tensor == "dzdx":
        nxt = order[r.layer] + 1
        culprit = names[nxt] if nxt < len(names) else r.layer
    return {"layer": r.layer, "keras": r.keras, "tensor": r.tensor, "culprit": culprit}


def _cast_net(net: Net, dtype) -> Net:
    out = net.copy()
    for layer in out.layers:
        layer.weights = [np.asarray(w, dtype=dtype) if np.size(w) else np.asarray(w) for w in layer.weights]
    return out
