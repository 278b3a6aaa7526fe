"""The precision a comparison runs in, and the float32 roundings it forgives.

A comparison runs in float64 where it can: rounding noise then stays near 1e-12 and any
semantic difference stands far above it. Most ports compute in float32, so the model is
copied to float64 first (``float64_copy``), in whatever style it is written:

- Sequential and functional models: ``clone_model`` with every layer rebuilt in float64
  (a ``Lambda`` rebuilt around the same function, Keras operations such as
  ``keras.ops.relu`` kept as they are);
- subclassed models: ``type(model).from_config(config)`` built under float64 defaults;

then the weights are copied, and the copy must reproduce the original model's output on
the batch (each output of a model of several) within float32 tolerance. When any step
fails (a TensorFlow op without a float64 kernel such as
``tf.nn.local_response_normalization``, a constructor that cannot be serialised, a copy
that computes something else), the model is compared in its own dtype at float32
tolerance, with a note that says why; never a crash.

Even in float64 a port may hold constants rounded to float32 (TensorFlow's LeakyRelu
stores its slope as a 32-bit float; a port's own weight transfer stores float32 values).
``rounded_reference_net`` gives the net those roundings, so that a row that matches
only it is explained by float32 rounding: a note, not a divergence.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from harness.mcn.net import Net

if TYPE_CHECKING:  # pragma: no cover
    import keras

__all__ = ["comparison_model", "float64_copy", "model_dtype", "rounded_reference_net"]

# how close the float64 copy must be to the float32 model (normwise, on the output)
COPY_TOLERANCE = 1e-4


def model_dtype(model) -> str:
    """The dtype the model computes in: float64 only if every layer does."""
    dtypes = {
        getattr(layer, "compute_dtype", None)
        for layer in _all_layers(model)
        if type(layer).__name__ != "InputLayer"
    }
    dtypes.discard(None)
    return "float64" if dtypes == {"float64"} else "float32"


def _all_layers(model) -> list:
    """Every Keras layer below ``model`` (its own ``layers`` recursively)."""
    out, todo, seen = [], [model], set()
    while todo:
        layer = todo.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        out.append(layer)
        todo.extend(getattr(layer, "layers", None) or [])
        todo.extend(getattr(layer, "_layers", None) or [])
    return out[1:]


class _Float64:
    """float64 defaults for layers built inside the block (restored after)."""

    def __enter__(self):
        import keras

        self.floatx = keras.config.floatx()
        self.policy = keras.config.dtype_policy()
        keras.config.set_floatx("float64")
        keras.config.set_dtype_policy("float64")

    def __exit__(self, *exc):
        import keras

        keras.config.set_floatx(self.floatx)
        keras.config.set_dtype_policy(self.policy)
        return False


def _clone_layer(layer):
    import keras

    if not isinstance(layer, keras.layers.Layer):
        return layer  # a Keras operation (keras.ops.relu in a functional graph) has no dtype
    if isinstance(layer, keras.layers.Lambda):
        return keras.layers.Lambda(
            layer.function, name=layer.name, arguments=dict(layer.arguments or {}), dtype="float64"
        )
    config = dict(layer.get_config())
    config["dtype"] = "float64"
    return layer.__class__.from_config(config)


def _copy(model, x64):
    import keras
    from keras.src.models.functional import Functional

    several = isinstance(x64, list)
    head = [x[:1] for x in x64] if several else x64[:1]
    if isinstance(model, keras.Sequential | Functional):
        inputs = [keras.Input(tuple(t.shape[1:]), dtype="float64") for t in model.inputs]
        with _Float64():
            copy = keras.models.clone_model(
                model, clone_function=_clone_layer, input_tensors=inputs if several else inputs[0]
            )
            copy(head)  # builds every layer, or raises what stops float64 (an op without a kernel)
    else:
        config = {k: v for k, v in model.get_config().items() if k != "dtype"}
        with _Float64():
            copy = type(model).from_config(config)
            copy(head)
    copy.set_weights([np.asarray(w, dtype=np.float64) for w in model.get_weights()])
    if model_dtype(copy) != "float64":
        raise TypeError("some of its layers still compute in float32 after copying")
    return copy


def _arrays(out) -> list[np.ndarray]:
    """A model's output (a tensor, or a list or dict of them) as float64 arrays."""
    values = (
        list(out.values()) if isinstance(out, dict) else list(out) if isinstance(out, list | tuple) else [out]
    )
    return [np.asarray(v, dtype=np.float64) for v in values]


