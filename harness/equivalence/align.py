"""Pair the layers of a MatConvNet net with the layers of any single-path Keras model.

Each MatConvNet layer gets the (possibly empty) run of Keras layers that computes it:
``ZeroPadding2D + Conv2D`` for a padded conv, ``Flatten + Dense`` for a fully-connected
conv, ``Conv2D(activation='relu')`` covering a conv and the ReLU after it, softmax +
cross-entropy for softmaxloss. Keras layers the net has no counterpart for are attached
to the preceding pair and reported; a MatConvNet layer with no Keras partner gets an
empty run (its output is compared against the unchanged Keras tensor) and is reported.
An explicit ``mapping`` {MatConvNet name: [Keras names]} overrides the alignment.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.mcn.net import Net

__all__ = ["Pair", "Alignment", "align", "keras_kind"]

# What a Keras layer computes, in MatConvNet's words.
_KINDS = {
    "ZeroPadding2D": "pad",
    "Pad": "pad",
    "Conv2D": "conv",
    "Dense": "conv",
    "AddBias": "conv",
    "Subsample": "subsample",
    "MaxPooling2D": "pool",
    "AveragePooling2D": "pool",
    "MatConvNetPooling": "pool",
    "ReLU": "relu",
    "LeakyReLU": "relu",
    "MatConvNetLeakyReLU": "relu",
    "Softmax": "softmax",
    "Flatten": "flatten",
    "Reshape": "flatten",
    "Dropout": "dropout",
    "BatchNormalization": "bnorm",
    "MatConvNetLRN": "lrn",
    "Conv2DTranspose": "convt",
    "GroupedConv2DTranspose": "convt",
    "Cropping2D": "crop",
    "InputLayer": "input",
    # Keras operations of a functional graph (keras.ops between layers)
    "Relu": "relu",
    "LeakyRelu": "relu",
    "Sigmoid": "sigmoid",
    "Permute": "permute",
    "Transpose": "permute",
}


def _activation_name(layer) -> str | None:
    act = getattr(layer, "activation", None)
    if act is None:
        return None
    name = getattr(act, "__name__", str(act))
    return None if name in ("linear", "identity") else name


def keras_kind(layer) -> str:
    cls = type(layer).__name__
    if cls == "Activation":
        name = _activation_name(layer)
        return {"relu": "relu", "sigmoid": "sigmoid", "softmax": "softmax"}.get(
            name or "", f"activation:{name}"
        )
    return _KINDS.get(cls, f"other:{cls}")


@dataclass
class Pair:
    """A MatConvNet layer and the Keras layers that compute it."""

    index: int  # MatConvNet layer index (0-based)
    name: str
    type: str
    keras: list[str] = field(default_factory=list)
    param_layer: str | None = None  # the Keras layer holding this layer's parameters
    fused_activation: str | None = None  # activation folded into param_layer (e.g. 'relu')
    notes: list[str] = field(default_factory=list)

    @property
    def keras_label(self) -> str:
        return "+".join(self.keras) if self.keras else "-"


@dataclass
class Alignment:
    pairs: list[Pair]
    problems: list[str]  # human-readable alignment problems (unpaired layers)
    layers: dict = field(default_factory=dict)  # Keras name -> the layer paired

    @property
    def ok(self) -> bool:
        return not self.problems

    def layer(self, name: str):
        """The Keras layer of that name among those aligned."""
        return self.layers[name]


_EXPECT = {
    "conv": ("conv",),
    "pool": ("pool",),
    "relu": ("relu",),
    "sigmoid": ("sigmoid",),
    "softmax": ("softmax",),
    "bnorm": ("bnorm",),
    "lrn": ("lrn",),
    "normalize": ("lrn",),
    "dropout": ("dropout",),
    "convt": ("convt",),
}
# Keras layers that may precede the main one of a MatConvNet layer (padding, flattening).
_PREFIX = {"conv": ("pad", "permute", "flatten", "subsample"), "pool": ("pad",)}
_SUFFIX = {"conv": ("subsample",), "convt": ("crop",)}


def align(net: Net, model, mapping: dict[str, list[str]] | None = None, *, layers=None) -> Alignment:
    """Pair ``net``'s layers with the Keras ``layers`` the model calls, in call order
    (``harness.equivalence.observe.called_layers``; default: ``model.layers``)."""
    klayers = [l for l in (model.layers if layers is None else layers) if keras_kind(l) != "input"]
    alignment = _explicit(net, klayers, mapping) if mapping is not None else _structural(net, klayers)
    alignment.layers = {l.name: l for l in klayers}
    return alignment


def _structural(net: Net, klayers: list) -> Alignment:
    pairs: list[Pair] = []
    problems: list[str] = []
    k = 0
    pending: tuple[str, Pair] | None = None  # an activation fused into the previous Keras layer
    n = len(net.layers)
    for i, layer in enumerate(net.layers):
        pair = Pair(i, layer.name, layer.type)
        pairs.append(pair)
        t = layer.type
        if t in ("softmaxloss", "loss"):
            # The loss: an optional softmax (separate or fused) then the model's end.
            if pending and pending[0] == "softmax":
                pair.fused_activation = "softmax"
                pair.notes.append(f"softmax fused into Keras layer {pending[1].param_layer}")
                pending = None
            seen_softmax = False
            while k < len(klayers) and keras_kind(klayers[k]) in ("flatten", "softmax"):
                if keras_kind(klayers[k]) == "softmax":
                    if seen_softmax or pair.fused_activation:
                        break  # a second softmax is extra
                    seen_softmax = True
                pair.keras.append(klayers[k].name)
                k += 1
            if i != n - 1:
                problems.append(f"MatConvNet layer '{layer.name}' ({t}) is a loss but not the last layer")
            break
        want = _EXPECT.get(t, (t,))
        if pending and pending[0] in want:
            # e.g. Conv2D(activation='relu') also computes this ReLU
            pair.fused_activation = pending[0]
            pair.notes.append(f"{pending[0]} fused into Keras layer {pending[1].param_layer}")
            pending = None
            continue
        if pending:
            problems.append(
                f"Keras layer '{pending[1].param_layer}' applies {pending[0]} where MatConvNet has none "
                f"after '{pending[1].name}'"
            )
            pending[1].notes.append(f"extra {pending[0]} activation in Keras")
            pending = None
        start = k
        while k < len(klayers) and keras_kind(klayers[k]) in _PREFIX.get(t, ()):
            k += 1
        if k < len(klayers) and keras_kind(klayers[k]) in want:
            main = klayers[k]
            k += 1
            while k < len(klayers) and keras_kind(klayers[k]) in _SUFFIX.get(t, ()):
                k += 1
            pair.keras = [l.name for l in klayers[start:k]]
            if t in ("conv", "convt", "bnorm"):
                pair.param_layer = main.name
            act = _activation_name(main) if t in ("conv", "convt") else None
            if act:
                pending = (act, pair)
        else:
            k = start
            if t == "dropout":
                pair.notes.append("no Keras Dropout: identity (exact in test mode)")
            else:
                got = (
                    f"'{klayers[k].name}' ({type(klayers[k]).__name__})"
                    if k < len(klayers)
                    else "the model's end"
                )
                problems.append(f"MatConvNet layer '{layer.name}' ({t}) has no Keras partner (found {got})")
                pair.notes.append("no Keras partner")
        # Keras layers MatConvNet has no counterpart for: attach to this pair and report.
        while k < len(klayers) and _is_extra(net, i, klayers, k):
            extra = klayers[k]
            problems.append(
                f"Keras layer '{extra.name}' ({type(extra).__name__}) has no MatConvNet partner "
                f"(after '{layer.name}')"
            )
            pair.keras.append(extra.name)
            pair.notes.append(f"extra Keras layer {extra.name}")
            k += 1
    if pending:
        problems.append(
            f"Keras layer '{pending[1].param_layer}' applies {pending[0]} where MatConvNet has none"
        )
    for extra in klayers[k:]:
        problems.append(
            f"Keras layer '{extra.name}' ({type(extra).__name__}) has no MatConvNet partner (at the end)"
        )
        if pairs:
            pairs[-1].keras.append(extra.name)
    return Alignment(pairs, problems)


def _is_extra(net: Net, i: int, klayers, k: int) -> bool:
    """Keras layer ``klayers[k]``, after MatConvNet layer i's run, cannot start the next
    MatConvNet layer's run."""
    kind = keras_kind(klayers[k])
    if i + 1 >= len(net.layers):
        return True
    nxt = net.layers[i + 1].type
    if nxt in ("softmaxloss", "loss"):
        return kind not in ("softmax", "flatten")
    allowed = set(_EXPECT.get(nxt, (nxt,))) | set(_PREFIX.get(nxt, ()))
    if kind in allowed:
        return False
    if nxt == "dropout":  # a missing Dropout is fine; look one further
        return _is_extra(net, i + 1, klayers, k)
    # Either this Keras layer is extra, or the next MatConvNet layer is missing: take the
    # reading under which more of the following layers pair up (an extra ReLU in
    # conv, ReLU, pool for MatConvNet's conv, pool, relu; a missing relu in lrn, lrn for
    # MatConvNet's lrn, relu, lrn).
    if _matching_run(net, i + 2, klayers, k) > _matching_run(net, i + 1, klayers, k + 1):
        return False
    return kind in ("relu", "sigmoid", "softmax", "dropout", "bnorm", "lrn", "pool") or kind.startswith(
        ("activation:", "other:")
    )


