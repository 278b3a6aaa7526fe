"""Observe the user's real Keras call: every tensor it computes, and its derivatives.

The model is called as the user calls it, ``model(x, training=...)``, never rebuilt or
chained layer by layer (a model of several inputs with the list of them, in its input
order; with ``several_outputs`` it may return a list of outputs, which the loss gets).
During that one call:

- ``keras.src.ops.operation.Operation.__call__`` is wrapped: every Keras layer and
  Keras operation call at any depth (Sequential, functional graphs, layers inside a
  subclass's ``call()``, ``Lambda``) is seen with its output and the stack of
  operations running around it;
- a TensorFlow op callback sees every eager TensorFlow op, including the ``keras.ops``
  and ``tf.*`` calls of a subclass's ``call()`` and the ops inside a layer (a Conv2D's
  ``BiasAdd`` before its fused activation);
- ``tf.function`` is switched to eager execution, so that recorded tensors are real
  values on the tape.

Every floating-point tensor with the batch as its first axis is kept (a ``Capture``), in
the order it was computed, and ``tape.gradient`` gives the loss's derivative with
respect to each of them, the input and the weights in one backward pass. A Dropout
called in training mode applies the mask it is handed (the reference's), so both sides
drop the same units. Facts behind this design: docs/OBSERVING_KERAS.md.

Both hooks are private Keras/TensorFlow API (pinned in pyproject.toml; one test per hook
in tests/equivalence/test_observe.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from harness.mcn.options import McnError

__all__ = ["Capture", "Discovery", "Observation", "called_layers", "discover", "observe"]

# TensorFlow ops whose outputs are never a layer's result (variables, shapes, random state)
_SKIP_OPS = {
    "ReadVariableOp",
    "VarHandleOp",
    "AssignVariableOp",
    "AssignAddVariableOp",
    "AssignSubVariableOp",
    "Const",
    "Shape",
    "ShapeN",
    "Size",
    "Rank",
    "StatelessRandomUniformV2",
    "StatelessRandomGetKeyCounter",
    "RandomUniform",
    "Fill",
    "ZerosLike",
    "OnesLike",
}


@dataclass
class Capture:
    """One tensor the model computed, in execution order."""

    tensor: Any  # the eager TensorFlow tensor (on the tape)
    label: str  # "conv1" (a layer's output), "conv1:BiasAdd" (an op inside it), "net:Relu"
    op_type: str  # the TensorFlow op type or the Keras class that produced it
    layer: Any = None  # the Keras operation whose output this is (None: an op inside one)
    enclosing: tuple = ()  # the Keras layers running around it, outermost first
    inside: str | None = None  # the leaf Keras layer it was computed inside (None: its own)


@dataclass
class Observation:
    """What one observed call computed."""

    output: Any  # the model's own output tensor (its first, with several)
    loss: Any  # the scalar the derivatives are taken of
    captures: list[Capture]
    leaves: list  # the Keras layers and operations that computed something, in call order
    input_grad: np.ndarray | None = None  # d loss / d x (NHWC; the first input's, with several)
    input_grads: list[np.ndarray | None] = field(default_factory=list)  # per input, in call order
    outputs: list = field(default_factory=list)  # every output tensor, in the model's order
    grads: list[np.ndarray | None] = field(default_factory=list)  # per capture
    weight_grads: dict[int, np.ndarray | None] = field(default_factory=dict)  # id(variable) -> grad
    notes: list[str] = field(default_factory=list)
    parents: dict[int, tuple[int, ...]] = field(default_factory=dict)  # tensor id -> input ids

    def feeds(self, source, target, avoiding=None) -> bool:
        """Whether ``target`` was computed from ``source`` along a path that does not pass
        through ``avoiding`` (tensors, as captured)."""
        goal, skip = id(source), id(avoiding) if avoiding is not None else None
        todo, seen = [id(target)], set()
        while todo:
            key = todo.pop()
            if key == goal:
                return True
            if key in seen or key == skip:
                continue
            seen.add(key)
            todo.extend(self.parents.get(key, ()))
        return False


def _op_type(op_type) -> str:
    return op_type.decode() if isinstance(op_type, bytes) else str(op_type)


class _Recorder:
    """The two hooks of one observed call (see the module docstring)."""

    def __init__(self, batch: int, masks: list[np.ndarray] | None):
        self.batch = batch
        self.masks = list(masks or [])
        self.captures: list[Capture] = []
        self.by_id: dict[int, Capture] = {}
        self.stack: list[list] = []  # [operation, had_children]
        self.leaves: list = []
        self.leaf_ids: set[int] = set()
        self.notes: list[str] = []
        # tensors computed from the input (kept alive, so that their ids stay theirs):
        # only these can be a layer's output; a bias reshaped to 1 x 1 x 1 x K cannot
        self.derived: dict[int, Any] = {}
        self.parents: dict[int, tuple[int, ...]] = {}  # tensor id -> the ids it was computed from

    def watch(self, x) -> None:
        self.derived[id(x)] = x

    def keep(self, tensor, label: str, op_type: str, layer=None) -> None:
        import tensorflow as tf

        if not isinstance(tensor, tf.Tensor) or not tensor.dtype.is_floating or not hasattr(tensor, "numpy"):
            return  # not a float, or a graph tensor of a tf.function being traced
        if id(tensor) not in self.derived:
            return
        shape = tensor.shape
        if shape.rank is None or shape.rank < 1 or shape[0] != self.batch:
            return
        seen = self.by_id.get(id(tensor))
        if seen is not None:
            if layer is not None and seen.layer is None:  # an op's output is a layer's result
                seen.label, seen.layer = label, layer  # op_type stays the TensorFlow op's
                seen.enclosing = self.enclosing()  # the layers around the layer, not itself
            return
        capture = Capture(tensor, label, op_type, layer, self.enclosing())
        self.by_id[id(tensor)] = capture
        self.captures.append(capture)

    def enclosing(self) -> tuple:
        import keras

        return tuple(
            op
            for op, _ in self.stack
            if isinstance(op, keras.layers.Layer) and not isinstance(op, keras.Model)
        )

    def finish(self) -> None:
        """Name, for each capture, the leaf layer it was computed inside, if any (a pad op
        inside a pooling layer is no layer's output of its own)."""
        for c in self.captures:
            outer = next((op for op in c.enclosing if id(op) in self.leaf_ids), None)
            c.inside = None if outer is None else outer.name

    def op_callback(self, op_type, inputs, attrs, outputs, op_name=None, graph=None):
        kind = _op_type(op_type)
        if outputs is None:
            return None
        if any(id(t) in self.derived for t in inputs or ()):
            for out in outputs:
                self.derived[id(out)] = out
                self.parents[id(out)] = tuple(id(t) for t in inputs if id(t) in self.derived)
        if kind in _SKIP_OPS:
            return None
        owner = self.stack[-1][0].name if self.stack else "model"
        for out in outputs:
            self.keep(out, f"{owner}:{kind}", kind)
        return None

    def call(self, original: Callable, op, args, kwargs):
        import keras

        is_layer = isinstance(op, keras.layers.Layer)
        parent = self.stack[-1][0] if self.stack else None
        if parent is not None and is_layer:
            self.stack[-1][1] = True
        entry = [op, False]
        self.stack.append(entry)
        try:
            out = self._dropout(op, args, kwargs)
            if out is None:
                out = original(op, *args, **kwargs)
        finally:
            self.stack.pop()
        # a leaf: a layer that calls no other layer (whatever keras.ops it uses), or a
        # Keras operation of a functional graph (keras.ops.relu between layers)
        leaf = not entry[1] if is_layer else (parent is None or isinstance(parent, keras.Model))
        if leaf and type(op).__name__ != "InputLayer" and not isinstance(op, keras.Model):
            if id(op) not in self.leaf_ids:
                self.leaf_ids.add(id(op))
                self.leaves.append(op)
        import tensorflow as tf

        if isinstance(out, tf.Tensor):
            self.keep(out, op.name, type(op).__name__, op)
        return out

    def _dropout(self, op, args, kwargs):
        """A Dropout called in training mode multiplies by the next of the reference's
        masks (pre-scaled by 1/(1-rate), as MatConvNet's and Keras' inverted dropout)."""
        import tensorflow as tf

        if type(op).__name__ != "Dropout" or not kwargs.get("training") or not args:
            return None
        h = args[0]
        if not self.masks:
            self.notes.append(
                f"Keras Dropout '{op.name}' has no MatConvNet dropout layer to take its mask from: "
                "it drops at random"
            )
            return None
        mask = self.masks.pop(0)
        if tuple(mask.shape) != tuple(h.shape):
            self.notes.append(
                f"Keras Dropout '{op.name}' gets input {tuple(h.shape)}, MatConvNet's mask is "
                f"{tuple(mask.shape)}: it drops at random"
            )
            return None
        return tf.convert_to_tensor(h) * tf.constant(mask, dtype=h.dtype)


class _Hooks:
    """Install and remove the hooks of a ``_Recorder`` (restored whatever happens)."""

    def __init__(self, recorder: _Recorder, eager: bool = True):
        self.recorder = recorder
        self.force_eager = eager

    def __enter__(self):
        import tensorflow as tf
        from keras.src.ops.operation import Operation
        from tensorflow.python.framework import op_callbacks

        self.operation = Operation
        self.original = Operation.__call__
        self.eager = tf.config.functions_run_eagerly()
        recorder, original = self.recorder, self.original

        def observed_call(op, *args, **kwargs):
            return recorder.call(original, op, args, kwargs)

        Operation.__call__ = observed_call
        tf.config.run_functions_eagerly(self.force_eager or self.eager)
        op_callbacks.add_op_callback(recorder.op_callback)
        return recorder

    def __exit__(self, *exc):
        import tensorflow as tf
        from tensorflow.python.framework import op_callbacks

        op_callbacks.remove_op_callback(self.recorder.op_callback)
        self.operation.__call__ = self.original
        tf.config.run_functions_eagerly(self.eager)
        return False


def _inputs(model, x_nhwc) -> tuple[list, Any]:
    """The input tensors of one call (each in its model input's dtype) and the argument the
    model is called with: one tensor for an array, the list of them for a list of arrays."""
    import tensorflow as tf

    several = isinstance(x_nhwc, list | tuple)
    xs = list(x_nhwc) if several else [x_nhwc]
    declared = getattr(model, "inputs", None) or []
    policy = str(getattr(model, "compute_dtype", None) or "float32")
    dtypes = [str(declared[k].dtype) if k < len(declared) else policy for k in range(len(xs))]
    tensors = [tf.convert_to_tensor(np.asarray(x, dtype=d)) for x, d in zip(xs, dtypes, strict=True)]
    return tensors, (tensors if several else tensors[0])


def _outputs(out, name: str, several: bool) -> list:
    """The model's output tensors: exactly one unless ``several``."""
    import tensorflow as tf

    values = (
        list(out.values()) if isinstance(out, dict) else list(out) if isinstance(out, list | tuple) else [out]
    )
    if len(values) != 1 and not (several and values):
        raise McnError(f"Expected a model with one output. Received '{name}' returning {len(values)} outputs")
    for value in values:
        if not isinstance(value, tf.Tensor):
            raise McnError(f"Expected model '{name}' to return a tensor. Received {type(value).__name__}")
    return values


@dataclass
class Discovery:
    """What a forward call shows of the model's structure."""

    leaves: list  # the Keras layers and operations that compute something, in call order
    output_op: str  # the TensorFlow op that made the output ("Softmax", "BiasAdd", ...)
    eager: bool  # whether observing may run every tf.function eagerly
    outputs: int = 1  # how many outputs the model returns


def discover(model, x_nhwc, *, training: bool = False, several_outputs: bool = False) -> Discovery:
    """One forward call of ``model`` on ``x_nhwc`` (an array, or a list of arrays for a
    model of several inputs): the Keras layers and operations it calls that compute
    something themselves (no Keras layer inside), in call order, which is what a
    structural alignment pairs with the net's layers whatever the model's style; and the
    op that made its (first) output."""
    inputs, arg = _inputs(model, x_nhwc)
    recorder = _Recorder(int(inputs[0].shape[0]), None)
    for x in inputs:
        recorder.watch(x)
    frozen = [(v, np.array(v.numpy())) for v in model.non_trainable_variables]
    name = getattr(model, "name", type(model).__name__)
    try:
        with _Hooks(recorder):
            outs = _outputs(model(arg, training=training), name, several_outputs)
    finally:
        for v, value in frozen:
            v.assign(value)
    made = recorder.by_id.get(id(outs[0])) if outs else None
    return Discovery(
        leaves=recorder.leaves,
        output_op=made.op_type if made is not None else "",
        # TensorFlow computes a grouped convolution's input derivative on the CPU only
        # through Keras' XLA-compiled function, which eager execution would bypass
        eager=not any(getattr(layer, "groups", 1) > 1 for layer in recorder.leaves),
        outputs=len(outs),
    )


def called_layers(model, x_nhwc: np.ndarray, *, training: bool = False) -> list:
    """The leaves of ``discover``."""
    return discover(model, x_nhwc, training=training).leaves


def observe(
    model,
    x_nhwc,
    *,
    training: bool,
    loss: Callable[[Any], Any],
    masks: list[np.ndarray] | None = None,
    weights: list | None = None,
    eager: bool | None = None,
    several_outputs: bool = False,
) -> Observation:
    """Call ``model`` on ``x_nhwc`` (N x H x W x C; a list of such arrays, in the model's
    input order, for a model of several inputs) as the user does and record every
    tensor it computes; ``loss(output)`` gives the scalar whose derivatives are taken
    with respect to the inputs, every capture and ``weights`` (Keras variables); with
    ``several_outputs`` the model may return a list of outputs, and ``loss`` gets that
    list. Variables the call changes (BatchNormalization's moving statistics, dropout
    seed state) are put back.

    ``eager`` runs every ``tf.function`` eagerly so that its inside is seen (default:
    unless the model has grouped convolutions, whose input derivative TensorFlow computes
    on the CPU only through Keras' XLA-compiled function).
    """
    import tensorflow as tf

    if eager is None:
        eager = discover(model, x_nhwc, training=training, several_outputs=several_outputs).eager

    name = getattr(model, "name", type(model).__name__)
    inputs, arg = _inputs(model, x_nhwc)
    recorder = _Recorder(int(inputs[0].shape[0]), masks)
    for x in inputs:
        recorder.watch(x)
    weights = list(weights or [])
    frozen = [(v, np.array(v.numpy())) for v in model.non_trainable_variables]
    try:
        with tf.GradientTape() as tape:
            for x in inputs:
                tape.watch(x)
            with _Hooks(recorder, eager):
                outs = _outputs(model(arg, training=training), name, several_outputs)
            total = loss(outs if several_outputs else outs[0])
        tensors = [c.tensor for c in recorder.captures]
        grads = tape.gradient(total, [*inputs, *tensors, *weights])
    finally:
        for v, value in frozen:
            v.assign(value)
    recorder.finish()
    if recorder.masks:
        recorder.notes.append(
            f"{len(recorder.masks)} MatConvNet dropout mask(s) were not used: the model calls fewer "
            "Dropout layers in training mode"
        )
    k, n = len(inputs), len(tensors)

    def value(g):
        return None if g is None else np.asarray(g.numpy() if hasattr(g, "numpy") else g)

    input_grads = [value(g) for g in grads[:k]]
    return Observation(
        output=outs[0],
        loss=total,
        captures=recorder.captures,
        leaves=recorder.leaves,
        input_grad=input_grads[0],
        input_grads=input_grads,
        outputs=outs,
        grads=[value(g) for g in grads[k : k + n]],
        weight_grads={id(v): value(g) for v, g in zip(weights, grads[k + n :], strict=True)},
        notes=recorder.notes,
        parents=recorder.parents,
    )
