"""The ``mcn-harness reference`` command: a net through the MatConvNet reference alone.

A simplenn net runs through ``vl_simplenn`` on the probe batch (random, or ``--images``);
a DagNN net through ``DagNet.eval`` on random inputs (or ``--images`` into its one image
input and labels into its Loss layers). Both print a table of every layer's output size
and largest value and derivative, and the top-1 error when the batch has labels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from harness.io.specs import (
    InputError,
    input_size,
    load_mcn_spec,
    num_classes,
    probe_batch,
    resolve_input_size,
    with_input_size,
)
from harness.io.text import safe_text
from harness.mcn import McnError, vl_simplenn
from harness.mcn.net import Net

__all__ = ["probe_images", "run_reference", "top1_error"]


@contextlib.contextmanager
def _naming_images(path) -> Iterator[None]:
    """Errors while reading ``--images`` name that option (not the --mcn file)."""
    try:
        yield
    except McnError as err:
        text = str(err)
        if text.startswith("--"):
            raise
        text = text.removeprefix(f"{path}: ")
        raise InputError(f"--images {str(path)!r}: {text}") from None


def probe_images(net: Net, args):
    """``(x, labels, notes)`` from ``--images`` (None when not given)."""
    if not getattr(args, "images", None):
        return None
    from harness.io.images import load_probe_images

    has_loss = bool(net.layers) and net.layers[-1].type in ("softmaxloss", "loss")
    with _naming_images(args.images):
        return load_probe_images(
            args.images,
            input_size(net),
            args.batch,
            normalization=net.meta.get("normalization"),
            classes=num_classes(net) if has_loss else None,
            seed=args.seed,
        )


def run_reference(args) -> int:
    """``mcn-harness reference``: the net's table (and top-1 error with labelled images)."""
    from harness.mcn.dagnn import DagNet

    net = load_mcn_spec(args.mcn, "--mcn", Path.cwd(), upto=args.upto, dagnn=True)
    if isinstance(net, DagNet):
        return _reference_dag(net, args)
    net = with_input_size(net, *resolve_input_size(net, None, args.input_size))
    dtype = np.float64 if args.dtype == "float64" else np.float32
    images = probe_images(net, args)
    if images is not None:
        x, labels = images.x, images.labels
        net.notes = [*net.notes, *images.notes]
    else:
        x, labels = probe_batch(net, args.batch, seed=args.seed)
    res = vl_simplenn(
        net,
        x.astype(dtype),
        1.0 if labels is not None else None,
        labels,
        mode=args.mode,
        dialect=args.dialect,
        rng=np.random.default_rng(args.seed),
    )
    print(
        f"MatConvNet reference: {len(net.layers)} layers, batch {x.shape[3]}, {args.dtype}, "
        f"mode {args.mode}, dialect {args.dialect}"
    )
    for note in net.notes:
        print(f"note: {safe_text(note)}")
    print(f"{'#':>3}  {'layer':<12} {'type':<12} {'output (H x W x C)':<20} {'|x|max':>10} {'|dzdx|max':>10}")
    for i, layer in enumerate(net.layers):
        y = res[i + 1].x
        shape = " x ".join(str(s) for s in np.shape(y)[:3]) if np.ndim(y) == 4 else "scalar"
        dx = res[i].dzdx
        dmax = "" if dx is None else f"{float(np.max(np.abs(dx), initial=0.0)):>10.3g}"
        print(
            f"{i + 1:>3}  {safe_text(layer.name):<12.12} {safe_text(layer.type):<12.12} {shape:<20} "
            f"{float(np.max(np.abs(y), initial=0.0)):>10.3g} {dmax}"
        )
    if images is not None and labels is not None and len(res) >= 2:
        print(top1_error(res[-2].x, labels, "the net's scores entering its loss"))
    return 0


def top1_error(scores, labels, what: str) -> str:
    """The top-1 error of ``scores`` (H x W x K x N; the class with the largest score at
    each position) against 1-based ``labels`` (0: ignored)."""
    s = np.asarray(scores, dtype=np.float64)
    s = s.reshape(s.shape + (1,) * (4 - s.ndim))
    lab = np.asarray(labels, dtype=np.float64)
    lab = np.broadcast_to(
        lab.reshape(1, 1, -1) if lab.size == s.shape[3] else lab[..., 0, :],
        (s.shape[0], s.shape[1], s.shape[3]),
    )
    predicted = np.argmax(s, axis=2) + 1
    known = lab > 0
    wrong = int(np.sum((predicted != lab) & known))
    total = int(np.sum(known))
    rate = 100.0 * wrong / max(total, 1)
    return f"top-1 error on the batch: {rate:.2f}% ({wrong} of {total} labelled positions; {what})"


