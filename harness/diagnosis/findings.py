"""Static differences between a MatConvNet net and a Keras model, without running them.

Each finding names what differs, MatConvNet's value, Keras' value and the fix. Three
families: per-layer configuration (from the alignment), initialisation, and the training
set-up (the loss, the optimizer and its schedule read from the compiled model or passed in,
against cnn_train's options in ``net.meta['trainOpts']`` and the layers' multipliers).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from harness.equivalence.align import align, keras_kind
from harness.mcn.net import Net
from harness.mcn.options import is_empty, pad4, pair
from harness.mcn.simplenn import vl_simplenn_tidy

__all__ = ["Finding", "diagnose"]


@dataclass
class Finding:
    kind: str  # e.g. "groups", "optimizer", "initialisation"
    layer: str  # MatConvNet layer name, or "" for training-wide findings
    keras: str  # Keras layer name, or the component ("optimizer", "loss")
    mcn_value: str
    keras_value: str
    fix: str

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        where = f"{self.layer} / {self.keras}" if self.layer else self.keras
        return (
            f"[{self.kind}] {where}: MatConvNet {self.mcn_value}; Keras {self.keras_value}. Fix: {self.fix}"
        )


def _shapes(net: Net, input_size) -> list[tuple[int, int, int]]:
    """Input shape (H, W, C) of every layer, by MatConvNet's size formulas."""
    h, w, c = input_size
    shapes = []
    for layer in net.layers:
        shapes.append((h, w, c))
        t = layer.type
        if t == "conv" and not is_empty(layer.weights[0]):
            f = np.asarray(layer.weights[0])
            f = f.reshape(f.shape + (1,) * (4 - f.ndim))
            pt, pb, pl, pr = pad4(layer.pad)
            sy, sx = pair(layer.stride, "stride")
            dy, dx = pair(layer.get("dilate", 1), "dilate")
            h = (h + pt + pb - (f.shape[0] - 1) * dy - 1) // sy + 1
            w = (w + pl + pr - (f.shape[1] - 1) * dx - 1) // sx + 1
            c = f.shape[3]
        elif t == "pool":
            ph, pw = pair(layer.pool, "pool")
            pt, pb, pl, pr = pad4(layer.pad)
            sy, sx = pair(layer.stride, "stride")
            h = (h + pt + pb - ph) // sy + 1
            w = (w + pl + pr - pw) // sx + 1
    return shapes


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, tuple | list):
        return "[" + " ".join(_fmt(x) for x in v) + "]"
    return str(v)


