"""MATLAB v7.3 (HDF5) .mat files: reading through the guards of ``mat_hdf5_guard`` and
converting by the rules at the top of harness.mcn.matfile, and writing what MATLAB's
``load`` reads."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from harness.mcn import matscan
from harness.mcn.mat_hdf5_guard import H5Reader, open_hdf5
from harness.mcn.mat_values import MatlabObject, checked_sparse, fix_str, one_line, safe_label, unreadable
from harness.mcn.options import MAX_NESTING, McnError

__all__ = ["H5_DTYPES", "hdf5_variable_names", "read_hdf5", "write_hdf5", "write_struct_arrays"]

H5_DTYPES = {
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
_H5_KNOWN_CLASSES = {"char", "cell", "struct", "canonical empty"}  # plus H5_DTYPES


def hdf5_variable_names(path: Path) -> list[str]:
    """Names of the top-level variables of a v7.3 file, without reading any of them."""
    h5py, f = open_hdf5(path)
    with f:
        try:
            names = [n.decode("utf-8", "replace") for n in f.id]
        except Exception as err:
            raise unreadable(str(path), one_line(err), "v7.3 ") from None
    return [fix_str(n) for n in names if not n.startswith("#")]


def read_hdf5(path: Path, wanted: frozenset[str] | None) -> dict[str, Any]:
    h5py, f = open_hdf5(path)
    try:
        with f:
            ctx = H5Reader(h5py, f, str(path))
            out: dict[str, Any] = {}
            for raw_name in f.id:
                name = raw_name.decode("utf-8", "replace")
                if name.startswith("#") or (wanted is not None and name not in wanted):
                    continue  # '#refs#', '#subsystem#' and unwanted variables: never opened
                label = safe_label(name)
                out[fix_str(name)] = _from_h5(ctx, ctx.member(f, raw_name, label), label, 0)
            return out
    except McnError:
        raise
    except Exception as err:
        raise unreadable(str(path), one_line(err), "v7.3 ") from None


def _from_h5(ctx: H5Reader, obj: Any, mpath: str, depth: int = 0) -> Any:
    """Convert one HDF5 object of a v7.3 file; ``depth`` counts the structs and cells
    around it (refused above MAX_NESTING, which also ends reference cycles)."""
    h5py = ctx.h5py
    if depth > MAX_NESTING:
        raise ctx.fail(mpath, f"nested deeper than {MAX_NESTING} levels (MAX_NESTING)")
    ctx.visit(obj, mpath)
    ctx.charge(matscan.OBJECT_OVERHEAD, mpath)
    cls = ctx.attr_str(obj, "MATLAB_class", mpath)
    is_object = ctx.has_attr(obj, "MATLAB_object_decode")
    if isinstance(obj, h5py.Group):
        if ctx.has_attr(obj, "MATLAB_sparse"):
            return _h5_sparse(ctx, obj, cls, mpath)
        if is_object or cls not in (None, "struct"):
            return MatlabObject(cls or "object")  # function handles, old-style objects
        return _h5_struct(ctx, obj, mpath, depth)
    ds = obj
    ctx.check_dataset(ds, mpath)
    if is_object or (cls is not None and cls not in _H5_KNOWN_CLASSES and cls not in H5_DTYPES):
        return MatlabObject(cls or "object")  # MCOS objects (gpuArray, string ...): never read
    is_ref = h5py.check_ref_dtype(ds.dtype) is h5py.Reference
    empty = ctx.attr(ds, "MATLAB_empty", mpath)
    if empty is not None and np.asarray(empty).any():
        return _h5_read_empty(ctx, ds, cls, mpath)
    if is_ref:
        if cls not in (None, "cell"):
            raise ctx.fail(mpath, f"holds object references but has class {cls!r}")
        refs = ctx.read(ds, mpath).T  # HDF5 stores MATLAB arrays with dimensions reversed
        out = []
        for i, r in enumerate(refs.ravel(order="F")):
            at = f"{mpath}{{{i + 1}}}"
            out.append(_from_h5(ctx, ctx.deref(r, at), at, depth + 1))
        return out
    if cls == "cell":
        raise ctx.fail(mpath, "cell array without object references")
    data = ctx.read(ds, mpath)
    if cls == "char":
        if data.dtype.kind not in "iu":
            raise ctx.fail(mpath, f"char data of type {data.dtype}")
        units = data.T.ravel(order="F").astype("<u2")
        return fix_str(units.tobytes().decode("utf-16-le", errors="replace"))
    arr = data.T
    if arr.dtype.names is not None:  # complex: compound {real, imag}
        single = arr.dtype["real"] == np.float32 and cls in (None, "single")
        out_c = np.empty(arr.shape, np.complex64 if single else np.complex128)
        out_c.real, out_c.imag = arr["real"], arr["imag"]
        return out_c
    if cls == "logical":
        arr = arr.astype(bool)
    elif cls in H5_DTYPES:
        arr = arr.astype(H5_DTYPES[cls], copy=False)
    return arr.item() if arr.size == 1 else arr


def _h5_read_empty(ctx: H5Reader, ds: Any, cls: str | None, mpath: str) -> Any:
    data = ctx.read(ds, mpath)
    if data.dtype.kind not in "iu" or data.size > 32:
        raise ctx.fail(mpath, "empty array whose dimensions are not a short integer vector")
    shape = tuple(int(s) for s in data.ravel()[::-1]) if data.size else (0, 0)
    numel = int(np.prod(shape, dtype=object))
    if any(s < 0 or s >= 2**31 for s in shape) or (numel and cls != "struct"):
        raise ctx.fail(mpath, f"empty array declares dimensions {shape}")
    if cls == "struct":  # no data: no fields (MATLAB writes a 1x1 struct() this way), or 0 elements
        ctx.charge(numel * matscan.OBJECT_OVERHEAD, mpath)
        items: list[dict] = [{} for _ in range(numel)]
        return items[0] if numel == 1 else items
    if cls == "cell":
        return []
    if cls == "char":
        return ""
    return np.zeros(shape, dtype=H5_DTYPES.get(cls or "", np.float64))


def _h5_struct(ctx: H5Reader, group: Any, mpath: str, depth: int) -> Any:
    h5py = ctx.h5py
    names_attr = ctx.attr(group, "MATLAB_fields", mpath)
    if names_attr is not None:
        try:
            entries = np.asarray(names_attr).ravel()
            names = [b"".join(np.asarray(n, dtype="S1").ravel().tolist()) for n in entries]
        except Exception:
            raise ctx.fail(mpath, "MATLAB_fields is not a list of names") from None
    else:
        names = []
        for raw in group.id:
            ctx.charge(matscan.OBJECT_OVERHEAD, mpath)
            names.append(raw)
    members: list[tuple[str, Any]] = []
    for raw in names:
        label = raw.decode("utf-8", "replace")
        member = ctx.member(group, raw, f"{mpath}.{safe_label(label)}")
        if member is not None:
            members.append((fix_str(label), member))
    # a struct array: one classless dataset of references per field, all the same shape
    if members and all(
        isinstance(m, h5py.Dataset)
        and h5py.check_ref_dtype(m.dtype) is h5py.Reference
        and not ctx.has_attr(m, "MATLAB_class")
        for _, m in members
    ):
        shapes = {m.shape for _, m in members}
        if len(shapes) != 1:
            raise ctx.fail(mpath, f"struct array fields of different shapes {sorted(shapes)}")
        columns = []
        for key, m in members:
            at = f"{mpath}.{safe_label(key)}"
            ctx.visit(m, at)
            ctx.check_dataset(m, at)
            columns.append(ctx.read(m, at).T.ravel(order="F"))
        n = columns[0].size
        ctx.charge(n * len(members) * (8 + matscan.OBJECT_OVERHEAD), mpath)
        items = []
        for i in range(n):
            item = {}
            for (key, _), col in zip(members, columns, strict=True):
                at = f"{mpath}({i + 1}).{safe_label(key)}"
                item[key] = _from_h5(ctx, ctx.deref(col[i], at), at, depth + 1)
            items.append(item)
        return items[0] if n == 1 else items
    return {key: _from_h5(ctx, m, f"{mpath}.{safe_label(key)}", depth + 1) for key, m in members}


def _h5_sparse(ctx: H5Reader, group: Any, cls: str | None, mpath: str) -> Any:
    import scipy.sparse

    rows = ctx.attr(group, "MATLAB_sparse", mpath)
    try:
        m = int(np.asarray(rows).ravel()[0])
    except Exception:
        raise ctx.fail(mpath, "MATLAB_sparse is not a row count") from None
    parts = {}
    for key in ("jc", "ir", "data"):
        ds = ctx.member(group, key.encode(), f"{mpath}.{key}")
        if ds is None:
            continue
        if not isinstance(ds, ctx.h5py.Dataset):
            raise ctx.fail(mpath, f"sparse part {key} is not a dataset")
        ctx.visit(ds, f"{mpath}.{key}")
        ctx.check_dataset(ds, f"{mpath}.{key}")
        parts[key] = ctx.read(ds, f"{mpath}.{key}").ravel()
    if "jc" not in parts:
        raise ctx.fail(mpath, "sparse matrix without column starts (jc)")
    jc, ir, data = parts["jc"], parts.get("ir"), parts.get("data")
    n = jc.size - 1
    if m < 0 or n < 0 or jc.dtype.kind not in "iu" or (ir is not None and ir.dtype.kind not in "iu"):
        raise ctx.fail(mpath, "sparse matrix with invalid dimensions or index types")
    nnz = int(jc[-1]) if jc.size else 0
    if ir is None:
        ir = np.zeros(0, np.int64)
    if data is None:
        data = np.zeros(0, bool if cls == "logical" else np.float64)
    elif data.dtype.names is not None:
        real, imag = data["real"], data["imag"]
        data = real.astype(np.complex128)
        data.imag = imag
    elif cls == "logical":
        data = data.astype(bool)
    if nnz < 0 or nnz > min(ir.size, data.size) or np.any(jc.astype(np.int64) < 0):
        raise ctx.fail(
            mpath, f"sparse matrix declares {nnz} non-zeros for {ir.size} indices and {data.size} values"
        )
    ctx.charge(3 * (ir.nbytes + jc.nbytes + data.nbytes), mpath)
    try:
        mat = scipy.sparse.csc_matrix(
            (data[:nnz], ir[:nnz].astype(np.int64), jc.astype(np.int64)), shape=(m, n)
        )
    except Exception as err:
        raise ctx.fail(mpath, f"invalid sparse matrix ({one_line(err)})") from None
    return checked_sparse(mat, mpath, ctx.path, "v7.3 ")


# --------------------------------------------------------------------------- writing


def write_hdf5(path: Path, variables: dict[str, Any]) -> None:
    """``variables`` as a MATLAB v7.3 file: dicts as structs, lists as cells, str as char,
    arrays and numbers in their MATLAB class, behind MATLAB's 512-byte header."""
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
        g = _h5_struct_group(parent, name, list(value))
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
        cls = {np.dtype(v): k for k, v in H5_DTYPES.items() if k != "logical"}.get(arr.dtype)
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


