"""MATLAB .mat I/O for simplenn and DagNN networks and cnn_train checkpoints.

The public API: ``read_variables``, ``list_variables``, ``load_net``, ``load_checkpoint``,
``save_net``, and the conversion of the net struct to a ``Net``. MATLAB v5/v7 files are
read with scipy.io (``mat_v5``, after ``matscan`` has checked them) and v7.3 files (HDF5)
with h5py (``mat_hdf5``, through the checks of ``mat_hdf5_guard``); both are written.
A file may hold the net struct's fields at top level (``layers``, ``meta``), a ``net``
variable, or a cnn_train checkpoint (``net-epoch-N.mat``: ``net``, ``state``, ``stats``),
whose solver state ``load_checkpoint`` exposes.

Conversion rules (the same for both formats): structs become dicts (struct arrays lists
of dicts), cell arrays lists (column-major order), char arrays str (UTF-16 code units:
surrogate pairs joined, lone surrogates replaced by U+FFFD), numeric arrays stay arrays
with MATLAB's shape and dtype except 1x1 real numerics, which become Python numbers;
complex arrays stay complex ndarrays (even 1x1), sparse matrices become
scipy.sparse.csc_matrix, function handles and objects (MCOS such as gpuArray, old-style
classes) become ``MatlabObject`` carrying the class name only; a layer's ``precious`` is a
bool. The loader does not refuse any of these: callers do, with their own message.

From the converted struct to a ``Net`` (harness.mcn.mat_net's ``net_from_struct``), what
real MatConvNet files hold is adapted: a bare cell of layers saved as ``net`` is read as
``net.layers``; integer and logical numbers in layer fields and meta become float64
(MATLAB saves integer-valued doubles as uint8, which scipy returns, and uint8 arithmetic
wraps); weights are single or double arrays (integer ones float64, 1x1 ones (1, 1));
pre-beta ``filters``/``biases`` become ``weights``; an old cnn_train's per-layer
``momentum`` is dropped; a layer field holding a MATLAB object (function handle, gpuArray
...) other than ``type`` and ``weights`` is dropped, and so is a checkpoint's stale
loss-layer ``class`` (here), each with a line in ``net.notes``. A DagNN network (a
``dagnn.DagNN`` saveobj struct: vars, params, layers with inputs/outputs/block; v5 struct
arrays or v7.3 HDF5 struct arrays) becomes a ``harness.mcn.dagnn.DagNet``
(``DagNet.from_struct`` says what it adapts); only a dagnn.DagNN saved as a MATLAB object
(MCOS, unreadable) raises ``DagNNNotSupported``, which ``require_simplenn`` also raises
for the callers that do not handle DagNN networks yet.

Files are untrusted: ``read_variables`` reads only the variables asked for (``load_net``:
net, layers, meta), refuses nesting deeper than MAX_NESTING and declared sizes above
``memory_budget()`` before anything is allocated (v5: ``matscan`` walks the file first;
v7.3: every dataset's size is charged before it is read), and never follows HDF5 links,
external storage or virtual datasets to other files. Every failure is an McnError naming
the file and, where known, the MATLAB path of the value (``net.layers{3}.weights{1}``).
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from harness.mcn.dagnn import DagNet
from harness.mcn.mat_hdf5 import hdf5_variable_names, read_hdf5, write_hdf5, write_struct_arrays
from harness.mcn.mat_net import net_from_struct
from harness.mcn.mat_v5 import read_v5, v5_variable_names
from harness.mcn.mat_values import MatlabObject, safe_label, unreadable
from harness.mcn.net import Net, matlab_field
from harness.mcn.options import McnError

__all__ = [
    "Checkpoint",
    "DagNNNotSupported",
    "MatlabObject",
    "list_variables",
    "load_checkpoint",
    "load_net",
    "read_variables",
    "require_simplenn",
    "save_net",
]

NET_VARIABLES = ("net", "layers", "meta")
CHECKPOINT_VARIABLES = ("net", "layers", "meta", "state", "stats", "info")

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


@dataclass
class Checkpoint:
    """A cnn_train checkpoint: the net, ``state`` (``solverState`` per layer and
    parameter: arrays, dicts for the solvers, or 0 where never updated) and ``stats``."""

    net: Net | DagNet
    state: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)

    @property
    def solver_state(self) -> list[list[Any]]:
        return self.state.get("solverState", []) or []


# --------------------------------------------------------------------------- reading


def _check_path(path: str | os.PathLike) -> tuple[Path, str]:
    p = Path(path)
    if not p.exists():
        raise McnError(f"Expected an existing .mat file. Received path={str(p)!r} (no such file)")
    if p.is_dir():
        raise McnError(f"Expected a .mat file. Received path={str(p)!r} (a directory)")
    if not p.is_file():  # a FIFO would block the read below, a device never end
        raise McnError(f"Expected a .mat file. Received path={str(p)!r} (not a regular file)")
    try:
        with open(p, "rb") as fh:
            head = fh.read(1024)
    except OSError as err:
        raise unreadable(str(p), f"cannot open: {err.strerror}") from None
    if len(head) < 128:
        raise McnError(
            f"Expected a MATLAB .mat file. Received path={str(p)!r} (truncated: {len(head)} bytes)"
        )
    kind = "hdf5" if head[512:520] == _HDF5_SIGNATURE or head[:8] == _HDF5_SIGNATURE else "v5"
    return p, kind


def read_variables(path: str | os.PathLike, wanted: Collection[str] | None = None) -> dict[str, Any]:
    """The top-level variables of a .mat file (v5/v7 or v7.3), converted by the rules at
    the top of this module; only those named in ``wanted`` (all when None) are read, the
    others are skipped without being decompressed. Hostile or damaged files raise
    McnError naming the file and the MATLAB path of the offending value: nesting deeper
    than ``MAX_NESTING``, declared sizes above ``memory_budget()``, HDF5 links, external
    or virtual storage, malformed or truncated data."""
    p, kind = _check_path(path)
    wanted = None if wanted is None else frozenset(wanted)
    if kind == "hdf5":
        return read_hdf5(p, wanted)
    return read_v5(p, wanted)


_read_variables = read_variables  # the historical name (harness.data, tests.golden)


def list_variables(path: str | os.PathLike) -> list[str]:
    """Names of the top-level variables of a .mat file, without reading any of them."""
    p, kind = _check_path(path)
    return v5_variable_names(p) if kind == "v5" else hdf5_variable_names(p)


_LOSS_TYPES = ("loss", "softmaxloss")


# --------------------------------------------------------------------------- DagNN


class DagNNNotSupported(McnError):
    """A MatConvNet DagNN network (``dagnn.DagNN``) where only simplenn is handled: a
    dagnn.DagNN saved as a MATLAB object (unreadable), or a ``DagNet`` handed to a command
    that does not support DagNN yet (``require_simplenn``)."""


_DAGNN_LAYER_FIELDS = frozenset({"inputs", "outputs", "block"})


def _dagnn_layers(layers: Any) -> bool:
    """Whether ``layers`` holds a DagNN layer: type 'dagnn.*', or inputs/outputs/block."""
    items = [layers] if isinstance(layers, dict) else layers if isinstance(layers, list) else []
    for layer in items:
        if isinstance(layer, dict):
            t = layer.get("type")
            if (isinstance(t, str) and t.startswith("dagnn.")) or _DAGNN_LAYER_FIELDS <= layer.keys():
                return True
    return False


def _is_dagnn(s: Any) -> bool:
    """A dagnn.DagNN saveobj struct (vars, params, layers with inputs/outputs/block) or
    a dagnn.DagNN object saved as such."""
    if isinstance(s, MatlabObject):
        return s.matlab_class.startswith("dagnn.")
    if isinstance(s, list):  # a bare cell of DagNN layers
        return _dagnn_layers(s)
    return (
        isinstance(s, dict)
        and "layers" in s
        and ({"vars", "params"} <= s.keys() or _dagnn_layers(s["layers"]))
    )


def _dagnn_object_error(s: MatlabObject, path: str) -> DagNNNotSupported:
    return DagNNNotSupported(
        f"{path}: this file holds a MatConvNet DagNN network (dagnn.DagNN: vars, params, layers; "
        f"saved as a MATLAB {safe_label(s.matlab_class)} object); mcn-harness reads simplenn networks "
        "only so far (DagNN support is planned)"
    )


def _dagnet(s: Any, source: str) -> DagNet:
    if isinstance(s, list):  # a bare cell (or struct array) of DagNN layers
        s = {"layers": s}
    return DagNet.from_struct(s, source)


def require_simplenn(net: Any, what: str) -> Net:
    """``net`` if it is a simplenn ``Net``; a ``DagNet`` raises DagNNNotSupported (an
    McnError, one line) saying that ``what`` (e.g. "mcn-harness port") does not support
    DagNN networks yet."""
    if isinstance(net, DagNet):
        raise DagNNNotSupported(
            f"{what} does not support DagNN networks yet (a MatConvNet DagNN network, dagnn.DagNN: "
            f"{len(net.vars)} vars, {len(net.params)} params, {len(net.layers)} layers); it handles "
            "simplenn networks only so far"
        )
    return net


# --------------------------------------------------------------------------- finding the net


def _find_net(
    variables: dict[str, Any], path: str, checkpoint: bool | None = None
) -> tuple[Net | DagNet, dict[str, Any]]:
    """The net of a file's variables. ``checkpoint``: whether the file is a cnn_train
    checkpoint (None: find out from the file's variable names, only if it matters)."""
    if "net" in variables:
        s = variables["net"]
        if isinstance(s, MatlabObject) and _is_dagnn(s):
            raise _dagnn_object_error(s, path)
        if _is_dagnn(s):
            return _dagnet(s, f"{path}: variable 'net'"), variables
        net = net_from_struct(s, f"{path}: variable 'net'")
    elif "layers" in variables:
        if _is_dagnn(variables) or (
            isinstance(variables["layers"], list | dict) and {"vars", "params"} <= set(list_variables(path))
        ):
            fields = {k: v for k, v in variables.items() if k in ("layers", "meta")}
            fields |= read_variables(path, ("vars", "params"))
            return _dagnet(fields, path), variables
        net = net_from_struct(variables, path)
    else:
        names = ", ".join(sorted(list_variables(path))) or "none"
        raise McnError(
            f"Expected {path} to hold a MatConvNet simplenn or DagNN net (a 'net' variable or 'layers' at "
            f"top level). Received variables: {names}"
        )
    _drop_stale_labels(net, path, checkpoint)
    return net, variables


_TRAINING_VARIABLES = frozenset({"state", "stats", "info"})


def _drop_stale_labels(net: Net, path: str, checkpoint: bool | None) -> None:
    """cnn_train sets the loss layer's ``class`` to each batch's labels and saves the net
    with the last batch's still there: in a checkpoint that field is stale (a net saved
    with ``class`` on purpose, as the golden files are, keeps it)."""
    for i, layer in enumerate(net.layers):
        if not isinstance(layer.type, str) or layer.type not in _LOSS_TYPES or not layer.has("class_"):
            continue
        if checkpoint is None:
            checkpoint = bool(_TRAINING_VARIABLES & set(list_variables(path)))
        if not checkpoint:
            return
        name = layer.name if isinstance(layer.name, str) else f"layer{i + 1}"
        del layer.class_
        net.notes.append(
            f"layer {i + 1} '{safe_label(name)}': stale field 'class' "
            "(labels of the last training batch) ignored"
        )


def load_net(path: str | os.PathLike) -> Net | DagNet:
    """Load a net from a .mat file (v5/v7 or v7.3): a ``net`` variable (a net struct or a
    bare cell of layer structs), the struct's fields at top level, or a cnn_train
    checkpoint of any era. A simplenn net is returned as stored, adapted as
    ``net_from_struct`` says (call ``vl_simplenn_tidy`` to fill MatConvNet's defaults);
    ``net.notes`` lists what was left out (MATLAB objects in layer fields, a checkpoint's
    stale loss labels). A DagNN net (a dagnn.DagNN saveobj struct) is returned as a
    ``DagNet`` (``DagNet.from_struct``: as ``dagnn.DagNN.loadobj``); a dagnn.DagNN saved as
    a MATLAB object raises ``DagNNNotSupported`` (an McnError). Callers that handle
    simplenn only call ``require_simplenn``."""
    net, _ = _find_net(read_variables(path, NET_VARIABLES), str(path))
    return net


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Load a cnn_train (or cnn_train_dag: the net is then a ``DagNet``) checkpoint
    (``net-epoch-N.mat``): net, state (solverState) and stats (older cnn_train versions
    saved them as ``info``)."""
    variables = read_variables(path, CHECKPOINT_VARIABLES)
    net, _ = _find_net(variables, str(path), checkpoint=bool(_TRAINING_VARIABLES & variables.keys()))
    state = variables.get("state", {})
    stats = variables.get("stats", variables.get("info", {}))
    return Checkpoint(net, state if isinstance(state, dict) else {}, stats if isinstance(stats, dict) else {})


# --------------------------------------------------------------------------- writing


def _net_to_struct(net: Net) -> dict[str, Any]:
    layers = []
    for layer in net.layers:
        d: dict[str, Any] = {}
        for key, value in layer.fields():
            d[matlab_field(key)] = _cell(value) if key in ("weights", "opts") else value
        layers.append(d)
    return {"layers": _cell(layers), "meta": net.meta}


def _cell(items: list) -> np.ndarray:
    out = np.empty((1, len(items)) if items else (0, 0), dtype=object)
    for i, item in enumerate(items):
        out[0, i] = item
    return out


_DAGNN_ARRAYS = ("vars", "params", "layers")


def _to_mat(v: Any) -> Any:
    """Lists as cells (object arrays) and None as ``[]``, inside dicts too, for scipy."""
    if isinstance(v, list | tuple):
        return _cell([_to_mat(x) for x in v])
    if isinstance(v, dict):
        return {k: _to_mat(x) for k, x in v.items()}
    if v is None:
        return np.zeros((0, 0))
    return v


def _struct_array(items: list[dict[str, Any]], keys: tuple[str, ...]) -> np.ndarray:
    """A 1 x N MATLAB struct array for scipy (a 0 x 0 one with the same fields when empty)."""
    out = np.empty((1, len(items)) if items else (0, 0), dtype=[(k, object) for k in keys])
    for i, item in enumerate(items):
        for k in keys:
            out[0, i][k] = _to_mat(item[k])
    return out


_DAGNN_KEYS = {
    "vars": ("name", "precious"),
    "params": ("name", "value", "learningRate", "weightDecay"),
    "layers": ("name", "type", "inputs", "outputs", "params", "block"),
}


def _dagnn_v5(net: DagNet) -> dict[str, Any]:
    struct = net.to_struct()
    out = {k: _struct_array(struct[k], _DAGNN_KEYS[k]) for k in _DAGNN_ARRAYS}
    out["meta"] = _to_mat(struct["meta"])
    return out


def save_net(
    path: str | os.PathLike | Net | DagNet,
    net: Net | DagNet | str | os.PathLike,
    *,
    version: str = "7",
    variable: str | None = "net",
) -> None:
    """Save ``net`` as a MATLAB .mat file loadable by MatConvNet (``load(path)`` gives
    ``net``, or the fields at top level with ``variable=None``). ``version`` "7" (scipy,
    v5 format) or "7.3" (HDF5). A ``DagNet`` is written as ``saveobj`` writes it (struct
    arrays ``vars``, ``params``, ``layers`` with ``block``, and ``meta``), loadable by
    ``dagnn.DagNN.loadobj``. ``save_net(net, path)`` is accepted too."""
    if isinstance(path, Net | DagNet) and not isinstance(net, Net | DagNet):
        path, net = net, path
    if not isinstance(net, Net | DagNet):
        raise McnError(f"Expected net to be a harness.mcn.Net or DagNet. Received net={type(net).__name__}")
    if version not in ("7", "7.3"):
        raise McnError(f"Expected version '7' or '7.3'. Received version={version!r}")
    try:
        if isinstance(net, DagNet):
            struct = _dagnn_v5(net) if version == "7" else net.to_struct()
        else:
            struct = _net_to_struct(net)
        variables = {variable: struct} if variable else struct
        if version == "7":
            import scipy.io

            scipy.io.savemat(str(path), variables, do_compression=True, oned_as="row")
        else:
            write_hdf5(Path(path), variables)
            if isinstance(net, DagNet):
                counts = {k: len(struct[k]) for k in _DAGNN_ARRAYS}
                write_struct_arrays(Path(path), variable or "/", _DAGNN_KEYS, counts)
    except McnError:
        raise
    except (TypeError, ValueError, IndexError, OverflowError) as err:  # a value MATLAB cannot hold
        raise McnError(
            f"Cannot save the net as a v{version} .mat file ({type(err).__name__}: {err}). "
            "Expected layers whose fields are numbers, arrays, strings, cells or structs."
        ) from None
