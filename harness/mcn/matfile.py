"""MATLAB .mat I/O for simplenn networks and cnn_train checkpoints.

Reads MATLAB v5/v7 files with scipy.io and v7.3 files (HDF5) with h5py; writes both.
A file may hold the net struct's fields at top level (``layers``, ``meta``), a ``net``
variable, or a cnn_train checkpoint (``net-epoch-N.mat``: ``net``, ``state``, ``stats``),
whose solver state ``load_checkpoint`` exposes.

Conversion rules (the same for both formats): structs become dicts, cell arrays lists
(column-major order), char arrays str, numeric arrays stay arrays with MATLAB's shape
except 1x1 numerics, which become Python numbers; a layer's ``precious`` is a bool.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._util import McnError
from .net import Layer, Net, matlab_field, python_field

__all__ = ["Checkpoint", "load_checkpoint", "load_net", "save_net"]

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


def _read_variables(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise McnError(f"Expected an existing .mat file. Received path={str(path)!r} (no such file)")
    if path.is_dir():
        raise McnError(f"Expected a .mat file. Received path={str(path)!r} (a directory)")
    with open(path, "rb") as fh:
        head = fh.read(1024)
    if len(head) < 128:
        raise McnError(
            f"Expected a MATLAB .mat file. Received path={str(path)!r} (truncated: {len(head)} bytes)"
        )
    if head[512:520] == _HDF5_SIGNATURE or head[:8] == _HDF5_SIGNATURE:
        return _read_hdf5(path)
    import scipy.io

    try:
        raw = scipy.io.loadmat(path, squeeze_me=False, struct_as_record=True)
    except Exception as err:  # scipy raises several unrelated types for damaged files
        raise McnError(f"Expected a readable MATLAB .mat file. Received path={str(path)!r} ({err})") from None
    return {k: _from_scipy(v) for k, v in raw.items() if not k.startswith("__")}


def _from_scipy(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        if v.dtype.names is not None:
            items = [{n: _from_scipy(e[n]) for n in v.dtype.names} for e in v.ravel(order="F")]
            return items[0] if v.size == 1 else items
        if v.dtype == object:
            return [_from_scipy(e) for e in v.ravel(order="F")]
        if v.dtype.kind == "U":
            return "".join(v.ravel().tolist()) if v.size else ""
        if v.size == 1:
            return v.item()
    return v


def _read_hdf5(path: Path) -> dict[str, Any]:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return {k: _from_h5(f, f[k]) for k in f.keys() if not k.startswith("#")}
    except McnError:
        raise
    except Exception as err:
        raise McnError(
            f"Expected a readable MATLAB v7.3 .mat file. Received path={str(path)!r} ({err})"
        ) from None


def _attr(obj: Any, name: str) -> str | None:
    v = obj.attrs.get(name)
    if v is None:
        return None
    return v.decode() if isinstance(v, bytes) else str(v)


def _from_h5(f: Any, obj: Any) -> Any:
    import h5py

    if isinstance(obj, h5py.Group):
        names = obj.attrs.get("MATLAB_fields")
        order = [b"".join(n).decode() for n in names] if names is not None else list(obj.keys())
        return {k: _from_h5(f, obj[k]) for k in order if k in obj}
    cls = _attr(obj, "MATLAB_class")
    data = obj[()]
    if obj.attrs.get("MATLAB_empty", 0):
        shape = tuple(int(s) for s in np.asarray(data).ravel()[::-1]) if np.size(data) else (0, 0)
        if cls == "cell":
            return []
        if cls == "char":
            return ""
        return np.zeros(shape, dtype=_H5_DTYPES.get(cls, np.float64))
    if cls == "cell":
        refs = np.asarray(data).T  # HDF5 stores MATLAB arrays with dimensions reversed
        return [_from_h5(f, f[r]) for r in refs.ravel(order="F")]
    if cls == "char":
        return "".join(chr(c) for c in np.asarray(data).T.ravel(order="F"))
    arr = np.asarray(data).T
    if cls == "logical":
        arr = arr.astype(bool)
    elif cls in _H5_DTYPES:
        arr = arr.astype(_H5_DTYPES[cls], copy=False)
    return arr.item() if arr.size == 1 else arr


_H5_DTYPES = {
    "double": np.float64,
    "single": np.float32,
    "int8": np.int8,
    "int16": np.int16,
    "int32": np.int32,
    "int64": np.int64,
    "uint8": np.uint8,
    "uint16": np.uint16,
    "uint32": np.uint32,
    "uint64": np.uint64,
    "logical": bool,
}


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
                value = [np.asarray(w) if not isinstance(w, np.ndarray) else w for w in _as_list(value)]
            elif key == "precious":
                value = bool(np.asarray(value).any()) if np.size(value) else False
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
    names = ", ".join(sorted(variables)) or "none"
    raise McnError(
        f"Expected {path} to hold a MatConvNet simplenn net (a 'net' variable or 'layers' at top level). "
        f"Received variables: {names}"
    )


def load_net(path: str | os.PathLike) -> Net:
    """Load a simplenn net from a .mat file (v5/v7 or v7.3): a ``net`` variable, the
    struct's fields at top level, or a cnn_train checkpoint. The net is returned as
    stored (call ``vl_simplenn_tidy`` to fill MatConvNet's defaults)."""
    net, _ = _find_net(_read_variables(path), str(path))
    return net


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Load a cnn_train checkpoint (``net-epoch-N.mat``): net, state (solverState) and stats."""
    variables = _read_variables(path)
    net, _ = _find_net(variables, str(path))
    state = variables.get("state", {})
    stats = variables.get("stats", {})
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
    struct = _net_to_struct(net)
    variables = {variable: struct} if variable else struct
    if version == "7":
        import scipy.io

        scipy.io.savemat(str(path), variables, do_compression=True, oned_as="row")
    elif version == "7.3":
        _write_hdf5(Path(path), variables)
    else:
        raise McnError(f"Expected version '7' or '7.3'. Received version={version!r}")


def _write_hdf5(path: Path, variables: dict[str, Any]) -> None:
    import h5py

    with h5py.File(path, "w", userblock_size=512) as f:
        refs = f.create_group("#refs#")
        counter = [0]
        for key, value in variables.items():
            _h5_write(f, refs, counter, key, value)
    header = f"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: {time.strftime('%c')} HDF5 schema 1.00 ."
    block = header.encode().ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02IM"
    with open(path, "r+b") as fh:
        fh.write(block.ljust(512, b"\x00"))


def _h5_write(parent: Any, refs: Any, counter: list[int], name: str, value: Any) -> Any:
    import h5py

    if isinstance(value, dict):
        g = parent.create_group(name)
        g.attrs["MATLAB_class"] = np.bytes_("struct")
        names = np.empty(len(value), dtype=object)
        for n, k in enumerate(value):
            names[n] = np.array(list(k), dtype="S1")
        g.attrs.create("MATLAB_fields", names, dtype=h5py.vlen_dtype(np.dtype("S1")))
        for k, v in value.items():
            _h5_write(g, refs, counter, k, v)
        return g
    if isinstance(value, np.ndarray) and value.dtype == object:
        value = list(value.ravel(order="F")) if value.size else []
    if isinstance(value, list | tuple):
        if not value:
            return _h5_empty(parent, name, "cell")
        ref_list = []
        for item in value:
            counter[0] += 1
            obj = _h5_write(refs, refs, counter, f"r{counter[0]}", item)
            ref_list.append(obj.ref)
        ds = parent.create_dataset(name, data=np.array([ref_list], dtype=h5py.ref_dtype).T)
        ds.attrs["MATLAB_class"] = np.bytes_("cell")
        return ds
    if isinstance(value, str):
        if not value:
            return _h5_empty(parent, name, "char")
        ds = parent.create_dataset(name, data=np.array([[ord(c)] for c in value], dtype=np.uint16))
        ds.attrs["MATLAB_class"] = np.bytes_("char")
        ds.attrs["MATLAB_int_decode"] = np.int32(2)
        return ds
    arr = np.asarray(value)
    if arr.dtype == bool:
        cls, arr = "logical", arr.astype(np.uint8)
    else:
        if arr.dtype.kind in "iu" and arr.ndim == 0:
            arr = arr.astype(np.float64)  # MATLAB numbers are doubles unless asked otherwise
        cls = {np.dtype(v): k for k, v in _H5_DTYPES.items() if k != "logical"}.get(arr.dtype)
        if cls is None:
            raise McnError(f"Expected numeric, string, list or dict values. Received {name}={value!r}")
    if arr.ndim < 2:
        arr = arr.reshape(1, -1) if arr.ndim == 1 else arr.reshape(1, 1)
    if arr.size == 0:
        return _h5_empty(parent, name, cls, arr.shape)
    ds = parent.create_dataset(name, data=arr.T)
    ds.attrs["MATLAB_class"] = np.bytes_(cls)
    if cls == "logical":
        ds.attrs["MATLAB_int_decode"] = np.int32(1)
    return ds


def _h5_empty(parent: Any, name: str, cls: str, shape: tuple = (0, 0)) -> Any:
    ds = parent.create_dataset(name, data=np.array(shape[::-1], dtype=np.uint64))
    ds.attrs["MATLAB_class"] = np.bytes_(cls)
    ds.attrs["MATLAB_empty"] = np.uint8(1)
    return ds
