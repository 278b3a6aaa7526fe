"""The .mat fuzzer: mutated files loaded in a worker process (a crash of scipy or h5py,
a segfault, fails the test with its input instead of killing pytest), and the inputs it
found that crash or hang libhdf5."""

from __future__ import annotations

import os
import select
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.sparse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.mcn import save_net

from .matfile_writers import (
    REPO,
    cell,
    char,
    double,
    el,
    matrix,
    relu,
    struct_,
    text,
    tiny_net,
    v5,
    v5_net,
    v73_net,
)

# --------------------------------------------------------------------------- fuzzer

_WORKER = r"""
import os, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
from harness.mcn import McnError, Net, load_net

def check_strings(v):
    if isinstance(v, str):
        v.encode("utf-8")
    elif isinstance(v, dict):
        for k, x in v.items():
            check_strings(k); check_strings(x)
    elif isinstance(v, list):
        for x in v:
            check_strings(x)

for line in sys.stdin:
    try:
        net = load_net(line.rstrip("\n"))
        if isinstance(net, Net):
            for layer in net.layers:
                check_strings(dict(layer.fields()))
            check_strings(net.meta)
            out = "net"
        else:
            out = "wrong " + type(net).__name__
    except McnError as err:
        out = "mcn" if "\n" not in str(err) else "mcn-multiline"
    except BaseException as err:
        out = "exception " + type(err).__name__ + ": " + " ".join(str(err).split())[:300]
    sys.stdout.write(out + "\n")
    sys.stdout.flush()
"""


class Worker:
    """A process running load_net on the paths it is sent: one that segfaults dies alone."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = dict(
            os.environ, MCN_HARNESS_MEMORY_BUDGET="256M", OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            cwd=REPO, env=env,
        )  # fmt: skip

    def load(self, path: Path, timeout: float = 60.0) -> str:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        assert self.proc and self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(f"{path}\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            if not ready:
                self.proc.kill()
            code = self.proc.wait()
            self.proc = None
            return f"crashed (exit status {code})" if ready else "hung"
        return line.strip()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()  # type: ignore[union-attr]
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def fuzz_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    net = tiny_net()
    bases = {}
    for version in ("7", "7.3"):
        p = root / f"base-{version}.mat"
        save_net(p, net, version=version)
        bases[version] = p.read_bytes()
    p = root / "base-7-plain.mat"
    scipy.io.savemat(p, {"net": {"layers": np.array([[{"type": "relu", "name": "r"}]], dtype=object),
                                 "meta": {"x": np.arange(4.0)}}})  # fmt: skip
    bases["7-plain"] = p.read_bytes()
    # function handle, MCOS object, UTF-16 text with a surrogate pair, cells, uncompressed
    fh = matrix(16, (1, 1), b"", struct_(b"", {b"function_handle": struct_(b"", {b"file": text(b"", "f")})}))
    layer = struct_(
        b"", {b"type": text(b"", "custom"), b"forward": fh, b"name": char(b"", [0x61, 0xD83D, 0xDE00])}
    )
    mcos = el(
        14,
        el(6, struct.pack("<II", 17, 0)) + el(1) + el(1, b"MCOS") + el(1, b"string")
        + matrix(13, (1, 6), b"", el(6, np.array([0xDD000000, 2, 1, 1, 1, 2], "<u4").tobytes())),
    )  # fmt: skip
    meta = struct_(b"", {b"s": mcos, b"c": cell(b"", double(b"", np.ones((2, 2))), text(b"", "ab"))})
    bases["7-crafted"] = v5(v5_net([layer, relu()], meta))
    worker = Worker()
    for version, data in bases.items():  # the unmutated files load
        (root / "check.mat").write_bytes(data)
        assert worker.load(root / "check.mat") == "net", version
    yield root, bases, worker
    worker.stop()


def _mutate(data: bytes, ops: list[tuple]) -> bytes:
    buf = bytearray(data)
    for op, at, arg in ops:
        at = at % (len(buf) + 1)
        if op == "flip" and at < len(buf):
            buf[at] ^= 1 << (arg % 8)
        elif op == "set":
            buf[at : at + len(arg)] = arg
        elif op == "insert":
            buf[at:at] = arg
        elif op == "truncate":
            del buf[at:]
    return bytes(buf)


_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(0, 7)),
        st.tuples(
            st.just("set"),
            st.integers(0, 1 << 20),
            st.sampled_from(
                [
                    b"\xff\xff\xff\xff",
                    b"\x00\x00\x00\x00",
                    b"\xff\xff\xff\x7f",
                    b"\x0e",
                    b"\x0f",
                    b"\x01\x00\x00\x00",
                    b"\x00\x00\x00\x80",
                ]
            )
            | st.binary(min_size=1, max_size=8),
        ),  # fmt: skip
        st.tuples(st.just("insert"), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("truncate"), st.integers(0, 1 << 20), st.none()),
    ),
    min_size=1,
    max_size=4,
)


@pytest.mark.parametrize("version", ["7", "7-plain", "7-crafted", "7.3"])
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_OPS)
def test_fuzz_mutated_files_load_or_raise_mcn_error(fuzz_env, version, ops):
    root, bases, worker = fuzz_env
    data = _mutate(bases[version], ops)
    path = root / f"mutant-{version}.mat"
    path.write_bytes(data)
    result = worker.load(path)
    if result not in ("net", "mcn"):
        keep = root / f"failing-{version}-{abs(hash(tuple(ops)))}.mat"
        keep.write_bytes(data)
        pytest.fail(f"load_net on a mutated v{version} file ({ops}): {result}; input kept at {keep}")


def _patch_fields_type(data: bytes, offset: int, value: int) -> bytes:
    """Set a byte of the first MATLAB_fields attribute's datatype message."""
    at = data.index(b"MATLAB_fields\x00\x00\x00\x19") + 16  # the name, padded to 8 bytes
    return data[: at + offset] + bytes([value]) + data[at + offset + 1 :]


def _patch_heap(data: bytes) -> bytes:
    """Give the first object of the first global heap collection a size of 2^64 - 16: its
    header plus the padded size wraps around to 0, and libhdf5 never moves past it."""
    at = data.index(b"GCOL\x01") + 16 + 8
    return data[:at] + (2**64 - 16).to_bytes(8, "little") + data[at + 8 :]


@pytest.mark.parametrize(
    "patch",
    [
        lambda d: _patch_fields_type(d, 1, 0x03),  # variable-length kind 3 (0 sequence, 1 string)
        lambda d: _patch_fields_type(d, 8, 0x17),  # a sequence of region references
        _patch_heap,
    ],
    ids=["vlen-kind", "vlen-of-regref", "heap-object-size"],
)
def test_v73_inputs_that_crash_or_hang_libhdf5(tmp_path, fuzz_env, patch):
    """Found by the fuzzer: reading MATLAB_fields from these makes libhdf5 segfault
    (the first two) or loop forever (the third). The loader refuses them first; they are
    loaded in the worker process so that a regression fails this test, not pytest."""
    _, _, worker = fuzz_env
    p = tmp_path / "bad.mat"
    p.write_bytes(patch(v73_net(tmp_path / "good.mat").read_bytes()))
    assert worker.load(p, timeout=30) == "mcn"
