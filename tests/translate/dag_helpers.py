"""The checks of the DagNN translation tests: a ``to_keras_dag`` model run, and its input
derivatives taken, against the reference ``DagNet.eval`` (MatConvNet's layout on both sides).

The reference's derivative of the sum of the outputs is the sum, over the outputs, of one
backward pass seeded with ones on that output alone: a seed on a var that other layers read
is overwritten by their derivative in DagNN.eval (a derOutput is meant for a var nothing
reads), so one pass seeding every output would not be that derivative.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from harness.mcn.dagnn import DagNet
from harness.translate import dag_inputs, dag_outputs, to_hwcn, to_keras_dag, to_nhwc

# normwise, max|keras - want| <= TOL * max|want|: the Keras model against the reference in float64
TOL = 1e-10


def rel(got: Any, want: Any) -> float:
    """``max|got - want| / max|want|``, ``got`` read in ``want``'s shape (padded to 4-D)."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.size == want.size, f"{got.shape} vs {want.shape}"
    want4 = want.reshape(want.shape + (1,) * (4 - want.ndim))
    got4 = got.reshape(want4.shape)
    return float(np.max(np.abs(got4 - want4)) / max(float(np.max(np.abs(want4))), 1e-300))


def as_list(y: Any) -> list:
    """A model's output(s) as a list."""
    return list(y) if isinstance(y, list | tuple) else [y]


def keras_call(net: DagNet, model, inputs: dict[str, np.ndarray], training: bool) -> list[np.ndarray]:
    """The outputs of ``model`` on the net's ``inputs`` (MatConvNet layout in and out)."""
    xs = [to_nhwc(inputs[v].reshape(inputs[v].shape + (1,) * (4 - inputs[v].ndim))) for v in dag_inputs(net)]
    ys = model(xs[0] if len(xs) == 1 else xs, training=training)
    return [to_hwcn(np.asarray(y)) for y in as_list(ys)]


def keras_grads(net: DagNet, model, inputs: dict[str, np.ndarray], training: bool) -> dict[str, Any]:
    """d(sum of every model output)/d(every model input), MatConvNet layout (None: no path)."""
    names = dag_inputs(net)
    xs = [tf.constant(to_nhwc(inputs[v])) for v in names]
    with tf.GradientTape() as tape:
        tape.watch(xs)
        ys = as_list(model(xs[0] if len(xs) == 1 else xs, training=training))
        total = tf.add_n([tf.reduce_sum(y) for y in ys])
    grads = tape.gradient(total, xs)
    return {v: None if g is None else to_hwcn(g.numpy()) for v, g in zip(names, grads, strict=True)}


def reference(net: DagNet, inputs: dict[str, np.ndarray], mode: str) -> list[np.ndarray]:
    """The values of ``dag_outputs(net)`` after ``net.eval`` (exact LRN power)."""
    net.reset()
    net.eval(inputs, mode=mode, lrn_exact=True)
    return [net.var(v).value for v in dag_outputs(net)]


def reference_grads(net: DagNet, inputs: dict[str, np.ndarray], mode: str) -> dict[str, Any]:
    """The sum over the outputs of a backward pass seeded with ones on that output alone."""
    total: dict[str, Any] = {v: None for v in dag_inputs(net)}
    for out in dag_outputs(net):
        net.reset()
        net.eval(inputs, mode=mode, lrn_exact=True)
        seed = np.ones_like(net.var(out).value)
        net.reset()
        net.eval(inputs, {out: seed}, mode=mode, lrn_exact=True)
        for v in total:
            d = net.var(v).der
            if d is not None:
                total[v] = d if total[v] is None else total[v] + d
    return total


def check(net: DagNet, inputs: dict[str, np.ndarray], *, mode: str = "test", backward: bool = True, **kw):
    """The Keras model of ``net`` against ``DagNet.eval``: every output, and the input derivatives."""
    model = to_keras_dag(net, **kw)
    training = mode == "normal"
    got = keras_call(net, model, inputs, training)
    want = reference(net, inputs, mode)
    assert len(got) == len(want) == len(dag_outputs(net))
    for static, g in zip(
        as_list(model.output_shape) if len(got) > 1 else [model.output_shape], got, strict=True
    ):
        actual = to_nhwc(g).shape
        assert all(s is None or s == a for s, a in zip(static[1:], actual[1:], strict=True)), (static, actual)
    for name, g, w in zip(dag_outputs(net), got, want, strict=True):
        assert rel(g, w) < TOL, f"output {name}: {rel(g, w):.3g}"
    if backward:
        got_d = keras_grads(net, model, inputs, training)
        want_d = reference_grads(net, inputs, mode)
        for name in dag_inputs(net):
            if want_d[name] is None:
                assert got_d[name] is None or not np.any(got_d[name]), name
                continue
            assert rel(got_d[name], want_d[name]) < TOL, f"d/d{name}: {rel(got_d[name], want_d[name]):.3g}"
    return model
