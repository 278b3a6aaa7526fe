"""Weight transfer between a MatConvNet net and a Keras model, both ways.

Every layout move of the project lives here:

- data: MatConvNet ``H x W x C x N`` <-> Keras ``N x H x W x C`` (``to_nhwc``/``to_hwcn``,
  ``keras_index`` for one element's index);
- conv kernels: none at all (MatConvNet's ``FH x FW x FC x K`` is Keras'
  ``(kh, kw, in_channels // groups, filters)``; ``conv_to_keras``/``filters_of`` restore
  the trailing singleton dimensions MATLAB drops); biases ``1 x K`` <-> ``(K,)``;
- a fully-connected conv as Flatten + Dense: ``F.reshape(-1, K)`` (row-major over
  ``(H, W, C)``, which is what Keras' Flatten produces; MATLAB's ``F(:)`` is column-major);
- bnorm moments ``[mu, sigma]`` <-> ``moving_mean = mu``, ``moving_variance = sigma^2 - eps``
  (Keras adds its epsilon back; MatConvNet's sigma already contains it);
- filter groups in a kernel without groups: MatConvNet's G groups of ``C / G`` input
  channels embedded block-diagonally in a kernel over all C channels (``embed_groups``),
  and such a kernel (or its derivative) split back into the blocks and the entries off
  them (``split_groups``);
- which Keras variable holds which MatConvNet parameter (``ROLES``, ``parameter_role``).

``load_weights``/``net_from_keras`` move a whole net into the model ``to_keras`` built and
back; ``WeightMap`` loads a net into any aligned Keras model (or only sets the two side by
side) and maps the model's parameter derivatives back to MatConvNet's layout.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from harness.mcn.net import Layer, Net
from harness.mcn.options import McnError, is_empty

if TYPE_CHECKING:
    import keras

    from harness.equivalence.align import Alignment

__all__ = [
    "PARAMETER_TYPES",
    "ROLES",
    "Role",
    "WeightMap",
    "aligned_parameter_layers",
    "bnorm_roles",
    "bnorm_to_keras",
    "conv_to_keras",
    "dense_kernel",
    "dense_kernel_to_filters",
    "FLATTEN_ORDERS",
    "permute_order",
    "embed_groups",
    "filters_of",
    "fit_shape",
    "keras_index",
    "keras_layer_for",
    "keras_values",
    "load_weights",
    "net_from_keras",
    "parameter_role",
    "roles_for",
    "split_groups",
    "to_hwcn",
    "to_nhwc",
    "variable_name",
]

PARAMETER_TYPES = ("conv", "convt", "bnorm")  # MatConvNet layers whose parameters Keras holds


# ------------------------------------------------------------------------------ data


def to_nhwc(x: np.ndarray) -> np.ndarray:
    """MatConvNet data ``H x W x C x N`` -> Keras ``N x H x W x C``."""
    return np.ascontiguousarray(np.asarray(x).transpose(3, 0, 1, 2))


def to_hwcn(x: np.ndarray) -> np.ndarray:
    """Keras ``N x H x W x C`` (or ``N x K``) -> MatConvNet ``H x W x C x N``."""
    x = np.asarray(x)
    if x.ndim == 2:
        x = x[:, None, None, :]
    return np.ascontiguousarray(x.transpose(1, 2, 3, 0))


def keras_index(index) -> list[int]:
    """The Keras ``(n, h, w, c)`` index of MatConvNet's ``(h, w, c, n)`` element."""
    h, w, c, n = (int(i) for i in index)
    return [n, h, w, c]


# ------------------------------------------------------------------------------ filters


def conv_to_keras(f: np.ndarray) -> np.ndarray:
    """MatConvNet filters as a 4-D ``FH x FW x FC x K`` array (MATLAB drops trailing
    singleton dimensions): also Keras' Conv2D kernel, without any move."""
    f = np.asarray(f)
    return f.reshape(f.shape + (1,) * (4 - f.ndim))


