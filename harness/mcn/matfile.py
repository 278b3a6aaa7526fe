"""MATLAB .mat I/O for simplenn networks and cnn_train checkpoints.

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

from harness.mcn.mat_hdf5 import hdf5_variable_names, read_hdf5, write_hdf5
from harness.mcn.mat_v5 import read_v5, v5_variable_names
from harness.mcn.mat_values import MatlabObject, is_sparse, unreadable
from harness.mcn.net import Layer, Net, matlab_field, python_field
from harness.mcn.options import McnError

__all__ = [
    "Checkpoint",
    "MatlabObject",
    "list_variables",
    "load_checkpoint",
    "load_net",
    "read_variables",
    "save_net",
]

NET_VARIABLES = ("net", "layers", "meta")
CHECKPOINT_VARIABLES = ("net", "layers", "meta", "state", "stats", "info")

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


@dataclass
class Checkpoint:
    """A cnn_train checkpoint: the net, ``state`` (``solverState`` per layer and
    parameter: arrays, dicts for the solvers, or 0 where never updated) and ``stats``."""

    net: Net
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


# --------------------------------------------------------------------------- to Net


def _net_from_struct(s: Any, source: str) -> Net:
    if not isinstance(s, dict) or "layers" not in s:
        raise McnError(f"Expected {source} to be a simplenn net struct with a 'layers' field.")
    layers_raw = s["layers"]
    if isinstance(layers_raw, dict):  # a single layer stored as a struct, not a cell
        layers_raw = [layers_raw]
    if not isinstance(layers_raw, list):
        raise McnError(f"Expected {source}.layers to be a cell array of layer structs.")
    layers = []
    for i, raw in enumerate(layers_raw):
        if not isinstance(raw, dict) or "type" not in raw:
            raise McnError(f"{source}.layers{{{i + 1}}}: Expected a struct with a 'type' field.")
        fields = {}
        for key, value in raw.items():
            if key == "weights":
                value = [_as_weight(w) for w in _as_list(value)]
            elif key == "precious":
                try:
                    value = bool(np.asarray(value).any()) if np.size(value) else False
                except (ValueError, TypeError):
                    raise McnError(
                        f"{source}.layers{{{i + 1}}}.precious: Expected a logical value. "
                        f"Received {type(value).__name__}"
                    ) from None
            elif key == "opts":
                value = _as_list(value)
            fields[python_field(key)] = value
        layer_type = fields.pop("type")
        name = fields.pop("name", None)
        weights = fields.pop("weights", None)
        layers.append(Layer(layer_type, name, weights, **fields))
    meta = s.get("meta", {})
    if not isinstance(meta, dict):
        meta = {}
    return Net(layers, meta)


def _as_weight(w: Any) -> Any:
    """A weight as an array (1x1 numbers come back as Python numbers); sparse matrices,
    MATLAB objects and anything NumPy cannot stack are kept as they are, for the caller
    to refuse with its own message."""
    if isinstance(w, np.ndarray | MatlabObject) or is_sparse(w):
        return w
    try:
        return np.asarray(w)
    except (ValueError, TypeError):
        return w


def _as_list(v: Any) -> list:
    if isinstance(v, list):
        return v
    if isinstance(v, np.ndarray) and v.size == 0:
        return []
    return [v]


def _find_net(variables: dict[str, Any], path: str) -> tuple[Net, dict[str, Any]]:
    if "net" in variables:
        return _net_from_struct(variables["net"], f"{path}: variable 'net'"), variables
    if "layers" in variables:
        return _net_from_struct(variables, path), variables
    names = ", ".join(sorted(list_variables(path))) or "none"
    raise McnError(
        f"Expected {path} to hold a MatConvNet simplenn net (a 'net' variable or 'layers' at top level). "
        f"Received variables: {names}"
    )


def load_net(path: str | os.PathLike) -> Net:
    """Load a simplenn net from a .mat file (v5/v7 or v7.3): a ``net`` variable, the
    struct's fields at top level, or a cnn_train checkpoint. The net is returned as
    stored (call ``vl_simplenn_tidy`` to fill MatConvNet's defaults)."""
    net, _ = _find_net(read_variables(path, NET_VARIABLES), str(path))
    return net


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Load a cnn_train checkpoint (``net-epoch-N.mat``): net, state (solverState) and
    stats (older cnn_train versions saved them as ``info``)."""
    variables = read_variables(path, CHECKPOINT_VARIABLES)
    net, _ = _find_net(variables, str(path))
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


def save_net(path: str | os.PathLike, net: Net, *, version: str = "7", variable: str | None = "net") -> None:
    """Save ``net`` as a MATLAB .mat file loadable by MatConvNet (``load(path)`` gives
    ``net``, or the fields at top level with ``variable=None``). ``version`` "7" (scipy,
    v5 format) or "7.3" (HDF5)."""
    if not isinstance(net, Net):
        raise McnError(f"Expected net to be a harness.mcn.Net. Received net={type(net).__name__}")
    if version not in ("7", "7.3"):
        raise McnError(f"Expected version '7' or '7.3'. Received version={version!r}")
    try:
        struct = _net_to_struct(net)
        variables = {variable: struct} if variable else struct
        if version == "7":
            import scipy.io

            scipy.io.savemat(str(path), variables, do_compression=True, oned_as="row")
        else:
            write_hdf5(Path(path), variables)
    except McnError:
        raise
    except (TypeError, ValueError, IndexError, OverflowError) as err:  # a value MATLAB cannot hold
        raise McnError(
            f"Cannot save the net as a v{version} .mat file ({type(err).__name__}: {err}). "
            "Expected layers whose fields are numbers, arrays, strings, cells or structs."
        ) from None