def _layer_findings(net: Net, model, shapes) -> list[Finding]:
    out: list[Finding] = []
    alignment = align(net, model)
    for problem in alignment.problems:
        out.append(
            Finding(
                "alignment", "", "model", "-", problem, "add or remove the layer so both run the same ops"
            )
        )
    for pair_ in alignment.pairs:
        layer = net.layers[pair_.index]
        ks = [model.get_layer(n) for n in pair_.keras]
        main = model.get_layer(pair_.param_layer) if pair_.param_layer else None
        h, w, c = shapes[pair_.index]
        if layer.type == "conv" and main is not None:
            out += _conv_findings(layer, main, ks, (h, w, c))
        elif layer.type == "pool":
            out += _pool_findings(layer, ks)
        elif layer.type == "relu" and pair_.keras or pair_.fused_activation == "relu":
            leak = (
                float(np.asarray(layer.get("leak", 0.0)).ravel()[0])
                if not is_empty(layer.get("leak", 0))
                else 0.0
            )
            k_leak = 0.0
            for k in ks:
                k_leak = float(getattr(k, "negative_slope", getattr(k, "leak", 0.0)) or 0.0)
            if abs(k_leak - leak) > 1e-12 and pair_.keras:
                out.append(
                    Finding(
                        "relu leak",
                        layer.name,
                        pair_.keras_label,
                        _fmt(leak),
                        _fmt(k_leak),
                        f"ReLU(negative_slope={leak:g})",
                    )
                )
        elif layer.type == "bnorm" and main is not None:
            eps = float(np.asarray(layer.get("epsilon", 1e-5)).ravel()[0])
            if abs(float(main.epsilon) - eps) > 1e-15:
                out.append(
                    Finding(
                        "bnorm epsilon",
                        layer.name,
                        main.name,
                        _fmt(eps),
                        _fmt(float(main.epsilon)),
                        f"BatchNormalization(epsilon={eps:g})",
                    )
                )
            lr = np.asarray(layer.get("learning_rate", []), dtype=float).ravel()
            if lr.size >= 3 and abs(float(main.momentum) - (1 - lr[2])) > 1e-12:
                out.append(
                    Finding(
                        "bnorm momentum",
                        layer.name,
                        main.name,
                        f"moments averaged with rate {lr[2]:g}",
                        f"momentum={float(main.momentum):g}",
                        f"BatchNormalization(momentum={1 - lr[2]:g}) (MatConvNet averages sigma, "
                        "Keras the variance)",
                    )
                )
        elif layer.type == "dropout":
            rate = float(np.asarray(layer.get("rate", 0.5)).ravel()[0])
            k_rate = next((float(k.rate) for k in ks if keras_kind(k) == "dropout"), None)
            if k_rate is None:
                out.append(
                    Finding(
                        "dropout",
                        layer.name,
                        "-",
                        f"rate {rate:g}",
                        "no Dropout layer",
                        f"Dropout({rate:g}) (training only; identity at test time)",
                    )
                )
            elif abs(k_rate - rate) > 1e-12:
                out.append(
                    Finding(
                        "dropout rate",
                        layer.name,
                        pair_.keras_label,
                        _fmt(rate),
                        _fmt(k_rate),
                        f"Dropout({rate:g})",
                    )
                )
    return out


def _conv_findings(layer, main, ks, in_shape) -> list[Finding]:
    out = []
    f = np.asarray(layer.weights[0])
    f = f.reshape(f.shape + (1,) * (4 - f.ndim))
    fh, fw, fc, k = f.shape
    h, w, c = in_shape
    cls = type(main).__name__
    label = "+".join(x.name for x in ks)
    pads = pad4(layer.pad)
    stride = pair(layer.stride, "stride")
    dilate = pair(layer.get("dilate", 1), "dilate")
    groups = c // fc if fc and c % fc == 0 else 1
    if cls == "Dense":
        # a fully-connected conv: Flatten + Dense is exact only when the filter covers the input
        if (fh, fw) != (h, w) and (fh, fw) != (1, 1):
            out.append(
                Finding(
                    "kernel size",
                    layer.name,
                    label,
                    f"{fh}x{fw} filters on a {h}x{w} input",
                    "Dense (covers the whole input)",
                    "use Conv2D for a conv smaller than its input",
                )
            )
        units = int(main.units)
        if units != k:
            out.append(Finding("filters", layer.name, label, str(k), str(units), f"Dense({k})"))
        if groups > 1:
            out.append(
                Finding(
                    "groups",
                    layer.name,
                    label,
                    f"{groups} filter groups",
                    "1 (Dense has no groups)",
                    f"Conv2D({k}, 1, groups={groups}) instead of Dense",
                )
            )
        if fh * fw > 1:
            out.append(
                Finding(
                    "flatten order",
                    layer.name,
                    label,
                    f"filters {fh}x{fw}x{fc}x{k}",
                    "Flatten + Dense",
                    "load the kernel as F.reshape(-1, K) (row-major H, W, C as Keras' Flatten); "
                    "MATLAB's F(:) is column-major",
                )
            )
        return out
    ksize = tuple(getattr(main, "kernel_size", (fh, fw)))
    if ksize != (fh, fw):
        out.append(
            Finding(
                "kernel size", layer.name, label, _fmt((fh, fw)), _fmt(ksize), f"kernel_size=({fh}, {fw})"
            )
        )
    kfilters = getattr(main, "filters", k)
    if kfilters != k:
        out.append(Finding("filters", layer.name, label, str(k), str(kfilters), f"filters={k}"))
    kgroups = int(getattr(main, "groups", 1) or 1)
    if kgroups != groups:
        out.append(
            Finding(
                "groups",
                layer.name,
                label,
                f"{groups} filter groups ({fc}-deep filters on {c} channels)",
                str(kgroups),
                f"Conv2D(..., groups={groups})",
            )
        )
    kstride = tuple(getattr(main, "strides", (1, 1)))
    sub = next((x for x in ks if type(x).__name__ == "Subsample"), None)
    if sub is not None:
        kstride = tuple(sub.strides)
    if kstride != stride:
        out.append(Finding("stride", layer.name, label, _fmt(stride), _fmt(kstride), f"strides={stride}"))
    kdil = tuple(getattr(main, "dilation_rate", (1, 1)))
    if kdil != dilate:
        out.append(
            Finding("dilation", layer.name, label, _fmt(dilate), _fmt(kdil), f"dilation_rate={dilate}")
        )
    kpads = _keras_pads(ks, main, (fh, fw), stride, (h, w))
    if kpads is not None and tuple(kpads) != tuple(pads):
        side = " (sides swapped)" if sorted(kpads) == sorted(pads) and any(pads) else ""
        out.append(
            Finding(
                "padding",
                layer.name,
                label,
                f"[T B L R] {_fmt(pads)}",
                f"{_fmt(kpads)}{side}",
                f"ZeroPadding2D((({pads[0]}, {pads[1]}), ({pads[2]}, {pads[3]}))) + padding='valid'",
            )
        )
    act = getattr(getattr(main, "activation", None), "__name__", "linear")
    if act not in ("linear", "identity"):
        out.append(
            Finding(
                "activation",
                layer.name,
                label,
                "none inside the conv (a separate layer follows, or none)",
                f"activation='{act}' fused",
                "check that MatConvNet has this activation next",
            )
        )
    return out