def _h5_struct_group(parent: Any, name: str, fields: list[str]) -> Any:
    """A group ``name`` MATLAB reads as a struct with ``fields`` (in that order)."""
    import h5py

    g = parent.create_group(name)
    g.attrs["MATLAB_class"] = np.bytes_("struct")
    names = np.empty(len(fields), dtype=object)
    for n, k in enumerate(fields):
        names[n] = np.array(list(k), dtype="S1")
    g.attrs.create("MATLAB_fields", names, dtype=h5py.vlen_dtype(np.dtype("S1")))
    return g


def write_struct_arrays(
    path: Path, at: str, fields: dict[str, tuple[str, ...]], counts: dict[str, int]
) -> None:
    """Turn the cells of structs named in ``fields`` under ``at`` (``counts[name]`` structs
    each, as ``write_hdf5`` wrote them) into HDF5 struct arrays with those fields: a struct
    group whose fields are classless datasets of references, as MATLAB writes a struct array
    in v7.3 and as dagnn.DagNN.loadobj needs (``isstruct(s.layers)``); an empty one a
    0 x 0 struct."""
    import h5py

    with h5py.File(path, "a") as f:
        parent = f[at]
        for name, keys in fields.items():
            if counts[name] == 0:
                del parent[name]
                _h5_empty(parent, name, "struct")
                continue
            structs = [f[r] for r in parent[name][()].ravel()]
            del parent[name]
            g = _h5_struct_group(parent, name, list(keys))
            for key in keys:
                refs = np.array([[s[key].ref] for s in structs], dtype=h5py.ref_dtype)
                g.create_dataset(key, data=refs)


def _h5_empty(parent: Any, name: str, cls: str, shape: tuple = (0, 0)) -> Any:
    ds = parent.create_dataset(name, data=np.array(shape[::-1], dtype=np.uint64))
    ds.attrs["MATLAB_class"] = np.bytes_(cls)
    ds.attrs["MATLAB_empty"] = np.uint8(1)
    return ds