def _reference_dag(net, args) -> int:
    """``reference`` on a DagNN network: random inputs of ``--input-size`` (default 32 x 32,
    the depth of the filters that read each input), random labels for the Loss layers,
    forward and backward (derivative 1 at each loss, ones at the other outputs)."""
    from harness.mcn.geometry import DEFAULT_SPATIAL

    if args.upto:
        raise InputError("--upto applies to simplenn networks only so far")
    rng = np.random.RandomState(args.seed)
    dtype = np.float64 if args.dtype == "float64" else np.float32
    losses = [l for l in net.layers if l.type == "dagnn.Loss"]
    label_vars = {l.inputs[1] for l in losses if len(l.inputs) > 1}
    inputs = {}
    for name in net.get_inputs():
        if name in label_vars:
            continue
        depth = 1
        for layer in net.layers:
            if name in layer.inputs and layer.type in ("dagnn.Conv", "dagnn.ConvTranspose") and layer.params:
                f = np.asarray(net.param(layer.params[0]).value)
                f = f.reshape(f.shape + (1,) * (4 - f.ndim))
                depth = int(f.shape[2] if layer.type == "dagnn.Conv" else f.shape[3])
                break
        h, w, c = args.input_size if args.input_size else (DEFAULT_SPATIAL, DEFAULT_SPATIAL, depth)
        inputs[name] = rng.randn(h, w, c, args.batch).astype(dtype)
    given = None
    if args.images:
        given = _dag_images(net, inputs, label_vars, args)
        inputs.update({k: v.astype(dtype) if k not in label_vars else v for k, v in given.items()})
    net.eval(inputs, mode="test")  # the loss inputs' sizes, for the labels
    der_outputs = {}
    for layer in losses:
        scores = np.asarray(net.var(layer.inputs[0]).value)
        scores = scores.reshape(scores.shape + (1,) * (4 - scores.ndim))
        if len(layer.inputs) > 1 and layer.inputs[1] not in inputs:
            labels = rng.randint(1, scores.shape[2] + 1, size=(*scores.shape[:2], 1, scores.shape[3]))
            inputs[layer.inputs[1]] = labels.astype(np.float64)
        der_outputs[layer.outputs[0]] = 1.0
    if not der_outputs:
        der_outputs = {o: np.ones_like(np.asarray(net.var(o).value)) for o in net.get_outputs()}
    net.reset()
    net.eval(inputs, der_outputs, mode=args.mode, rng=np.random.default_rng(args.seed))
    print(
        f"MatConvNet reference (DagNN): {len(net.layers)} layers, {len(net.vars)} vars, "
        f"{len(net.params)} params, batch {args.batch}, {args.dtype}, mode {args.mode}"
    )
    for note in net.notes:
        print(f"note: {safe_text(note)}")
    for layer in losses if given is not None else []:
        if len(layer.inputs) > 1 and layer.inputs[1] in given:
            scores = net.var(layer.inputs[0]).value
            print(
                top1_error(
                    scores, given[layer.inputs[1]], f"'{layer.inputs[0]}' entering loss '{layer.name}'"
                )
            )
    shown = ", ".join(f"{k} {' x '.join(map(str, np.shape(v)[:3]))}" for k, v in inputs.items())
    print(f"inputs: {safe_text(shown)}")
    head = f"{'#':>3}  {'layer':<16} {'type':<18} {'output':<14} {'(H x W x C)':<16}"
    print(f"{head} {'|x|max':>10} {'|dzdx|max':>10}")
    for k, i in enumerate(net.execution_order()):
        layer = net.layers[i]
        var = net.var(layer.outputs[0])
        y = np.asarray(var.value) if var.value is not None else np.zeros(0)
        shape = " x ".join(str(d) for d in (y.shape + (1,) * (3 - y.ndim))[:3]) if y.size > 1 else "scalar"
        d = "" if var.der is None else f"{float(np.max(np.abs(var.der), initial=0.0)):>10.3g}"
        print(
            f"{k + 1:>3}  {safe_text(layer.name):<16.16} {safe_text(layer.type):<18.18} "
            f"{safe_text(var.name):<14.14} {shape:<16} {float(np.max(np.abs(y), initial=0.0)):>10.3g} {d}"
        )
    return 0


def _dag_images(net, inputs: dict, label_vars: set, args) -> dict:
    """``--images`` for a DagNN network: an imdb's images (test set first) into its one
    image input, the imdb's labels into the label input of its Loss layers."""
    from harness.io.images import load_probe_images

    if len(inputs) != 1:
        raise InputError(f"--images: the network has {len(inputs)} image inputs; --images fills one")
    ((name, x),) = inputs.items()
    hwc = tuple(int(d) for d in np.shape(x)[:3])
    if str(args.images).lower().endswith(".mat") and not args.input_size:
        from harness.io.imdb import load_imdb

        with _naming_images(args.images):
            hwc = tuple(int(d) for d in load_imdb(args.images, finite=False).images.shape[:3])
    with _naming_images(args.images):
        got = load_probe_images(
            args.images,
            hwc,
            args.batch,
            normalization=net.meta.get("normalization") if isinstance(net.meta, dict) else None,
            classes=10**9 if label_vars else None,  # any class: a label past the scores counts as wrong
            seed=args.seed,
        )
    net.notes = [*net.notes, *got.notes]
    out = {name: got.x}
    for var in label_vars:
        if got.labels is not None:
            out[var] = got.labels
    return out
