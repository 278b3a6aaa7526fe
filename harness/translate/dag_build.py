"""MatConvNet DagNN net -> a faithful functional Keras 3 model, and its weights both ways.

``to_keras_dag(net)`` builds one Keras layer per DagNN layer, in ``net.execution_order()``,
named after it (``keras_name``; helper layers get the suffixes ``_pad``, ``_subsample``,
``_crop``), with the block semantics of ``harness.mcn.dagnn_blocks``:

=====================  =====================================================================
DagNN block            Keras
=====================  =====================================================================
Conv                   [ZeroPadding2D] + Conv2D (groups, dilation) [+ Subsample: strided
                       dilated convs run stride 1, then subsample]
ConvTranspose          Conv2DTranspose, or GroupedConv2DTranspose for ``numGroups`` > 1
                       (refused with filters smaller than the upsampling: that layer's
                       static output shape is wrong there), [+ Cropping2D for ``crop``,
                       and for the rows Keras adds when the filters are smaller than the
                       upsampling]
BatchNorm              BatchNormalization (moments ``[mu, sigma]`` held as ``moving_mean =
                       mu``, ``moving_variance = sigma^2 - epsilon``; ``training=True`` uses
                       the batch statistics, as mode ``normal``; momentum ``1 - learning
                       rate`` of the moments param)
ReLU                   ReLU, MatConvNetLeakyReLU with a leak (block ``leak`` or opts)
Sigmoid, SoftMax       Activation('sigmoid'), Softmax over channels
Pooling                MatConvNetPooling (max, or avg with padding), AveragePooling2D
LRN                    MatConvNetLRN (exact power: MatConvNet's CPU fast_pow is not
                       reproduced, compare with ``eval(..., lrn_exact=True)``)
DropOut                Dropout (identity unless ``training=True``, as mode ``test``)
Sum                    Add (Identity for one input)
Concat                 Concatenate over H, W or C (``dim`` 1, 2, 3)
Crop                   MatConvNetCrop (MatConvNet's split, sizes read at run time)
Scale                  MatConvNetScale (param or var operands, broadcasting)
Loss                   not translated: its first input is a model output
=====================  =====================================================================

Any other block (PDist, NormOffset, SpatialNorm, custom layers such as a custom loss class)
raises TranslationError naming the layer and its type: cut it off with
``net.remove_layer(name)`` first.

Inputs and outputs (``dag_inputs``/``dag_outputs`` give the var names, in model order):

- one ``keras.Input`` per input var of the net (a var no layer outputs) that is not a label
  (a var read only by Loss layers, never as their first input), in ``net.vars`` order,
  named after the var (made safe). A model with one input takes one tensor, otherwise a
  list in that order. Data are ``N x H x W x C`` (``to_nhwc`` of MatConvNet's
  ``H x W x C x N``).
- the outputs: the net's output vars (``net.get_outputs()``, in ``net.vars`` order), each
  replaced by the first input of the Loss layer that computes it (the scores), without
  repeats. One output is returned as one tensor, several as a list in that order.

Input sizes: ``input_sizes[var]`` (``(H, W, C)``, H and W may be None), else
``net.meta['inputs']`` (MatConvNet's ``struct('name', ..., 'size', [H W C N])``, one or a
list), else ``net.meta['inputSize']`` for a net with one data input, else ``(None, None,
C)``: a fully convolutional model, C the depth of the first filters (or BatchNorm) that read
the var, through layers that keep the depth. Every custom layer runs with unknown spatial
sizes (MatConvNetCrop reads them at run time).

Shared params (MSLapSRN's recursive blocks use one conv's params in 12 layers): DagNN layers
with the same params (same names, same order), the same type and the same block (the
padding of a Conv, the crop of a ConvTranspose and cuDNN options aside: those are helper
layers or no-ops) are ONE Keras layer, built for the first in execution order and called
once per DagNN layer, so each param is one Keras variable. ``dag_keras_layers`` maps every
DagNN layer to the name of the Keras layer that holds its params. Layers that share only
some of their params, or share params with another block, raise TranslationError for now
(a custom layer reading variables of another layer would express them).

Weights: ``dag_weights_to_keras(net, model)`` loads the net's params (``to_keras_dag`` does
it), ``dag_params_from_keras(net, model)`` reads them back into a copy of the net (shapes
and dtypes the net's own).

Where it lives: ``dag_plan`` (the plan: layers, sharing, inputs, outputs, sizes; no Keras),
``dag_blocks`` (the Keras layers of each block), ``dag_weights`` (the weights both ways),
this module (the graph walk that calls them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from harness.mcn.dagnn import DagNet
from harness.translate.build import TranslationError, keras_name
from harness.translate.dag_blocks import DagBlockBuilder, scale_weights
from harness.translate.dag_plan import (
    SUPPORTED_BLOCKS,
    dag_inputs,
    dag_keras_layers,
    dag_outputs,
    dag_plan,
    input_shapes,
    layer_where,
    located,
)
from harness.translate.dag_weights import dag_params_from_keras, dag_weights_to_keras

if TYPE_CHECKING:
    import keras

__all__ = [
    "SUPPORTED_BLOCKS",
    "dag_inputs",
    "dag_keras_layers",
    "dag_outputs",
    "dag_params_from_keras",
    "dag_weights_to_keras",
    "scale_weights",
    "to_keras_dag",
]


def to_keras_dag(
    net: DagNet, dtype: str = "float64", *, input_sizes: Mapping[str, Any] | None = None
) -> keras.Model:
    """A functional Keras model exactly equivalent to the DagNN ``net`` (weights loaded).

    Inputs ``dag_inputs(net)``, outputs ``dag_outputs(net)`` (one tensor each when there is
    one, else lists in that order); ``input_sizes`` maps input var names to ``(H, W, C)``
    (see the module docstring for the defaults). ``training=True`` is mode ``normal``
    (BatchNorm on batch statistics, DropOut drawing masks), the default mode ``test``.
    Raises TranslationError naming the layer for blocks it cannot express.
    """
    import keras

    if dtype not in ("float64", "float32"):
        raise TranslationError(f"Expected dtype 'float64' or 'float32'. Received dtype={dtype!r}")
    plan = dag_plan(net)
    if not plan.outputs:
        raise TranslationError("Expected the net to have output vars. Received none")
    plan.used = set(plan.names.values())
    shapes = input_shapes(net, plan, input_sizes=input_sizes)
    tensors: dict[str, Any] = {}
    inputs = []
    for v in plan.inputs:
        tensors[v] = keras.Input(shape=shapes[v], dtype=dtype, name=plan.unique(keras_name(v)))
        inputs.append(tensors[v])
    build = DagBlockBuilder(net, plan, dtype=dtype)
    for layer in plan.layers:
        where = layer_where(net, layer)
        with located(where):
            missing = [v for v in layer.inputs if v not in tensors]
            if missing:  # pragma: no cover - the execution order and dag_plan rule this out
                raise TranslationError(f"inputs {', '.join(missing)} have no value yet")
            y = build(layer, [tensors[v] for v in layer.inputs])
        for v in layer.outputs[:1]:
            tensors[v] = y
        if len(layer.outputs) > 1:
            raise TranslationError(f"{where}: Expected one output. Received outputs={layer.outputs}")
    outputs = [tensors[v] for v in plan.outputs]
    model = keras.Model(
        inputs[0] if len(inputs) == 1 else inputs,
        outputs[0] if len(outputs) == 1 else outputs,
        name="matconvnet_dag",
    )
    dag_weights_to_keras(net, model)
    return model