def filters_of(layer: Layer) -> np.ndarray:
    """A conv/convt layer's ``weights{1}`` as 4-D filters (``conv_to_keras``)."""
    return conv_to_keras(layer.weights[0])


def dense_kernel(f: np.ndarray, order: tuple[int, int, int] = (0, 1, 2)) -> np.ndarray:
    """Filters covering the whole input (``FH x FW x C x K``) -> a Dense kernel for Flatten
    of the input whose axes ``(H, W, C)`` come in ``order`` (``Permute`` before Flatten:
    ``Permute((3, 2, 1))`` is order ``(2, 1, 0)``, MATLAB's column-major ``F(:)``)."""
    f = conv_to_keras(f)
    return f.transpose((*order, 3)).reshape(-1, f.shape[3])


def dense_kernel_to_filters(
    kernel: np.ndarray, shape: tuple[int, ...], order: tuple[int, int, int] = (0, 1, 2)
) -> np.ndarray:
    """The inverse of ``dense_kernel``: a Dense kernel back to ``FH x FW x C x K``."""
    permuted = tuple(shape[i] for i in order) + (shape[3],)
    back = [order.index(i) for i in range(3)] + [3]
    return np.asarray(kernel).reshape(permuted).transpose(back)


FLATTEN_ORDERS = ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))


def permute_order(dims) -> tuple[int, int, int]:
    """Keras ``Permute(dims)`` (1-based, over H, W, C) as a flatten order of (H, W, C)."""
    return tuple(int(d) - 1 for d in dims)


def _group_blocks(groups: int, fc: int, k: int) -> Iterator[tuple[slice, slice]]:
    """(input channels, filters) of each of the ``groups`` diagonal blocks."""
    kg = k // groups
    for g in range(groups):
        yield slice(g * fc, (g + 1) * fc), slice(g * kg, (g + 1) * kg)