def float64_copy(model: keras.Model, x_nhwc) -> tuple[keras.Model | None, str]:
    """``(copy, "")``: a float64 copy of ``model`` that reproduces its output (every one
    of its outputs) on ``x_nhwc`` (an array, or a list of arrays for a model of several
    inputs); or ``(None, why)`` when there is none."""
    if model_dtype(model) == "float64":
        return model, ""
    several = isinstance(x_nhwc, list | tuple)
    xs = list(x_nhwc) if several else [x_nhwc]
    x64 = [np.asarray(x, dtype=np.float64) for x in xs]
    x32 = [np.asarray(x, dtype=np.float32) for x in xs]
    try:
        copy = _copy(model, x64 if several else x64[0])
        gots = _arrays(copy(x64 if several else x64[0], training=False))
        wants = _arrays(model(x32 if several else x32[0], training=False))
    except Exception as err:  # any failure of the copy means: compare in the model's own dtype
        return None, _reason(err)
    if len(gots) != len(wants):
        return None, f"the float64 copy returns {len(gots)} outputs, the model {len(wants)}"
    for got, want in zip(gots, wants, strict=True):
        if got.shape != want.shape:
            return None, f"the float64 copy's output has shape {got.shape}, the model's {want.shape}"
        # a model that computes NaN or Inf (a non-finite weight) is reproduced when the copy
        # computes them at the same places: the comparison then reports them
        if not np.array_equal(np.isfinite(got), np.isfinite(want)):
            return None, "the float64 copy's output is not finite where the model's is, or the reverse"
        finite = np.isfinite(want)
        got, want = got[finite], want[finite]
        scale = max(float(np.max(np.abs(want), initial=0.0)), 1e-300)
        rel = float(np.max(np.abs(got - want), initial=0.0)) / scale
        if not np.isfinite(rel) or rel > COPY_TOLERANCE:
            return (
                None,
                f"the float64 copy does not reproduce the model's output (relative difference {rel:.2e})",
            )
    return copy, ""


def comparison_model(model: keras.Model, x_nhwc, dtype: str) -> tuple[keras.Model, str, list[str]]:
    """``(model to run, dtype it runs in, notes)`` for a comparison asked in ``dtype``: in
    float64 the float64 copy of ``model`` (``float64_copy``), or the model itself in
    float32 with a note saying why it could not be copied; in float32 the model itself."""
    if dtype != "float64":
        return model, dtype, []
    copy, why = float64_copy(model, x_nhwc)
    if copy is None:
        return (
            model,
            "float32",
            [
                f"compared in float32, the model's own precision, at float32 tolerance: it could not be "
                f"copied to float64 ({why})"
            ],
        )
    return copy, dtype, []


def _reason(err: Exception) -> str:
    """One line on why copying failed: Keras wraps the error of a layer's call in
    "Exception encountered when calling ...", whose next line says what happened."""
    import re

    lines = [re.sub(r"\x1b\[[0-9;]*m", "", l).strip() for l in str(err).splitlines()]
    lines = [l for l in lines if l]
    wrapped = bool(lines) and lines[0].startswith("Exception encountered")
    text = " ".join(lines[:2]) if wrapped else (lines or [""])[0]
    return f"{type(err).__name__}: {text[:300]}"


def rounded_reference_net(net: Net, keras_net: Net | None = None) -> Net:
    """``net`` with the roundings a float32 port holds even when it computes in float64:
    every scalar constant (ReLU leak, LRN parameters, bnorm epsilon) rounded to float32,
    and, given ``keras_net`` (the parameters the model holds, read back in MatConvNet's
    layout), those parameters."""
    out = (keras_net if keras_net is not None else net).copy()

    def f32(value):
        return np.asarray(value, dtype=np.float64).astype(np.float32).astype(np.float64)

    for layer in out.layers:
        if layer.type == "relu" and layer.get("leak") is not None:
            layer.leak = f32(layer.leak)
        elif layer.type in ("lrn", "normalize") and layer.get("param") is not None:
            layer.param = f32(layer.param)
        elif layer.type == "bnorm" and layer.get("epsilon") is not None:
            layer.epsilon = f32(layer.epsilon)
    return out
