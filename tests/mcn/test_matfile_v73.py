"""harness.mcn.matfile against hostile v7.3 (HDF5) files: depth, cycles, sizes, links and
external storage, faithful types, damaged bytes; checkpoints and plain files."""

from __future__ import annotations

import os
import time

import h5py
import numpy as np
import pytest
import scipy.io
import scipy.sparse

from harness.mcn import McnError, load_checkpoint, load_net, save_net
from harness.mcn.matfile import MatlabObject, _read_variables, list_variables, read_variables

from .matfile_writers import (
    SECRET,
    all_strings_utf8,
    h5_add_field,
    one_line_mcn,
    secret_h5,
    tiny_net,
    v73_net,
)

# --------------------------------------------------------------------------- v7.3


def test_v73_deep_nesting_is_refused(tmp_path):
    p = v73_net(tmp_path / "deep.mat")
    with h5py.File(p, "a") as f:
        refs = f["#refs#"]
        inner = refs.create_dataset("deep0", data=np.array([[1.0]]))
        inner.attrs["MATLAB_class"] = np.bytes_("double")
        for i in range(1, 60):
            ds = refs.create_dataset(f"deep{i}", data=np.array([[inner.ref]], dtype=h5py.ref_dtype))
            ds.attrs["MATLAB_class"] = np.bytes_("cell")
            inner = ds
        f["net/meta"].create_dataset("deep", data=np.array([[inner.ref]], dtype=h5py.ref_dtype))
        f["net/meta/deep"].attrs["MATLAB_class"] = np.bytes_("cell")
        h5_add_field(f["net/meta"], "deep")
    with pytest.raises(McnError, match="deeper than 32") as e:
        load_net(p)
    assert "net.meta.deep{1}{1}" in one_line_mcn(e, p)


def _cell_cycle(f):
    ds = f["#refs#"].create_dataset("loop", shape=(1, 1), dtype=h5py.ref_dtype)
    ds.attrs["MATLAB_class"] = np.bytes_("cell")
    ds[0, 0] = ds.ref  # a cell containing itself
    f["net/meta"].create_dataset("loop", data=np.array([[ds.ref]], dtype=h5py.ref_dtype))
    f["net/meta/loop"].attrs["MATLAB_class"] = np.bytes_("cell")
    h5_add_field(f["net/meta"], "loop")
    return "net.meta.loop{1}{1}"


def _link_cycle(f):
    g = f["net/meta"].create_group("loop")  # a struct whose field is itself (a second hard link)
    g.attrs["MATLAB_class"] = np.bytes_("struct")
    g["self"] = g
    h5_add_field(g, "self")
    h5_add_field(f["net/meta"], "loop")
    return "net.meta.loop.self"


def _fan_out(f):
    """20 levels of cells whose two elements are the same next level: 2^20 paths."""
    refs = f["#refs#"]
    inner = refs.create_dataset("fan0", data=np.array([[1.0]]))
    inner.attrs["MATLAB_class"] = np.bytes_("double")
    for i in range(1, 21):
        inner = refs.create_dataset(f"fan{i}", data=np.array([[inner.ref, inner.ref]], dtype=h5py.ref_dtype))
        inner.attrs["MATLAB_class"] = np.bytes_("cell")
    f["net/meta"].create_dataset("loop", data=np.array([[inner.ref]], dtype=h5py.ref_dtype))
    f["net/meta/loop"].attrs["MATLAB_class"] = np.bytes_("cell")
    h5_add_field(f["net/meta"], "loop")
    return "net.meta.loop{1}"


@pytest.mark.parametrize("make", [_cell_cycle, _link_cycle, _fan_out], ids=["cell", "hard-link", "fan-out"])
def test_v73_reference_cycles_and_shared_objects_are_refused(tmp_path, make):
    p = v73_net(tmp_path / "cycle.mat")
    with h5py.File(p, "a") as f:
        where = make(f)
    t = time.perf_counter()
    with pytest.raises(McnError, match="refers back") as e:
        load_net(p)
    assert time.perf_counter() - t < 2.0
    assert where in one_line_mcn(e, p)


def huge_zeros(group: h5py.Group, name: str) -> None:
    """1.1 GB declared, all zeros, chunked and compressed: no chunk is ever written."""
    ds = group.create_dataset(name, shape=(1100, 1000, 1000), dtype=np.uint8, chunks=(10, 100, 100),
                              compression="gzip")  # fmt: skip
    ds.attrs["MATLAB_class"] = np.bytes_("uint8")