def embed_groups(filters: np.ndarray, groups: int, kernel_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """MatConvNet's ``groups`` filter groups (``FH x FW x C/G x K``: group g's ``K/G``
    filters see input channels ``g*C/G:(g+1)*C/G``) as one kernel over all C channels,
    the groups on its diagonal blocks and zeros elsewhere (``FH x FW x C x K``, in the
    filters' dtype), reshaped to ``kernel_shape`` when given (a Dense kernel)."""
    f = conv_to_keras(filters)
    fh, fw, fc, k = f.shape
    full = np.zeros((fh, fw, fc * groups, k), f.dtype)
    for rows, cols in _group_blocks(groups, fc, k):
        full[:, :, rows, cols] = f[..., cols]
    return full if kernel_shape is None else full.reshape(kernel_shape)


def split_groups(
    kernel: np.ndarray, groups: int, filter_shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of ``embed_groups`` for a kernel or its derivative: ``(diagonal,
    off_diagonal)``, the diagonal blocks as MatConvNet filters of ``filter_shape``
    (``FH x FW x C/G x K``) and the entries off them as a flat array."""
    fh, fw, fc, k = filter_shape
    full = np.asarray(kernel).reshape(fh, fw, fc * groups, k)
    diagonal = np.zeros((fh, fw, fc, k), full.dtype)
    on_blocks = np.zeros(full.shape, bool)
    for rows, cols in _group_blocks(groups, fc, k):
        diagonal[..., cols] = full[:, :, rows, cols]
        on_blocks[:, :, rows, cols] = True
    return diagonal, full[~on_blocks]


def fit_shape(value, shape: tuple) -> np.ndarray:
    """A Keras parameter (or its derivative) in the shape of the MatConvNet parameter, or
    as it is when the sizes differ (a Keras layer of another shape: a comparison reports
    the mismatch)."""
    value = np.asarray(value)
    return value.reshape(shape) if value.size == int(np.prod(shape)) else value


# ------------------------------------------------------------------------------ roles


@dataclass(frozen=True)
class Role:
    """Which MatConvNet parameter a Keras variable holds."""

    variable: str  # the Keras variable's name
    index: int  # 0-based: the parameter is layer.weights[index], MatConvNet's weights{index + 1}
    layer_types: tuple[str, ...]  # the MatConvNet layers whose Keras layers own such a variable
    tensor: str  # the Keras-layout value's name in a report
    trainable: bool  # updated by an optimizer (bnorm moments are updated by the layer)

    @property
    def gradient(self) -> str:
        """The name of its derivative in a report (``dzdw{j}``)."""
        return f"dzdw{{{self.index + 1}}}"


ROLES: dict[str, Role] = {
    r.variable: r
    for r in (
        # a conv's filters: Conv2D/Conv2DTranspose kernel, or a Dense kernel for a
        # fully-connected conv; its biases (also an AddBias layer's, for empty filters)
        Role("kernel", 0, ("conv", "convt"), "w{1}", True),
        Role("bias", 1, ("conv", "convt"), "w{2}", True),
        Role("gamma", 0, ("bnorm",), "w{1}", True),
        Role("beta", 1, ("bnorm",), "w{2}", True),
        # both halves of bnorm's moments [mu, sigma]: mu, and sigma^2 - epsilon
        Role("moving_mean", 2, ("bnorm",), "w{3}.mean", False),
        Role("moving_variance", 2, ("bnorm",), "w{3}.var", False),
    )
}


def variable_name(variable: Any) -> str:
    """A Keras variable's own name (``"kernel"``), from the variable or its name or path."""
    name = variable if isinstance(variable, str) else str(getattr(variable, "name", variable))
    return name.split("/")[-1].split(":")[0]


def parameter_role(variable: Any) -> Role | None:
    """The ``Role`` of a Keras variable (or variable name), None for a variable that holds
    no MatConvNet parameter."""
    return ROLES.get(variable_name(variable))


def roles_for(layer_type: str, *, trainable: bool | None = None) -> list[Role]:
    """The roles of a MatConvNet layer type's Keras variables, in Keras' variable order."""
    return [r for r in ROLES.values() if layer_type in r.layer_types and trainable in (None, r.trainable)]


# ------------------------------------------------------------------------------ whole nets


def keras_layer_for(model: keras.Model, name: str):
    from harness.translate.build import keras_name

    try:
        return model.get_layer(keras_name(name))
    except ValueError:
        return None


def _parameter_layers(model: keras.Model, net: Net) -> Iterator[tuple[int, Layer, Any]]:
    """(index, layer, Keras layer of the same name) for every layer of ``net`` with
    parameters Keras holds."""
    for i, layer in enumerate(net.layers):
        if not layer.weights or layer.type not in PARAMETER_TYPES:
            continue
        k = keras_layer_for(model, layer.name)
        if k is None:
            raise McnError(f"layer {i + 1} '{layer.name}': no Keras layer of that name in the model")
        yield i, layer, k


def _epsilon(klayer, default: float = 1e-5) -> float:
    return float(getattr(klayer, "epsilon", default))


def bnorm_roles(klayer) -> list[Role]:
    """The roles of a BatchNormalization layer's variables, in its order: gamma only with
    ``scale``, beta only with ``center``, then both moments."""
    own = {"gamma": getattr(klayer, "scale", True), "beta": getattr(klayer, "center", True)}
    return [r for r in roles_for("bnorm") if own.get(r.variable, True)]


def bnorm_to_keras(layer: Layer, klayer) -> list[np.ndarray]:
    """A bnorm layer's parameters as ``klayer``'s variables (``bnorm_roles``), in float64."""
    g, b, m = (np.asarray(v, dtype=np.float64) for v in layer.weights[:3])
    m = m.reshape(-1, 2)
    eps = _epsilon(klayer, float(np.asarray(layer.get("epsilon", 1e-5)).ravel()[0]))
    value = {
        "gamma": g.ravel(),
        "beta": b.ravel(),
        "moving_mean": m[:, 0],
        "moving_variance": m[:, 1] ** 2 - eps,
    }
    return [value[r.variable] for r in bnorm_roles(klayer)]


def load_weights(model: keras.Model, net: Net) -> None:
    """Copy every parameter of ``net`` into the same-named layers of ``model``."""
    for _, layer, k in _parameter_layers(model, net):
        dtype = k.variables[0].dtype if k.variables else "float64"
        k.set_weights([np.asarray(v, dtype=dtype) for v in keras_values(layer, k)])


def keras_values(layer: Layer, klayer) -> list[np.ndarray]:
    """MatConvNet parameters of ``layer`` in the order and layout of ``klayer.get_weights()``."""
    cls = type(klayer).__name__
    w = layer.weights
    if layer.type == "bnorm":
        return bnorm_to_keras(layer, klayer)
    f = w[0]
    b = w[1] if len(w) > 1 else None
    if cls == "AddBias":
        return [np.asarray(b).ravel()]
    values = [dense_kernel(f) if cls == "Dense" else conv_to_keras(f)]
    if not is_empty(b):
        values.append(np.asarray(b).ravel())
    return values


def _like(value: np.ndarray, target) -> np.ndarray:
    """``value`` in ``target``'s shape and dtype."""
    return np.asarray(value).reshape(np.shape(target)).astype(np.asarray(target).dtype)


def net_from_keras(model: keras.Model, net: Net) -> Net:
    """A copy of ``net`` whose parameters are read back from ``model`` (the inverse of
    ``load_weights``): shapes and dtypes are ``net``'s own."""
    out = net.copy()
    for _, layer, k in _parameter_layers(model, out):
        values = [np.asarray(v) for v in k.get_weights()]
        if layer.type == "bnorm":
            g, b, m = layer.weights[:3]
            sigma = np.sqrt(values[3].astype(np.float64) + _epsilon(k))
            moments = np.stack([values[2], sigma], axis=1)
            layer.weights[:3] = [_like(values[0], g), _like(values[1], b), _like(moments, m)]
            continue
        f = layer.weights[0]
        b = layer.weights[1] if len(layer.weights) > 1 else None
        if type(k).__name__ == "AddBias":
            layer.weights[1] = _like(values[0], b)
            continue
        layer.weights[0] = _like(values[0], f)
        if not is_empty(b):
            layer.weights[1] = _like(values[1], b)
    return out


# ------------------------------------------------------------------------------ aligned models


def aligned_parameter_layers(
    net: Net, model: keras.Model, alignment: Alignment
) -> Iterator[tuple[int, Layer, keras.layers.Layer]]:
    """``(index, MatConvNet layer, Keras layer holding its parameters)`` for every pair of
    the alignment that has a parameter layer."""
    for pair in alignment.pairs:
        if pair.param_layer is not None:
            layer = alignment.layers.get(pair.param_layer) if alignment.layers else None
            yield pair.index, net.layers[pair.index], layer or model.get_layer(pair.param_layer)


class WeightMap:
    """A net's parameters set beside the aligned layers of any Keras model, and the model's
    parameter derivatives mapped back to MatConvNet's layout.

    With ``load`` the net's parameters are loaded into the Keras layers the alignment
    names; without, the model keeps its own and both are kept side by side in ``kept``
    (``(pair index, tensor name, net's value in Keras layout, Keras' value)``). A Keras
    Conv2D/Dense without MatConvNet's filter groups gets the filters embedded
    block-diagonally (``embedded``: Keras layer name -> ``(groups, 4-D filter shape)``).
    ``notes`` tell what was adapted, ``problems`` what could not be loaded.
    """

    def __init__(self, net: Net, model: keras.Model, alignment: Alignment, dtype: str, *, load: bool = True):
        self.notes: list[str] = []
        self.problems: list[str] = []
        self.embedded: dict[str, tuple[int, tuple]] = {}
        self.dtype = dtype
        self.load = load
        self.kept: list[tuple[int, str, np.ndarray, np.ndarray]] = []
        self.orders: dict[str, tuple[int, int, int]] = {}
        for pair in alignment.pairs:
            for name in pair.keras:
                kl = alignment.layers.get(name) if alignment.layers else None
                if type(kl).__name__ == "Permute" and pair.param_layer:
                    self.orders[pair.param_layer] = permute_order(kl.dims)
        for index, layer, klayer in aligned_parameter_layers(net, model, alignment):
            try:
                self._load(layer, klayer, index)
            except McnError as err:
                self.problems.append(f"layer '{layer.name}' -> Keras '{klayer.name}': {err}")

    def _load(self, layer: Layer, klayer, index: int) -> None:
        current = klayer.get_weights()
        if layer.type == "conv" and is_empty(layer.weights[0]):  # a bias alone (AddBias)
            b = np.asarray(layer.weights[1], dtype=np.float64).ravel()
            self._set(klayer, [b], current, index, [ROLES["bias"].tensor])
            return
        if layer.type == "bnorm":
            names = [r.tensor for r in bnorm_roles(klayer)]
            self._set(klayer, bnorm_to_keras(layer, klayer), current, index, names)
            return
        f = conv_to_keras(np.asarray(layer.weights[0], dtype=np.float64))
        b = layer.weights[1] if len(layer.weights) > 1 else None
        kernel_shape = current[0].shape
        dense = type(klayer).__name__ == "Dense"
        want = dense_kernel(f, self.orders.get(klayer.name, (0, 1, 2))) if dense else f
        if want.shape != kernel_shape and (not dense or f.shape[0] * f.shape[1] == 1):
            want = self._embed(klayer, f, kernel_shape, dense=dense)
        values = [want]
        if len(current) > 1:
            values.append(
                np.zeros(current[1].shape) if is_empty(b) else np.asarray(b, dtype=np.float64).ravel()
            )
        elif not is_empty(b) and np.any(b):
            self.notes.append(
                f"Keras layer '{klayer.name}' has no bias where MatConvNet's '{layer.name}' has one"
            )
        self._set(klayer, values, current, index, [ROLES["kernel"].tensor, ROLES["bias"].tensor])

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
        self.embedded[klayer.name] = (groups, f.shape)
        self.notes.append(
            f"Keras layer '{klayer.name}' cannot hold MatConvNet's {groups} filter groups "
            f"(kernel {kernel_shape} vs filters {f.shape}): weights "
            + ("embedded block-diagonally" if self.load else "compared block-diagonally")
            + "; its parameter derivative off the diagonal blocks is reported as a mismatch"
            " (fix: Conv2D(..., groups=" + str(groups) + "))"
        )
        return embed_groups(f, groups, kernel_shape)

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
        self, layer: Layer, klayer, grads: list
    ) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
        """``(tensor name, Keras derivative in MatConvNet layout, off-diagonal part or
        None)`` for ``grads``, the derivatives of ``klayer``'s trainable variables."""
        out = []
        if layer.type == "conv" and is_empty(layer.weights[0]):  # a bias alone (AddBias)
            return [(ROLES["bias"].gradient, fit_shape(grads[0], np.shape(layer.weights[1])), None)]
        if layer.type == "bnorm":
            roles = [r for r in bnorm_roles(klayer) if r.trainable]
            for role, g in zip(roles, grads, strict=False):
                out.append((role.gradient, fit_shape(g, np.shape(layer.weights[role.index])), None))
            return out
        f = filters_of(layer)
        gk = np.asarray(grads[0])
        off = None
        if klayer.name in self.embedded:
            groups, fshape = self.embedded[klayer.name]
            gk, off = split_groups(gk, groups, fshape)
        if type(klayer).__name__ == "Dense" and gk.ndim == 2 and klayer.name in self.orders:
            gk = dense_kernel_to_filters(gk, f.shape, self.orders[klayer.name])
        out.append((ROLES["kernel"].gradient, fit_shape(gk, f.shape), off))
        b = layer.weights[1] if len(layer.weights) > 1 else None
        if len(grads) > 1 and not is_empty(b):
            out.append((ROLES["bias"].gradient, fit_shape(grads[1], np.shape(b)), None))
        return out
