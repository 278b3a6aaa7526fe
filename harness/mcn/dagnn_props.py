"""The properties of the DagNN blocks (``matlab/+dagnn/*.m`` at commit 1e5ae7b7).

Each block type the reference runs has its MATLAB class defaults (``BLOCKS``) and
property setters (``normalise_block``, what ``block.load(struct)`` and the constructor
do); a block's ``opts`` cell becomes keywords (``parse_opts``). harness.mcn.dagnn_blocks
evaluates the blocks and re-exports these names.

Block properties are snake_case keys of ``DagLayer.block`` (``poolSize`` -> ``pool_size``,
``hasBias`` -> ``has_bias``): numeric vectors as 1-D float64 arrays, numbers as float,
logicals as bool, ``opts`` as a list (MATLAB's cell). cuDNN options (``'cuDNN'``,
``'NoCuDNN'``, ``{'CudnnWorkspaceLimit', 2^31}``) only choose an implementation and are
ignored; other options are passed on where MatConvNet passes them (a Loss's
``instanceWeights``, ``topK`` ...), or refused naming the option.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from harness.mcn.mat_net import as_double
from harness.mcn.options import McnError, is_empty

if TYPE_CHECKING:
    from harness.mcn.dagnn_graph import DagLayer

__all__ = [
    "BLOCKS",
    "BOOL_PROPS",
    "VECTOR_PROPS",
    "block_defaults",
    "normalise_block",
    "number",
    "parse_opts",
    "supported",
    "unsupported_block",
]

# MATLAB class defaults of every block the reference runs (snake_case property names).
_FILTER = {"pad": [0.0, 0.0, 0.0, 0.0], "stride": [1.0, 1.0], "dilate": [1.0, 1.0]}
_LOSS = {"loss": "softmaxlog", "ignore_average": False, "normalise": True, "opts": []}
BLOCKS: dict[str, dict[str, Any]] = {
    "dagnn.Conv": {**_FILTER, "size": [0.0, 0.0, 0.0, 0.0], "has_bias": True, "opts": ["cuDNN"]},
    "dagnn.ConvTranspose": {
        "size": [0.0, 0.0, 0.0, 0.0],
        "has_bias": True,
        "upsample": [1.0, 1.0],
        "crop": [0.0, 0.0, 0.0, 0.0],
        "num_groups": 1.0,
        "opts": ["cuDNN"],
    },
    "dagnn.Pooling": {**_FILTER, "method": "max", "pool_size": [1.0, 1.0], "opts": ["cuDNN"]},
    "dagnn.BatchNorm": {"num_channels": None, "epsilon": 1e-5, "opts": ["NoCuDNN"]},
    "dagnn.ReLU": {"use_short_circuit": True, "leak": 0.0, "opts": []},
    "dagnn.Sigmoid": {},
    "dagnn.SoftMax": {},
    "dagnn.LRN": {"param": [5.0, 1.0, 0.0001 / 5, 0.75]},
    "dagnn.DropOut": {"rate": 0.5, "frozen": False},
    "dagnn.Sum": {},
    "dagnn.Concat": {"dim": 3.0},
    "dagnn.Crop": {"crop": [0.0, 0.0]},
    "dagnn.Scale": {"size": None, "has_bias": True},
    "dagnn.Loss": dict(_LOSS),
    "dagnn.NormOffset": {"param": [1.0, 0.5]},
    "dagnn.SpatialNorm": {"param": [2.0, 2.0, 10.0, 2.0]},
    "dagnn.PDist": {**_LOSS, "loss": "pdist", "p": 2.0, "aggregate": True, "no_root": False, "epsilon": 1e-6},
}
# Transient properties some files still carry (MATLAB's load would set them, save never writes them).
_TRANSIENT = {"dagnn.Sum": ("num_inputs",), "dagnn.Concat": ("num_inputs",)}
VECTOR_PROPS = frozenset({"pad", "stride", "dilate", "size", "upsample", "crop", "pool_size", "param"})
BOOL_PROPS = frozenset(
    {"has_bias", "use_short_circuit", "ignore_average", "normalise", "frozen", "aggregate", "no_root"}
)
_NUMBER_PROPS = frozenset({"leak", "epsilon", "rate", "dim", "num_groups", "num_channels", "p"})
_STRING_PROPS = frozenset({"method", "loss"})
_CUDNN_FLAGS = frozenset({"cudnn", "nocudnn"})
_CUDNN_OPTIONS = frozenset({"cudnnworkspacelimit"})


def supported(block_type: str) -> bool:
    """Whether the reference runs blocks of ``block_type`` (a key of ``BLOCKS``)."""
    return block_type in BLOCKS


def block_defaults(block_type: str) -> dict[str, Any]:
    """The MATLAB class defaults of ``block_type`` (empty for a block the reference does not run)."""
    out = {}
    for key, value in BLOCKS.get(block_type, {}).items():
        out[key] = np.array(value, dtype=np.float64) if key in VECTOR_PROPS and value is not None else value
        if isinstance(value, list) and key == "opts":
            out[key] = list(value)
    return out


# ------------------------------------------------------------------ property values and setters


def number(value: Any, where: str) -> float | None:
    """``value`` as one float (None for an empty value); McnError at ``where`` otherwise."""
    if value is None or (isinstance(value, np.ndarray | list) and np.size(value) == 0):
        return None
    try:
        arr = np.asarray(value, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise McnError(f"{where}: Expected a number. Received {type(value).__name__}") from None
    if arr.size != 1:
        raise McnError(f"{where}: Expected one number. Received {arr.size} values")
    return float(arr[0])


def _vector(value: Any, where: str) -> np.ndarray | None:
    if value is None:
        return None
    if isinstance(value, str):
        raise McnError(f"{where}: Expected numbers. Received char {value[:20]!r}")
    try:
        return np.asarray(value, dtype=np.float64).ravel(order="F")
    except (TypeError, ValueError):
        raise McnError(f"{where}: Expected numbers. Received {type(value).__name__}") from None


def _bool(value: Any, where: str) -> bool:
    if isinstance(value, bool | np.bool_):
        return bool(value)
    n = number(value, where)
    return bool(n) if n is not None else False


def _expand(v: np.ndarray, n: int, index: tuple[int, ...] | None = None) -> np.ndarray:
    """MATLAB's property setters: one value repeated (``[p p p p]``), two values spread by
    ``index`` (pad ``[1 1 2 2]``), otherwise kept as given."""
    if v.size == 1:
        return np.repeat(v, n)
    if v.size == 2 and index is not None:
        return v[list(index)]
    return v


def normalise_block(block_type: str, block: dict[str, Any], where: str) -> tuple[dict[str, Any], list[str]]:
    """``block.load(struct)`` then the constructor's setters: the block's defaults overlaid
    with ``block`` (snake_case keys), values converted (uint8 and integer numbers become
    float, logicals bool), pad/stride/dilate/crop/upsample/size expanded as the MATLAB
    setters do. Returns the block and what was ignored (transient properties, properties
    the class does not have: MATLAB's load would refuse those)."""
    defaults = block_defaults(block_type)
    known = supported(block_type)
    out = dict(defaults)
    ignored: list[str] = []
    for key, value in block.items():
        at = f"{where}.block.{key}"
        if known and key in _TRANSIENT.get(block_type, ()):
            ignored.append(key)
            continue
        if known and key not in defaults:
            ignored.append(key)
        if not known or key not in defaults:  # a custom block's, or a property the class lacks
            value = _opts_list(value) if key == "opts" else as_double(value, keep_logical=True)
        elif key in VECTOR_PROPS:
            value = _vector(value, at)
        elif key in BOOL_PROPS:
            value = _bool(value, at)
        elif key in _NUMBER_PROPS:
            value = number(value, at)
        elif key in _STRING_PROPS:
            if not isinstance(value, str):
                raise McnError(f"{at}: Expected a string. Received {type(value).__name__}")
        elif key == "opts":
            value = _opts_list(value)
        else:
            value = as_double(value, keep_logical=True)
        out[key] = value
    for key in ("pad", "crop") if block_type != "dagnn.Crop" else ():
        if isinstance(out.get(key), np.ndarray):
            out[key] = _expand(out[key], 4, (0, 0, 1, 1))
    for key in ("stride", "dilate", "upsample"):
        if isinstance(out.get(key), np.ndarray):
            out[key] = _expand(out[key], 2)
    if block_type in ("dagnn.Conv", "dagnn.ConvTranspose") and isinstance(out.get("size"), np.ndarray):
        out["size"] = np.concatenate([out["size"], np.ones(4)])[:4]
    return out, ignored


def _opts_list(value: Any) -> list:
    if value is None or (isinstance(value, np.ndarray) and value.size == 0):
        return []
    if isinstance(value, list | tuple):
        return [as_double(v, keep_logical=True) for v in value]
    return [as_double(value, keep_logical=True)]


def parse_opts(opts: Any, allowed: dict[str, str], what: str) -> dict[str, Any]:
    """A block's ``opts`` cell as keywords: cuDNN switches are dropped, ``allowed`` maps
    MATLAB option names (lower case) to keyword names; anything else is refused."""
    items = list(opts) if isinstance(opts, list | tuple) else ([] if is_empty(opts) else [opts])
    out: dict[str, Any] = {}
    i = 0
    while i < len(items):
        name = items[i]
        if not isinstance(name, str):
            raise McnError(f"Expected block property 'opts' to hold option names. Received {name!r}")
        key = name.lower()
        if key in _CUDNN_FLAGS:
            i += 1
            continue
        if i + 1 >= len(items):
            raise McnError(f"block property 'opts': option '{name}' has no value")
        if key in _CUDNN_OPTIONS:
            i += 2
            continue
        if key not in allowed:
            raise McnError(
                f"block property 'opts': option '{name}' is not supported by the reference for {what} "
                f"(supported: cuDNN switches{', ' if allowed else ''}{', '.join(sorted(allowed))})"
            )
        out[allowed[key]] = items[i + 1]
        i += 2
    return out


def unsupported_block(layer: DagLayer) -> McnError:
    """The McnError for a layer whose block type the reference does not run (a custom layer)."""
    return McnError(
        f"block type {layer.type!r} is not one the reference runs (a custom layer; the reference "
        f"runs {', '.join(sorted(BLOCKS))}): remove it with net.remove_layer({layer.name!r}) to "
        "evaluate the rest of the network"
    )