def test_v73_unused_huge_variable_is_not_read(tmp_path, monkeypatch):
    monkeypatch.setenv("MCN_HARNESS_MEMORY_BUDGET", "1G")
    p = v73_net(tmp_path / "big.mat")
    with h5py.File(p, "a") as f:
        huge_zeros(f, "big")
    assert p.stat().st_size < 32 * 1024  # 1.1 GB declared
    opened: list[str] = []
    real = h5py.Dataset.__getitem__
    monkeypatch.setattr(
        h5py.Dataset, "__getitem__", lambda self, k: opened.append(self.name) or real(self, k)
    )
    t = time.perf_counter()
    net = load_net(p)
    assert time.perf_counter() - t < 2.0
    assert net == tiny_net()
    assert opened and not any("big" in n for n in opened)
    assert "big" in list_variables(p)
    assert set(load_checkpoint(p).net.meta) == {"inputSize", "classes"}


def test_v73_huge_array_inside_the_net_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("MCN_HARNESS_MEMORY_BUDGET", "1G")
    p = v73_net(tmp_path / "big.mat")
    with h5py.File(p, "a") as f:
        huge_zeros(f["net/meta"], "big")
        h5_add_field(f["net/meta"], "big")
    t = time.perf_counter()
    with pytest.raises(McnError, match="memory budget") as e:
        load_net(p)
    assert time.perf_counter() - t < 2.0
    assert "net.meta.big" in one_line_mcn(e, p)


def _external_storage(f, tmp_path):
    raw = tmp_path / "secret.bin"
    raw.write_bytes(SECRET)
    ds = f["net/meta"].create_dataset("leak", shape=(1, len(SECRET)), dtype=np.uint8,
                                      external=[(str(raw), 0, h5py.h5f.UNLIMITED)])  # fmt: skip
    ds.attrs["MATLAB_class"] = np.bytes_("uint8")


def _external_link(f, tmp_path):
    f["net/meta"]["leak"] = h5py.ExternalLink(str(secret_h5(tmp_path)), "/data")


def _soft_link(f, tmp_path):
    f["net/meta"]["leak"] = h5py.SoftLink("/net/layers")


def _virtual(f, tmp_path):
    src = secret_h5(tmp_path)
    layout = h5py.VirtualLayout(shape=(len(SECRET),), dtype=np.uint8)
    layout[:] = h5py.VirtualSource(str(src), "data", shape=(len(SECRET),))
    ds = f["net/meta"].create_virtual_dataset("leak", layout)
    ds.attrs["MATLAB_class"] = np.bytes_("uint8")


@pytest.mark.parametrize(
    "make, message",
    [(_external_storage, "external file"), (_external_link, "external link"), (_soft_link, "soft link"),
     (_virtual, "virtual dataset")],
    ids=["external-storage", "external-link", "soft-link", "virtual"],
)  # fmt: skip
def test_v73_never_reads_other_files(tmp_path, make, message):
    p = v73_net(tmp_path / "leak.mat")
    with h5py.File(p, "a") as f:
        make(f, tmp_path)
        h5_add_field(f["net/meta"], "leak")
    with h5py.File(p, "r") as f:  # the file really does reach the secret
        assert f["net/meta/leak"].size > 0
    with pytest.raises(McnError, match=message) as e:
        load_net(p)
    msg = one_line_mcn(e, p)
    assert "net.meta.leak" in msg
    assert SECRET.decode() not in msg and "TOP-SECRET" not in msg


def test_v73_unused_link_is_never_followed(tmp_path):
    p = v73_net(tmp_path / "leak.mat")
    with h5py.File(p, "a") as f:
        f["leak"] = h5py.ExternalLink(str(secret_h5(tmp_path)), "/data")
    assert load_net(p) == tiny_net()
    with pytest.raises(McnError, match="external link"):
        read_variables(p)


def test_v73_strings_and_names(tmp_path):
    net = tiny_net()
    net.layers[0].name = "a\ud800b"  # written as UTF-16 code units: 0x61 0xD800 0x62
    net.layers[1].name = "\ud83d\ude00"  # a surrogate pair
    net.meta = {"classes": ["\udc00x"]}
    p = tmp_path / "s.mat"
    save_net(p, net, version="7.3")
    with h5py.File(p, "a") as f:
        ds = f["net/meta"].create_dataset(b"bad\xed\xa0\x80", data=np.array([[1.0]]))
        ds.attrs["MATLAB_class"] = np.bytes_("double")
        h5_add_field(f["net/meta"], b"bad\xed\xa0\x80")
    back = load_net(p)
    assert back.layers[0].name == "a\ufffdb"
    assert back.layers[1].name == "\U0001f600"
    assert back.meta["classes"] == ["\ufffdx"]
    assert "bad\ufffd\ufffd\ufffd" in back.meta
    assert all_strings_utf8(back.meta) and all_strings_utf8([l.name for l in back.layers])