def _keras_pads(ks, main, ksize, stride, in_hw) -> tuple[int, int, int, int] | None:
    pads = [0, 0, 0, 0]
    for x in ks:
        if type(x).__name__ == "ZeroPadding2D":
            (t, b), (l, r) = x.padding
            pads = [pads[0] + t, pads[1] + b, pads[2] + l, pads[3] + r]
    if getattr(main, "padding", "valid") == "same":
        # TensorFlow's 'same': total = max((ceil(n/s)-1)*s + k - n, 0), the extra on the bottom/right
        extra = []
        for n, k, s in zip(in_hw, ksize, stride, strict=True):
            total = max((math.ceil(n / s) - 1) * s + k - n, 0)
            extra.append((total // 2, total - total // 2))
        pads = [pads[0] + extra[0][0], pads[1] + extra[0][1], pads[2] + extra[1][0], pads[3] + extra[1][1]]
    return tuple(pads)


def _pool_findings(layer, ks) -> list[Finding]:
    out = []
    label = "+".join(x.name for x in ks) or "-"
    main = next((x for x in ks if keras_kind(x) == "pool"), None)
    if main is None:
        return out
    method = layer.get("method", "max")
    cls = type(main).__name__
    k_method = {"MaxPooling2D": "max", "AveragePooling2D": "avg"}.get(cls, getattr(main, "method", "?"))
    if k_method != method:
        out.append(Finding("pooling method", layer.name, label, method, k_method, f"{method} pooling"))
    size = pair(layer.pool, "pool")
    if tuple(main.pool_size) != size:
        out.append(
            Finding(
                "pool size", layer.name, label, _fmt(size), _fmt(tuple(main.pool_size)), f"pool_size={size}"
            )
        )
    stride = pair(layer.stride, "stride")
    if tuple(main.strides) != stride:
        out.append(
            Finding("stride", layer.name, label, _fmt(stride), _fmt(tuple(main.strides)), f"strides={stride}")
        )
    pads = pad4(layer.pad)
    zero_pad = (
        any(type(x).__name__ == "ZeroPadding2D" for x in ks) or getattr(main, "padding", "valid") == "same"
    )
    if any(pads) and cls != "MatConvNetPooling":
        out.append(
            Finding(
                "pooling padding",
                layer.name,
                label,
                f"pad {_fmt(pads)} as clipped windows",
                "zero padding" if zero_pad else "no padding",
                "harness.translate.layers.MatConvNetPooling (max ignores padding; avg divides by the "
                "real cells)",
            )
        )
    elif not any(pads) and zero_pad:
        out.append(Finding("pooling padding", layer.name, label, "no padding", "padded", "padding='valid'"))
    return out


def _init_findings(net: Net, model) -> list[Finding]:
    """MatConvNet's init is a Gaussian with the std the filters show; compare Keras' initialiser."""
    out = []
    alignment = align(net, model)
    for pair_ in alignment.pairs:
        layer = net.layers[pair_.index]
        if layer.type != "conv" or not pair_.param_layer:
            continue
        f = np.asarray(layer.weights[0], dtype=np.float64)
        if f.size < 2:
            continue
        std = float(f.std())
        main = model.get_layer(pair_.param_layer)
        init = getattr(main, "kernel_initializer", None)
        if init is None:
            continue
        name = type(init).__name__
        cfg = init.get_config()
        kernel = main.kernel
        shape = tuple(kernel.shape)
        fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else shape[0]
        fan_out = int(np.prod(shape[:-2]) * shape[-1]) if len(shape) > 2 else shape[-1]
        if (
            name in ("RandomNormal", "TruncatedNormal")
            and abs(float(cfg.get("stddev", 0)) - std) <= 0.1 * std
        ):
            continue
        scale = {
            "GlorotUniform": ("uniform", math.sqrt(6 / (fan_in + fan_out))),
            "GlorotNormal": ("normal", math.sqrt(2 / (fan_in + fan_out))),
            "HeNormal": ("normal", math.sqrt(2 / fan_in)),
            "HeUniform": ("uniform", math.sqrt(6 / fan_in)),
            "RandomNormal": ("normal", float(cfg.get("stddev", 0.05))),
        }.get(name)
        kval = (
            name
            if scale is None
            else (
                f"{name}: {'uniform(-a, a), a' if scale[0] == 'uniform' else 'std'} = {scale[1]:.4g}"
                + (f" (std {scale[1] / math.sqrt(3):.4g})" if scale[0] == "uniform" else "")
            )
        )
        out.append(
            Finding(
                "initialisation",
                layer.name,
                main.name,
                f"Gaussian(0, {std:.4g}) (f * randn), biases 0",
                kval,
                f"kernel_initializer=RandomNormal(0.0, {std:.4g}), bias_initializer='zeros'",
            )
        )
    return out


def _train_opts(net: Net) -> dict:
    opts = dict(net.meta.get("trainOpts", {}) or {})
    return opts


def _schedule_text(lr) -> str:
    lr = np.asarray(lr, dtype=float).ravel()
    if lr.size == 0:
        return "none"
    runs = []
    start = 0
    for i in range(1, lr.size + 1):
        if i == lr.size or lr[i] != lr[start]:
            runs.append(f"{lr[start]:g} for {i - start} epoch{'s' if i - start > 1 else ''}")
            start = i
    return ", ".join(runs)


def _optimizer_findings(net: Net, optimizer, loss, metrics, batch_size, epochs) -> list[Finding]:
    out = []
    opts = _train_opts(net)
    momentum = float(opts.get("momentum", 0.9))
    wd = float(opts.get("weightDecay", 0.0005))
    lr = np.asarray(opts.get("learningRate", 0.001), dtype=float).ravel()
    solver = opts.get("solver") or "sgd"
    if optimizer is not None:
        cls = type(optimizer).__name__
        cfg = optimizer.get_config()
        mcn_desc = f"SGD with momentum {momentum:g}" if solver == "sgd" else str(solver)
        if solver == "sgd" and cls != "SGD" and "Matconvnet" not in cls and "MatConvNet" not in cls:
            out.append(
                Finding(
                    "optimizer",
                    "",
                    "optimizer",
                    mcn_desc,
                    cls,
                    f"keras.optimizers.SGD(momentum={momentum:g}) or harness.matconvnet_optimizer(net, opts)",
                )
            )
        elif cls == "SGD" and abs(float(cfg.get("momentum", 0.0)) - momentum) > 1e-12:
            out.append(
                Finding(
                    "momentum",
                    "",
                    "optimizer",
                    _fmt(momentum),
                    _fmt(float(cfg.get("momentum", 0.0))),
                    f"SGD(momentum={momentum:g})",
                )
            )
        if cls == "SGD":
            out.append(
                Finding(
                    "momentum form",
                    "",
                    "optimizer",
                    "lr multiplies the momentum buffer at use",
                    "lr folded into the buffer",
                    "identical at constant lr; parts when the lr changes "
                    "(harness.matconvnet_optimizer is exact)",
                )
            )
        if cls == "RMSprop":
            out.append(
                Finding(
                    "optimizer constants",
                    "",
                    "optimizer",
                    "(rmsprop solver: rho 0.99, eps 1e-8 outside sqrt)",
                    f"rho {cfg.get('rho')}, epsilon {cfg.get('epsilon')} inside sqrt",
                    "only relevant if MatConvNet used solver.rmsprop",
                )
            )
        kwd = cfg.get("weight_decay")
        if wd > 0 and not kwd:
            note = ""
            lrcfg = cfg.get("learning_rate")
            if isinstance(lrcfg, dict) and lrcfg.get("class_name") == "InverseTimeDecay":
                note = " (Keras 2's `decay` argument was a learning-rate decay, not weight decay)"
            out.append(
                Finding(
                    "weight decay",
                    "",
                    "optimizer",
                    f"{wd:g}, coupled (g += wd*w), biases included",
                    "none" + note,
                    f"add L2 regularisers with l2 = {wd / 2:g} on kernels and biases "
                    "(coupled), or harness.matconvnet_optimizer",
                )
            )
        elif wd > 0 and kwd:
            out.append(
                Finding(
                    "weight decay coupling",
                    "",
                    "optimizer",
                    f"{wd:g} coupled through the gradient",
                    f"weight_decay={kwd} (decoupled)",
                    f"L2(l2={wd / 2:g}) regularisers instead",
                )
            )
        lrcfg = cfg.get("learning_rate")
        if isinstance(lrcfg, dict):
            k_sched = f"{lrcfg.get('class_name')} {lrcfg.get('config', {})}"
        else:
            k_sched = f"constant {float(lrcfg):g}" if lrcfg is not None else "?"
        sched = _schedule_text(lr)
        if np.unique(lr).size > 1 and not (
            isinstance(lrcfg, dict) and "Piecewise" in str(lrcfg.get("class_name"))
        ):
            out.append(
                Finding(
                    "learning-rate schedule",
                    "",
                    "optimizer",
                    sched,
                    k_sched,
                    "keras.optimizers.schedules.PiecewiseConstantDecay at the epoch boundaries (in steps)",
                )
            )
        elif np.unique(lr).size == 1 and not isinstance(lrcfg, dict) and abs(float(lrcfg) - lr[0]) > 1e-15:
            out.append(
                Finding(
                    "learning rate",
                    "",
                    "optimizer",
                    _fmt(float(lr[0])),
                    _fmt(float(lrcfg)),
                    f"learning_rate={lr[0]:g}",
                )
            )
        # per-parameter multipliers (conv biases [1 2] in cnn_mnist_init)
        multipliers = {
            tuple(np.asarray(l.learning_rate, dtype=float).ravel()[:2])
            for l in net.layers
            if l.type == "conv" and l.has("learning_rate")
        }
        if any(len(m) > 1 and m[1] != m[0] for m in multipliers) and "MatConvNet" not in cls:
            out.append(
                Finding(
                    "bias learning-rate multiplier",
                    "",
                    "optimizer",
                    "learningRate " + " / ".join(_fmt(list(m)) for m in sorted(multipliers)),
                    "one learning rate for every variable",
                    "harness.matconvnet_optimizer (per-variable multipliers)",
                )
            )
    if loss is not None:
        lname = loss if isinstance(loss, str) else getattr(loss, "name", type(loss).__name__)
        if lname in ("categorical_crossentropy", "sparse_categorical_crossentropy"):
            out.append(
                Finding(
                    "loss reduction",
                    net.layers[-1].name,
                    "loss",
                    "summed over pixels, divided by the batch size (master) or summed (beta25)",
                    f"{lname}: mean over the batch and over pixels",
                    "identical for 1x1 outputs; for spatial outputs multiply by H*W",
                )
            )
            if lname == "categorical_crossentropy":
                out.append(
                    Finding(
                        "label base",
                        net.layers[-1].name,
                        "loss",
                        "1-based class labels, 0 = ignore",
                        "one-hot targets",
                        "one-hot of (label - 1); drop or zero-weight label 0",
                    )
                )
    mcn_batch = opts.get("batchSize")
    if mcn_batch is not None and batch_size is not None and int(batch_size) != int(mcn_batch):
        out.append(
            Finding(
                "batch size",
                "",
                "fit",
                str(int(mcn_batch)),
                str(int(batch_size)),
                f"model.fit(..., batch_size={int(mcn_batch)})",
            )
        )
    elif mcn_batch is not None and batch_size is None:
        out.append(
            Finding(
                "batch size",
                "",
                "fit",
                str(int(mcn_batch)),
                "Keras' default 32 unless passed to fit",
                f"model.fit(..., batch_size={int(mcn_batch)})",
            )
        )
    mcn_epochs = opts.get("numEpochs")
    if mcn_epochs is not None and epochs is not None and int(epochs) != int(mcn_epochs):
        out.append(
            Finding("epochs", "", "fit", str(int(mcn_epochs)), str(int(epochs)), f"epochs={int(mcn_epochs)}")
        )
    if metrics and any(m in ("binary_accuracy",) for m in metrics):
        out.append(
            Finding(
                "metric",
                "",
                "metrics",
                "top-1 error (error_multiclass)",
                "binary_accuracy",
                "'accuracy' (categorical) for a softmax over classes",
            )
        )
    return out


def diagnose(
    net: Net,
    model,
    *,
    optimizer=None,
    loss=None,
    metrics=None,
    batch_size: int | None = None,
    epochs: int | None = None,
    input_size=None,
) -> list[Finding]:
    """Static findings: per-layer configuration, initialisation, and the training set-up
    (``optimizer``/``loss``/``metrics`` default to the compiled model's)."""
    net = vl_simplenn_tidy(net)
    size = input_size if input_size is not None else net.meta.get("inputSize")
    if size is None:
        size = tuple(int(s) for s in model.inputs[0].shape[1:])
    h, w, c = (int(v) for v in np.asarray(size, dtype=float).ravel()[:3])
    findings = _layer_findings(net, model, _shapes(net, (h, w, c)))
    findings += _init_findings(net, model)
    optimizer = optimizer if optimizer is not None else getattr(model, "optimizer", None)
    if loss is None:
        loss = getattr(model, "loss", None)
    if metrics is None:
        try:
            metrics = (model.get_compile_config() or {}).get("metrics")
        except Exception:  # an uncompiled model has no compile config
            metrics = None
        metrics = [m if isinstance(m, str) else str(m) for m in (metrics or [])]
    findings += _optimizer_findings(net, optimizer, loss, metrics, batch_size, epochs)
    return findings


# --------------------------------------------------------------------------- cause probes


def _alternatives(layer, index: int, keras_main) -> list[tuple[str, Any, Any]]:
    """(description, changed MatConvNet layer, input transform or None) to re-run a
    divergent layer with; each is a common porting mistake."""
    alts: list[tuple[str, Any, Any]] = []

    def changed(**fields):
        new = layer.copy()
        for k, v in fields.items():
            if k == "weights0":
                new.weights = [v, *new.weights[1:]]
            else:
                setattr(new, k, v)
        return new

    t = layer.type
    if t in ("conv", "pool"):
        pads = pad4(layer.pad)
        if any(pads):
            swapped = [pads[1], pads[0], pads[3], pads[2]]
            if swapped != list(pads):
                alts.append(
                    ("the padding sides are swapped ([B T R L] for [T B L R])", changed(pad=swapped), None)
                )
    if t == "conv" and not is_empty(layer.weights[0]):
        f = np.asarray(layer.weights[0])
        f = f.reshape(f.shape + (1,) * (4 - f.ndim))
        alts.append(
            (
                "the kernel is flipped spatially (convolution instead of correlation)",
                changed(weights0=f[::-1, ::-1].copy()),
                None,
            )
        )
        if f.shape[0] == f.shape[1]:
            alts.append(
                (
                    "the kernel is transposed (FH <-> FW)",
                    changed(weights0=f.transpose(1, 0, 2, 3).copy()),
                    None,
                )
            )
        if f.shape[0] * f.shape[1] > 1 and type(keras_main).__name__ == "Dense":
            colmajor = f.reshape(-1, f.shape[3], order="F").reshape(f.shape)
            alts.append(
                (
                    "the Dense kernel holds MATLAB's column-major F(:) (flatten order)",
                    changed(weights0=colmajor),
                    None,
                )
            )
        if index == 0:
            alts.append(
                ("the input images are transposed (H <-> W, MATLAB column-major images)", layer, "transpose")
            )
    if t == "pool":
        pads = pad4(layer.pad)
        if any(pads):
            pt, pb, pl, pr = pads
            alts.append(
                (
                    "the pooling is zero-padded (ZeroPadding2D + stock pooling) instead of clipped windows",
                    changed(pad=0),
                    ("zeropad", (pt, pb, pl, pr)),
                )
            )
        other = "avg" if layer.get("method", "max") == "max" else "max"
        alts.append((f"the pooling method is {other}", changed(method=other), None))
    if t == "bnorm":
        for eps in (1e-3, 1e-4):
            alts.append((f"bnorm epsilon is {eps:g} (Keras' default is 1e-3)", changed(epsilon=eps), None))
    if t == "relu":
        from harness.mcn.net import Layer

        alts.append(("the ReLU is missing in Keras", Layer("dropout", layer.name, rate=0.0), "identity"))
        for leak in (0.01, 0.2, 0.3):
            alts.append((f"the ReLU leaks with slope {leak:g}", changed(leak=leak), None))
    return alts


def probe_causes(
    net: Net, model, report, x, labels, *, mode: str = "normal", dialect: str = "master", weights: str = "net"
) -> list[str]:
    """Re-run the report's culprit layer with the usual porting mistakes and return
    "matches if ..." for each alternative that reproduces the Keras side."""
    from harness.equivalence.run import _cast_net, _Weights, with_dtype
    from harness.equivalence.tolerance import tolerance_for
    from harness.mcn.simplenn import vl_simplenn
    from harness.translate.weights import to_hwcn, to_nhwc

    fd = report.first_divergence
    if fd is None:
        return []
    net = _cast_net(vl_simplenn_tidy(net), np.float64)
    x = np.asarray(x, dtype=np.float64)
    x = x.reshape(x.shape + (1,) * (4 - x.ndim))
    tol = tolerance_for("float64").forward
    order = [l.name for l in net.layers]
    i = order.index(fd["culprit"]) if fd["culprit"] in order else -1
    if i < 0:
        return []
    layer = net.layers[i]
    res = vl_simplenn(
        net,
        x,
        None,
        labels,
        mode="test" if mode == "test" else "normal",
        dialect=dialect,
        lrn_exact=True,
        rng=np.random.default_rng(0),
    )
    out: list[str] = []
    if layer.type in ("softmaxloss", "loss"):
        keras_loss = next((r.keras_value for r in report.rows if r.tensor == "loss"), None)
        ref_loss = next((r.ref_value for r in report.rows if r.tensor == "loss"), None)
        if keras_loss is None or ref_loss is None:
            return []
        scores = res[i].x
        lab = np.asarray(labels, dtype=float)
        n = scores.shape[3]
        cands = {
            "the scores go through softmax twice (a softmax layer before a softmax loss)": _ce(
                _softmax(scores), lab
            ),
            "the labels are read 0-based (shifted by one class)": _ce(scores, lab, shift=True),
            "the loss is the batch sum (MatConvNet beta25)": _ce(scores, lab) * n,
            "the loss is the batch mean (MatConvNet master)": _ce(scores, lab),
            "the loss is averaged over pixels too (Keras' cross-entropy)": _ce(scores, lab)
            / (scores.shape[0] * scores.shape[1]),
        }
        for text, value in cands.items():
            if abs(value - ref_loss) > tol * max(abs(ref_loss), 1e-300) and abs(
                value - keras_loss
            ) <= 1e-9 * max(abs(keras_loss), 1e-300):
                out.append(f"matches if {text}")
        return out
    model64 = with_dtype(model, "float64")
    alignment = align(net, model64)
    _Weights(net, model64, alignment, "float64", load=weights == "net")
    pair_ = alignment.pairs[i]
    h = to_nhwc(res[i].x)
    for name in pair_.keras:
        kl = model64.get_layer(name)
        if keras_kind(kl) == "bnorm":
            h = kl(h, training=mode == "normal")
        else:
            h = kl(h)
    keras_out = to_hwcn(np.asarray(h))
    main = model64.get_layer(pair_.param_layer) if pair_.param_layer else None
    for text, alt_layer, transform in _alternatives(layer, i, main):
        xin = res[i].x
        if transform == "transpose":
            if xin.shape[0] != xin.shape[1]:
                continue
            xin = xin.transpose(1, 0, 2, 3)
        elif isinstance(transform, tuple) and transform[0] == "zeropad":
            pt, pb, pl, pr = transform[1]
            xin = np.pad(xin, ((pt, pb), (pl, pr), (0, 0), (0, 0)))
        if transform == "identity":
            alt = xin
        else:
            try:
                alt = vl_simplenn(
                    Net([alt_layer]),
                    xin,
                    mode="test" if mode == "test" else "normal",
                    dialect=dialect,
                    lrn_exact=True,
                )[-1].x
            except Exception:  # an alternative that does not even run is not the cause
                continue
        if alt.shape == keras_out.shape:
            scale = max(float(np.max(np.abs(alt))), 1e-300)
            if float(np.max(np.abs(alt - keras_out))) <= 1e-8 * scale:
                out.append(f"matches if {text}")
    return out


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=2, keepdims=True))
    return e / e.sum(axis=2, keepdims=True)


def _ce(scores: np.ndarray, labels: np.ndarray, shift: bool = False) -> float:
    """MatConvNet master softmaxloss of 1 x N labels (label 0 ignored); ``shift`` reads
    the labels as 0-based class indices."""
    n = scores.shape[3]
    lab = np.asarray(labels, dtype=float).reshape(-1)[:n].astype(int)
    p = _softmax(scores)
    total = 0.0
    for j in range(n):
        c = lab[j] + 1 if shift else lab[j]
        if c <= 0 or c > scores.shape[2]:
            continue
        total -= float(np.log(p[:, :, c - 1, j]).sum())
    return total / n
