"""Hostile input, black box (continued from test_hostile.py, whose docstring states the
contract): bad options, bad net fields, bad imdb data, and the net-struct fuzzer."""

from __future__ import annotations

import collections
import contextlib
import io
import math
import os
import resource
import signal
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.sparse
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import harness
from harness.cli import main
from harness.io.specs import probe_batch
from harness.mcn import McnError, load_net, save_net, vl_simplenn, vl_simplenn_tidy

from .inputs import (
    ACT_A,
    CONV_A,
    CONV_B,
    DOWN,
    Cell,
    clean_imdb_arrays,
    net_to_raw,
    pool_net,
    raw_nets,
    raw_to_net,
    save_imdb,
    save_raw,
    small_net,
)
from .running import (
    QUICK,
    TRAIN_SMALL,
    assert_error,
    assert_no_traceback,
    cli,
)

# --------------------------------------------------------------------------- bad options


BAD_OPTIONS = {
    "batch-0": (("check", "--mcn", "net.mat", "--keras", "model.keras", "--batch", "0"), ("--batch",)),
    "batch-negative": (("reference", "--mcn", "net.mat", "--batch", "-3"), ("--batch",)),
    "batch-1e9": (("check", "--mcn", "net.mat", "--keras", "model.keras", "--batch", "1e9"), ("--batch",)),
    # refused by the memory budget (the message names the budget, not necessarily the option)
    "check-batch-100000": (("check", "--mcn", "seed", "--keras", "seed-fixed", "--batch", "100000"), ()),
    "reference-batch-100000": (("reference", "--mcn", "seed", "--batch", "100000"), ()),
    "max-steps-negative": ((*TRAIN_SMALL, "--max-steps", "-1"), ("--max-steps",)),
    "plot-txt": ((*TRAIN_SMALL, "--plot", "curves.txt"), ("--plot",)),
    "epochs-0": ((*TRAIN_SMALL, "--epochs", "0"), ("--epochs",)),
    "batch-size-0": ((*TRAIN_SMALL, "--batch-size", "0"), ("--batch-size",)),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_option_is_a_one_line_error(wd, capsys, case):
    argv, needles = BAD_OPTIONS[case]
    r = cli(capsys, *argv)
    assert_error(r, *needles, where=wd)
    assert r.seconds < QUICK, f"not refused up front: {r.seconds:.1f} CPU s"
    if "100000" in case:
        assert any(w in r.err.lower() for w in ("memory", "budget")), f"no memory-budget message: {r.err!r}"
    if case == "plot-txt":
        assert not (wd / "curves.txt").exists()
        assert "loss ref" not in r.out and "training:" not in r.out, f"training started\n{r.describe()}"


# --------------------------------------------------------------------------- bad net fields


def _raw_small():
    return net_to_raw(small_net())


def _set(layer: int, field: str, value, base=_raw_small):
    def build():
        raw = base()
        raw["layers"].items[layer][field] = value
        return raw

    return build


def _set_filters(layer: int, value):
    def build():
        raw = _raw_small()
        bias = raw["layers"].items[layer]["weights"].items[1]
        raw["layers"].items[layer]["weights"] = Cell([value, bias])
        return raw

    return build


def _sparse_filters():
    raw = _raw_small()
    raw["layers"].items[0]["weights"] = Cell(
        [scipy.sparse.csc_matrix(np.full((3, 3), 0.1)), np.zeros((1, 1))]
    )
    raw["layers"].items[2]["weights"] = Cell([np.full((6, 6, 1, 2), 0.1), np.zeros((1, 2))])
    return raw


def _meta_input_size(value):
    def build():
        raw = _raw_small()
        raw["meta"] = {"inputSize": value}
        return raw

    return build


def _raw_pool():
    return net_to_raw(pool_net())


_rng = np.random.RandomState(1)
BAD_FIELDS = {
    "char-filters": (_set_filters(2, "abc"), (CONV_B, "weights")),
    "struct-filters": (_set_filters(2, {"a": 1.0}), (CONV_B, "weights")),
    "sparse-filters": (_sparse_filters, (CONV_A, "weights")),
    "complex-filters": (
        _set_filters(2, _rng.randn(6, 6, 4, 2) + 1j * _rng.randn(6, 6, 4, 2)),
        (CONV_B, "weights"),
    ),
    "cell-name": (_set(2, "name", Cell(["x", "y"])), ("name",)),
    "char-pool": (_set(1, "pool", "ab", base=_raw_pool), (DOWN, "pool")),
    "char-leak": (_set(1, "leak", "x"), (ACT_A, "leak")),
    "pad-1e5": (_set(0, "pad", 1e5), (CONV_A, "pad")),
    "pad-1e9": (_set(0, "pad", 1e9), (CONV_A, "pad")),
    "inputSize-char": (_meta_input_size("abc"), ("inputSize",)),
    "inputSize-negative": (_meta_input_size(np.array([[-8.0, 8.0, 1.0]])), ("inputSize",)),
    "inputSize-nan": (_meta_input_size(np.array([[math.nan, 8.0, 1.0]])), ("inputSize",)),
    "inputSize-zero": (_meta_input_size(np.zeros((1, 3))), ("inputSize",)),
    "inputSize-huge": (_meta_input_size(np.array([[1e6, 1e6, 1.0]])), ("inputSize",)),
    # beyond the list: more of the same family
    "stride-0": (_set(0, "stride", 0.0), (CONV_A, "stride")),
    "pool-method-junk": (_set(1, "method", "median", base=_raw_pool), (DOWN, "method")),
}


@pytest.mark.parametrize("command", ["reference", "check"])
@pytest.mark.parametrize("case", list(BAD_FIELDS))
def test_bad_net_field_is_named(wd, capsys, case, command):
    build, needles = BAD_FIELDS[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # savemat's complaints are not the tool's
        save_raw(wd / "bad.mat", build())
    keras = "pool.keras" if "pool" in case else "model.keras"
    argv = [command, "--mcn", "bad.mat"] + (["--keras", keras] if command == "check" else [])
    r = cli(capsys, *argv)
    assert_error(r, *needles, where=wd)
    assert r.seconds < QUICK, f"not refused up front: {r.seconds:.1f} CPU s"


def test_legal_matlab_field_names_on_a_layer(wd, capsys):
    extra = {"get": 7.0, "copy": "copied", "has": np.array([[1.0, 2.0, 3.0]]), "fields": "listed"}
    raw = _raw_small()
    raw["layers"].items[0].update(extra)
    save_raw(wd / "legal.mat", raw)
    r = cli(capsys, "reference", "--mcn", "legal.mat")
    assert r.rc == 0, r.describe()
    assert_no_traceback(r)
    # v7 -> load_net -> save_net v7 ; and v7 -> load_net -> save_net v7.3 -> load_net -> save_net v7
    save_net(wd / "again.mat", load_net(wd / "legal.mat"))
    save_net(wd / "again73.mat", load_net(wd / "legal.mat"), version="7.3")
    save_net(wd / "back.mat", load_net(wd / "again73.mat"))
    for name in ("again.mat", "back.mat"):
        layer = scipy.io.loadmat(wd / name)["net"][0, 0]["layers"][0, 0][0, 0]
        assert float(layer["get"].ravel()[0]) == 7.0, name
        assert "".join(layer["copy"].ravel().tolist()) == "copied", name
        assert layer["has"].ravel().tolist() == [1.0, 2.0, 3.0], name
        assert "".join(layer["fields"].ravel().tolist()) == "listed", name


@pytest.mark.parametrize("where", ["meta", "layer-field"])
def test_v73_round_trip_of_empty_structs(tmp_path, where):
    """Beyond the issue's list: save_net(version='7.3') of a Net holding an empty struct
    (Net(layers) has meta {}) must give a file load_net reads back."""
    net = small_net()
    if where == "meta":
        net = harness.Net(net.layers)
    else:
        net.layers[1].extra = {}
    save_net(tmp_path / "empty73.mat", net, version="7.3")
    back = load_net(tmp_path / "empty73.mat")
    assert [layer.name for layer in back.layers] == [layer.name for layer in net.layers]


# --------------------------------------------------------------------------- bad imdb data


def _imdb_case(case: str):
    data, labels, sets = clean_imdb_arrays(28, 28, 1)
    if case == "labels-3":
        labels[0, 1] = 3
    elif case == "labels-negative":
        labels[0, 1] = -1
    elif case == "labels-fractional":
        labels[0, 1] = 1.5
    elif case == "labels-nan":
        labels[0, 1] = math.nan
    elif case == "labels-char":
        labels = "".join(str(int(v)) for v in labels.ravel())
    elif case == "data-nan":
        data[3, 4, 0, 2] = np.nan
    return data, labels, sets


IMDB_CASES = {
    "labels-3": "images.labels",
    "labels-negative": "images.labels",
    "labels-fractional": "images.labels",
    "labels-nan": "images.labels",
    "labels-char": "images.labels",
    "data-nan": "images.data",
}
SEED_TRAIN = ("train-parity", "--mcn", "seed", "--data", "imdb.mat", "--epochs", "1", "--max-steps", "1")


@pytest.mark.parametrize("case", list(IMDB_CASES))
def test_bad_imdb_is_refused(wd, capsys, case):
    save_imdb(wd / "imdb.mat", *_imdb_case(case))
    r = cli(capsys, *SEED_TRAIN, "--batch-size", "4")
    assert_error(r, IMDB_CASES[case], where=wd)


def test_clean_imdb_gives_a_verdict(wd, capsys):
    save_imdb(wd / "imdb.mat", *_imdb_case("clean"))
    r = cli(capsys, *SEED_TRAIN, "--batch-size", "4")
    assert r.rc in (0, 1), r.describe()
    assert_no_traceback(r)


def test_in_process_train_parity_survives_a_replaced_stderr(wd, capsys):
    """A caller that swaps sys.stderr between runs (pytest's capture, a notebook) must not
    make the next run fail on a closed stream: the progress bar writes to the current one."""
    first = io.StringIO()
    with contextlib.redirect_stderr(first):
        main([*TRAIN_SMALL])
    first.close()
    r = cli(capsys, *TRAIN_SMALL)
    assert r.rc in (0, 1), r.describe()


# --------------------------------------------------------------------------- the net-struct fuzzer

FUZZ_EXAMPLES = int(os.environ.get("MCN_FUZZ_EXAMPLES", "150"))
FUZZ_SHRINK = os.environ.get("MCN_FUZZ_SHRINK") == "1"
FUZZ_SECONDS = 20  # per example and format, a hang is a finding
FUZZ_STATS: collections.Counter = collections.Counter()  # figures for the summary
FUZZ_REPRO: dict[str, str] = {}  # exception type at stage -> the shortest reproducer seen


class _FuzzTimeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise _FuzzTimeout(f"no answer within {FUZZ_SECONDS} s")


def _pipeline(path: Path) -> str:
    """load_net -> vl_simplenn_tidy -> probe_batch(net, 2) -> vl_simplenn; the stage reached."""
    stage = "load_net"
    try:
        net = load_net(path)
        stage = "vl_simplenn_tidy"
        net = vl_simplenn_tidy(net)
        stage = "probe_batch"
        x, labels = probe_batch(net, 2)
        stage = "vl_simplenn"
        with np.errstate(all="ignore"):
            vl_simplenn(net, x, 1.0 if labels is not None else None, labels)
    except McnError:
        return f"McnError at {stage}"
    except Exception as exc:  # noqa: BLE001
        raise _BadException(f"{type(exc).__name__} at {stage}", exc) from exc
    return "completed"


class _BadException(Exception):
    def __init__(self, key: str, exc: BaseException):
        super().__init__(f"{key}: {str(exc)[:200]}")
        self.key = key


def _memory_guard(extra: int = 4 << 30):
    """Cap this process's address space at its current size + ``extra`` while fuzzing, so a
    net asking for gigabytes fails with MemoryError (a finding) instead of swapping."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as fh:
        vm = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
    cap = vm + extra if hard == resource.RLIM_INFINITY else min(hard, vm + extra)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    return soft, hard


@pytest.fixture(scope="module")
def fuzz_summary():
    yield FUZZ_STATS
    if FUZZ_STATS:
        lines = [f"net-struct fuzzer: {FUZZ_STATS['examples']} examples"]
        lines += [f"  {v:5d}  {k}" for k, v in sorted(FUZZ_STATS.items()) if k != "examples"]
        lines += [f"  reproducer for {k}: {v}" for k, v in sorted(FUZZ_REPRO.items())]
        text = "\n".join(lines)
        print("\n" + text, file=sys.__stderr__)
        if os.environ.get("MCN_FUZZ_REPORT"):
            Path(os.environ["MCN_FUZZ_REPORT"]).write_text(text + "\n")


def test_fuzz_net_struct_raises_only_mcn_error(fuzz_summary):
    """Random simplenn structs, saved as v7 (scipy.io.savemat) and v7.3 (save_net of a Net
    carrying the same fields, where it can be written): the reference either runs them or
    raises McnError. Every other exception type is collected with its shortest reproducer
    and fails the test at the end (MCN_FUZZ_SHRINK=1: at once, shrunk by Hypothesis)."""
    bad: dict[str, str] = {}

    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    @given(raw=raw_nets, top_level=st.integers(0, 9))
    def fuzz(raw, top_level):
        FUZZ_STATS["examples"] += 1
        with tempfile.TemporaryDirectory() as d:
            files = {}
            v7 = Path(d) / "net_v7.mat"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                save_raw(v7, raw, variable=None if top_level == 0 else "net")
            files["v7"] = v7
            try:
                as_net = raw_to_net(raw)
            except Exception:  # noqa: BLE001  (a struct a Layer cannot carry, e.g. no type)
                as_net = None
                FUZZ_STATS["v7.3 skipped: no Net carries this struct"] += 1
            if as_net is not None:
                v73 = Path(d) / "net_v73.mat"
                try:
                    save_net(v73, as_net, version="7.3")
                    files["v7.3"] = v73
                except Exception as exc:  # noqa: BLE001  (the writer's limits; counted, not judged)
                    FUZZ_STATS[f"v7.3 skipped: save_net raised {type(exc).__name__}"] += 1
            for fmt, path in files.items():
                signal.signal(signal.SIGALRM, _on_alarm)
                signal.alarm(FUZZ_SECONDS)
                try:
                    outcome = _pipeline(path)
                except (_BadException, _FuzzTimeout) as exc:
                    key = getattr(exc, "key", "timeout")
                    outcome = f"BAD {key}"
                    text = f"[{fmt}] {raw!r}"
                    if key not in FUZZ_REPRO or len(text) < len(FUZZ_REPRO[key]):
                        FUZZ_REPRO[key] = text
                        bad[key] = f"{exc} <- {text[:3000]}"
                    if FUZZ_SHRINK:
                        raise
                finally:
                    signal.alarm(0)
                FUZZ_STATS[f"{fmt}: {outcome}"] += 1
                event(f"{fmt}: {outcome}")

    limits = _memory_guard()
    try:
        fuzz()
    finally:
        resource.setrlimit(resource.RLIMIT_AS, limits)
    assert not bad, "exceptions other than McnError:\n" + "\n".join(
        f"- {k}: {v}" for k, v in sorted(bad.items())
    )