def test_v73_complex_sparse_and_objects_come_back_typed(tmp_path):
    p = v73_net(tmp_path / "typed.mat")
    with h5py.File(p, "a") as f:
        conv = f[f["net/layers"][0, 0]]
        weights = f[conv["weights"][0, 0]]
        w = np.zeros((2, 1, 3, 3), dtype=[("real", "<f4"), ("imag", "<f4")])
        w["real"], w["imag"] = 1.0, 2.0
        name = weights.name
        del f[name]
        ds = f.create_dataset(name, data=w)
        ds.attrs["MATLAB_class"] = np.bytes_("single")
        conv["weights"][0, 0] = ds.ref
        sp = scipy.sparse.random(5, 4, density=0.4, format="csc", random_state=1)
        bias = f[conv["weights"][1, 0]]  # HDF5 holds the 1x2 cell as 2x1
        name = bias.name
        del f[name]
        g = f.create_group(name)  # the second filter: a sparse matrix
        g.attrs["MATLAB_class"] = np.bytes_("double")
        g.attrs["MATLAB_sparse"] = np.uint64(5)
        g["data"], g["ir"], g["jc"] = sp.data, sp.indices.astype(np.uint64), sp.indptr.astype(np.uint64)
        conv["weights"][1, 0] = g.ref
        obj = f["net/meta"].create_dataset("gpu", data=np.array([[0xDD000000, 2, 1, 1, 1, 1]], np.uint32))
        obj.attrs["MATLAB_class"] = np.bytes_("gpuArray")
        obj.attrs["MATLAB_object_decode"] = np.int32(3)
        h5_add_field(f["net/meta"], "gpu")
        fh = f["net/meta"].create_group("fn")
        fh.attrs["MATLAB_class"] = np.bytes_("function_handle")
        h5_add_field(f["net/meta"], "fn")
    net = load_net(p)
    w0 = net.layers[0].weights[0]
    assert w0.dtype == np.complex64 and w0.shape == (3, 3, 1, 2) and w0[0, 0, 0, 0] == 1 + 2j
    got = net.layers[0].weights[1]
    assert scipy.sparse.issparse(got) and got.shape == (5, 4)
    np.testing.assert_allclose(got.toarray(), sp.toarray())
    assert net.meta["gpu"] == MatlabObject("gpuArray")
    assert net.meta["fn"] == MatlabObject("function_handle")


def test_v73_bad_sparse_indices_are_refused(tmp_path):
    p = v73_net(tmp_path / "sp.mat")
    with h5py.File(p, "a") as f:
        g = f["net/meta"].create_group("sp")
        g.attrs["MATLAB_class"] = np.bytes_("double")
        g.attrs["MATLAB_sparse"] = np.uint64(3)
        g["data"], g["ir"], g["jc"] = np.ones(2), np.array([0, 99], np.uint64), np.array([0, 2], np.uint64)
        h5_add_field(f["net/meta"], "sp")
    with pytest.raises(McnError, match="sparse") as e:
        load_net(p)
    assert "net.meta.sp" in one_line_mcn(e, p)


def test_v73_truncated_and_garbage(tmp_path):
    good = v73_net(tmp_path / "good.mat").read_bytes()
    p = tmp_path / "t.mat"
    for cut in (600, 2048, len(good) // 2, len(good) - 100):
        p.write_bytes(good[:cut])
        with pytest.raises(McnError) as e:
            load_net(p)
        one_line_mcn(e, p)
    p.write_bytes(good[:520] + np.random.RandomState(0).bytes(8192))
    with pytest.raises(McnError):
        load_net(p)


@pytest.mark.parametrize("version", ["7", "7.3"])
def test_structs_without_fields_round_trip(tmp_path, version):
    net = tiny_net()
    net.meta = {}
    net.layers[1].extra = {}
    p = tmp_path / "empty.mat"
    save_net(p, net, version=version)
    back = load_net(p)
    assert back.meta == {} and back.layers[1].extra == {}
    assert back == net


def test_checkpoint_reads_only_its_variables(tmp_path, monkeypatch):
    """Older cnn_train saved ``info`` where newer ones save ``stats``; other variables
    (here one above the budget) are left alone."""
    monkeypatch.setenv("MCN_HARNESS_MEMORY_BUDGET", "1M")
    p = tmp_path / "net-epoch-2.mat"
    save_net(p, tiny_net())
    raw = scipy.io.loadmat(p)
    info = {"train": {"objective": 0.25}}
    scipy.io.savemat(p, {"net": raw["net"], "info": info, "images": np.zeros((600, 600))})
    ckpt = load_checkpoint(p)
    assert ckpt.net.layers == tiny_net().layers
    assert ckpt.stats["train"]["objective"] == 0.25
    with pytest.raises(McnError, match="memory budget"):
        read_variables(p)


def test_not_a_regular_file(tmp_path):
    fifo = tmp_path / "pipe.mat"
    os.mkfifo(fifo)
    with pytest.raises(McnError, match="not a regular file"):
        load_net(fifo)


def test_private_alias_and_wanted(tmp_path):
    p = tmp_path / "v.mat"
    scipy.io.savemat(p, {"a": 1.0, "b": "x", "c": np.ones((2, 2))})
    assert _read_variables is read_variables
    assert set(read_variables(p)) == {"a", "b", "c"}
    assert read_variables(p, ["b", "zz"]) == {"b": "x"}
    assert read_variables(p, []) == {}