def _matching_run(net: Net, i: int, klayers, k: int) -> int:
    """How many MatConvNet layers from i on pair, one after another, with the Keras layers
    from k on (helper layers before and after each main one allowed)."""
    count = 0
    while i < len(net.layers) and net.layers[i].type not in ("softmaxloss", "loss"):
        t = net.layers[i].type
        while k < len(klayers) and keras_kind(klayers[k]) in _PREFIX.get(t, ()):
            k += 1
        if k >= len(klayers) or keras_kind(klayers[k]) not in _EXPECT.get(t, (t,)):
            break
        k += 1
        while k < len(klayers) and keras_kind(klayers[k]) in _SUFFIX.get(t, ()):
            k += 1
        count, i = count + 1, i + 1
    return count


def _explicit(net: Net, klayers, mapping: dict[str, list[str]]) -> Alignment:
    by_name = {l.name: l for l in klayers}
    pairs, problems = [], []
    for i, layer in enumerate(net.layers):
        names = list(mapping.get(layer.name, []))
        missing = [n for n in names if n not in by_name]
        if missing:
            problems.append(f"mapping for '{layer.name}' names unknown Keras layers {missing}")
            names = [n for n in names if n in by_name]
        pair = Pair(i, layer.name, layer.type, names)
        for n in names:
            if keras_kind(by_name[n]) in ("conv", "convt", "bnorm"):
                pair.param_layer = n
        if not names and layer.type not in ("softmaxloss", "loss", "dropout"):
            problems.append(
                f"MatConvNet layer '{layer.name}' ({layer.type}) has no Keras partner in the mapping"
            )
        pairs.append(pair)
    return Alignment(pairs, problems)
