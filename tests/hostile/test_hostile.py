"""Hostile input, black box: the command line and the reference's loading path given bad,
non-finite, malicious or absurd input.

What every case requires (the contract of the command line):

- every run exits 0, 1 or 2; nothing escapes ``main()`` (no SystemExit(0), no MemoryError);
- bad input: exit 2, stderr exactly one non-empty line ``mcn-harness: error: ...`` naming
  the layer and the field where the problem is a layer's field, "Traceback" nowhere;
- exit 1 from ``check`` only after a completed comparison (``mcn-harness report: DIVERGENT``);
- NaN/Inf never give EQUIVALENT, and JSON reports stay strict JSON;
- names from files cannot write escape sequences or fake report lines to the terminal;
- the working directory cannot shadow the tool's own dependencies;
- report files never overwrite an input, and a failed run leaves an old report intact.

The CLI runs in-process (``harness.cli.main`` with capsys) except where the process itself
matters (working-directory shadowing, sys.exit in a user module), which run the console
script. The last test fuzzes the net struct through load_net -> vl_simplenn_tidy ->
probe_batch -> vl_simplenn (MCN_FUZZ_EXAMPLES sets the example count, default 150;
MCN_FUZZ_SHRINK=1 fails at the first bad exception and lets Hypothesis shrink it).
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass
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

from .hostile_inputs import (
    ACT_A,
    CONV_A,
    CONV_B,
    DOWN,
    Cell,
    clean_imdb_arrays,
    dead_channel_bnorm_net,
    net_to_raw,
    pool_net,
    raw_nets,
    raw_to_net,
    save_imdb,
    save_raw,
    shadow_markers,
    small_net,
    with_last_bias,
    write_shadow_modules,
    write_user_model,
)

ERR_PREFIX = "mcn-harness: error:"
REPORT_PREFIX = "mcn-harness report:"
CONSOLE = Path(sys.executable).parent / "mcn-harness"
# CPU seconds of the in-process run (time.process_time: all of this process's threads):
# "refused up front, quickly". CPU time, not wall time, so that other jobs on the machine
# do not count; doing the refused work would take minutes of CPU.
QUICK = 20.0


# --------------------------------------------------------------------------- running the tool


@dataclass
class Run:
    rc: object  # the exit status, or a description of what escaped main() / the process
    out: str
    err: str
    seconds: float

    def describe(self) -> str:
        return (
            f"rc={self.rc!r} after {self.seconds:.1f} s\nstderr: {self.err[-1500:]!r}\n"
            f"stdout (tail): {self.out[-800:]!r}"
        )


def cli(capsys, *argv) -> Run:
    """``harness.cli.main(argv)`` in-process; anything escaping main() becomes rc text."""
    capsys.readouterr()
    t0 = time.process_time()
    try:
        rc = main([str(a) for a in argv])
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001  (SystemExit, MemoryError ... are findings)
        rc = f"escaped main(): {type(exc).__name__}: {str(exc)[:300]}"
    seconds = time.process_time() - t0  # CPU seconds (see QUICK)
    captured = capsys.readouterr()
    return Run(rc, captured.out, captured.err, seconds)


def console(*argv, cwd: Path, timeout: float = 240) -> Run:
    """The console script in a subprocess, from ``cwd``."""
    env = {k: v for k, v in os.environ.items() if k not in ("MCN_HARNESS_NATIVE_LOGS", "PYTHONPATH")}
    t0 = time.perf_counter()
    try:
        p = subprocess.run(
            [str(CONSOLE), *map(str, argv)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        return Run(f"timed out after {timeout} s", str(exc.stdout or ""), str(exc.stderr or ""), timeout)
    return Run(p.returncode, p.stdout, p.stderr, time.perf_counter() - t0)


def _scrub(text: str, *dirs: Path) -> str:
    """Remove the temporary directories' paths (test names in them contain field names)."""
    for d in dirs:
        for form in {str(d), str(Path(d).resolve())}:
            text = text.replace(form, "<tmp>")
    return text


def assert_no_traceback(r: Run) -> None:
    assert "Traceback" not in r.out and "Traceback" not in r.err, r.describe()


def assert_error(r: Run, *needles: str, where: Path | None = None) -> None:
    """Exit 2 with exactly one non-empty stderr line 'mcn-harness: error: ...' naming needles."""
    assert r.rc == 2, r.describe()
    assert_no_traceback(r)
    lines = r.err.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}\n{r.describe()}"
    line = lines[0]
    assert line.startswith(ERR_PREFIX) and line[len(ERR_PREFIX) :].strip(), r.describe()
    text = _scrub(line, where) if where else line
    for needle in needles:
        assert needle in text, f"{needle!r} not named in: {line!r}"


def assert_sane(r: Run, command: str, where: Path | None = None) -> None:
    """Any run: exit 0, 1 or 2; 2 is a clean one-line error; check's 1 is a finished report."""
    assert r.rc in (0, 1, 2), r.describe()
    assert_no_traceback(r)
    if r.rc == 2:
        assert_error(r, where=where)
    if r.rc == 1 and command == "check":
        assert f"{REPORT_PREFIX} DIVERGENT" in r.out, r.describe()


def strict_json(path: Path):
    """Parse a report as strict JSON: NaN / Infinity / -Infinity tokens fail."""
    return json.loads(Path(path).read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON token {c!r}"))


# --------------------------------------------------------------------------- shared inputs


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """net.mat (small net, v7), net73.mat (v7.3), model.keras (its faithful model),
    pool.mat and pool.keras (the same with a pool layer), imdb8.mat (8x8x1, 8 images, 2 classes)."""
    d = tmp_path_factory.mktemp("hostile_shared")
    net = small_net()
    save_net(d / "net.mat", net)
    save_net(d / "net73.mat", net, version="7.3")
    harness.to_keras(net).save(d / "model.keras")
    save_net(d / "pool.mat", pool_net())
    harness.to_keras(pool_net()).save(d / "pool.keras")
    save_imdb(d / "imdb8.mat", *clean_imdb_arrays(8, 8, 1))
    return d


@pytest.fixture
def wd(shared, tmp_path, monkeypatch) -> Path:
    """A private copy of the shared inputs as the working directory; sys.path restored."""
    for p in shared.iterdir():
        shutil.copy2(p, tmp_path / p.name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    return tmp_path


TRAIN_SMALL = (
    "train-parity",
    "--mcn",
    "net.mat",
    "--keras",
    "model.keras",
    "--optimizer",
    "matconvnet",
    "--data",
    "imdb8.mat",
    "--epochs",
    "1",
    "--max-steps",
    "1",
    "--batch-size",
    "4",
)


# --------------------------------------------------------------------------- NaN / Inf


@pytest.mark.parametrize(
    "values", [[math.nan], [math.inf], [math.nan, math.inf]], ids=["nan", "inf", "nan+inf"]
)
def test_nonfinite_net_bias_is_never_equivalent(wd, capsys, values):
    save_net("bad.mat", with_last_bias(small_net(), values))
    r = cli(capsys, "check", "--mcn", "bad.mat", "--keras", "model.keras", "--json", "out.json")
    assert_sane(r, "check", wd)
    assert r.rc != 0 and "EQUIVALENT" not in r.out, r.describe()
    if r.rc == 1:
        assert (wd / "out.json").exists(), "a completed comparison writes its --json report"
    if (wd / "out.json").exists():
        assert strict_json(wd / "out.json")["ok"] is False


def test_nonfinite_model_bias_with_model_weights_is_divergent(wd, capsys):
    model = harness.to_keras(small_net())
    last = [layer for layer in model.layers if len(layer.get_weights()) == 2][-1]
    kernel, bias = last.get_weights()
    bias[0] = np.nan
    last.set_weights([kernel, bias])
    model.save(wd / "nanmodel.keras")
    r = cli(
        capsys,
        "check",
        "--mcn",
        "net.mat",
        "--keras",
        "nanmodel.keras",
        "--weights",
        "model",
        "--json",
        "o.json",
    )
    assert r.rc == 1 and f"{REPORT_PREFIX} DIVERGENT" in r.out, r.describe()
    assert "EQUIVALENT" not in r.out
    assert strict_json(wd / "o.json")["ok"] is False


def test_bnorm_epsilon_zero_on_dead_channel_is_never_equivalent(wd, capsys):
    net = dead_channel_bnorm_net(epsilon=0.0)
    save_net("bn.mat", net)
    harness.to_keras(net).save(wd / "bn.keras")
    r = cli(capsys, "check", "--mcn", "bn.mat", "--keras", "bn.keras", "--json", "bn.json")
    assert_sane(r, "check", wd)
    assert r.rc != 0 and "EQUIVALENT" not in r.out, r.describe()
    if (wd / "bn.json").exists():
        assert strict_json(wd / "bn.json")["ok"] is False


@pytest.mark.parametrize("case", ["clean", "nan-bias"])
def test_train_parity_json_is_strict(wd, capsys, case):
    if case == "nan-bias":
        save_net("net.mat", with_last_bias(small_net(), [math.nan]))
    r = cli(capsys, *TRAIN_SMALL, "--json", "tp.json")
    assert_sane(r, "train-parity", wd)
    if case == "clean":
        assert r.rc in (0, 1), r.describe()
    else:  # NaN weights cannot "still agree at the end"
        assert r.rc in (1, 2), r.describe()
    if r.rc in (0, 1):
        assert (wd / "tp.json").exists(), r.describe()
    if (wd / "tp.json").exists():
        strict_json(wd / "tp.json")


# --------------------------------------------------------------------------- terminal injection

ESCAPE_NAME = "conv\x1b[2Ja"
FAKE_REPORT_NAME = f"act\n{REPORT_PREFIX} EQUIVALENT"


SCRIPT_NAME = "<script>alert(1)</script>"


@pytest.mark.parametrize("command", ["check", "reference", "diagnose"])
@pytest.mark.parametrize("version", ["7", "7.3"])
def test_layer_names_cannot_inject_into_the_terminal(wd, capsys, command, version):
    net = small_net()
    net.layers[0].name = ESCAPE_NAME
    net.layers[1].name = FAKE_REPORT_NAME
    net.layers[2].name = SCRIPT_NAME
    save_net("evil.mat", net, version=version)
    argv = [command, "--mcn", "evil.mat"] + ([] if command == "reference" else ["--keras", "model.keras"])
    if command == "check":
        argv += ["--json", "evil.json", "--html", "evil.html"]
    r = cli(capsys, *argv)
    assert_sane(r, command, wd)
    assert "\x1b" not in r.out and "\x1b" not in r.err, r.describe()
    report_lines = [line for line in (r.out + "\n" + r.err).splitlines() if line.startswith(REPORT_PREFIX)]
    if command == "check":
        assert len(report_lines) <= 1, report_lines
        if r.rc in (0, 1):
            assert len(report_lines) == 1
    else:  # no model compared: no report line at all
        assert report_lines == [], report_lines
    if command == "check" and r.rc in (0, 1):  # the reports escape names too
        strict_json(wd / "evil.json")
        assert "<script>alert" not in (wd / "evil.html").read_text()


def test_html_report_carries_no_control_characters(wd, capsys):
    """Beyond the issue's list: `cat report.html` must not clear the terminal either."""
    net = small_net()
    net.layers[0].name = ESCAPE_NAME
    save_net("evil.mat", net)
    r = cli(capsys, "check", "--mcn", "evil.mat", "--keras", "model.keras", "--html", "evil.html")
    assert_sane(r, "check", wd)
    if r.rc in (0, 1):
        assert "\x1b" not in (wd / "evil.html").read_text()


HOSTILE_FILES = {
    "garbage-mat": (
        "--mcn",
        "junk.mat",
        lambda d: (d / "junk.mat").write_bytes(b"MATLAB 5.0" + bytes(range(256)) * 4),
    ),
    "empty-mat": ("--mcn", "empty.mat", lambda d: (d / "empty.mat").write_bytes(b"")),
    "directory-mat": ("--mcn", "folder.mat", lambda d: (d / "folder.mat").mkdir()),
    "missing-mat": ("--mcn", "nowhere.mat", lambda d: None),
    "hdf5-not-matlab": ("--mcn", "plain.mat", lambda d: _plain_hdf5(d / "plain.mat")),
    "no-net-inside": ("--mcn", "other.mat", lambda d: scipy.io.savemat(d / "other.mat", {"x": np.eye(2)})),
    "garbage-keras": (
        "--keras",
        "junk.keras",
        lambda d: (d / "junk.keras").write_bytes(bytes(range(256)) * 4),
    ),
    "not-callable": ("--keras", "holder:VALUE", lambda d: (d / "holder.py").write_text("VALUE = 3\n")),
    "not-a-model": (
        "--keras",
        "maker:build",
        lambda d: (d / "maker.py").write_text("def build():\n    return 3\n"),
    ),
    "raising-build": (
        "--keras",
        "raiser:build",
        lambda d: (d / "raiser.py").write_text(
            "def build():\n    raise RuntimeError('boom\\nsecond line')\n"
        ),
    ),
}


def _plain_hdf5(path: Path) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        f["data"] = np.arange(4.0)
        f["data"].attrs["MATLAB_class"] = np.bytes_("struct")


@pytest.mark.parametrize("case", list(HOSTILE_FILES))
def test_hostile_files_are_one_line_errors(wd, capsys, case):
    option, value, make = HOSTILE_FILES[case]
    make(wd)
    argv = ["check", "--mcn", "net.mat", "--keras", "model.keras"]
    argv[argv.index(option) + 1] = value
    r = cli(capsys, *argv)
    for module in ("holder", "maker", "raiser"):
        sys.modules.pop(module, None)
    assert_error(r, option, where=wd)


# --------------------------------------------------------------------------- working directory


def test_working_directory_cannot_shadow_dependencies(shared, tmp_path):
    write_shadow_modules(tmp_path)
    for name in ("net.mat", "model.keras"):
        shutil.copy2(shared / name, tmp_path / name)
    r = console("check", "--mcn", "net.mat", "--keras", "model.keras", cwd=tmp_path)
    assert shadow_markers(tmp_path) == [], f"shadow modules imported from the cwd\n{r.describe()}"
    assert r.rc == 0 and f"{REPORT_PREFIX} EQUIVALENT" in r.out, r.describe()


def test_user_module_is_imported_but_cannot_shadow_dependencies(shared, tmp_path):
    write_shadow_modules(tmp_path)
    write_user_model(tmp_path, "mymodel")
    shutil.copy2(shared / "net.mat", tmp_path / "net.mat")
    r = console("check", "--mcn", "net.mat", "--keras", "mymodel:build", cwd=tmp_path)
    assert (tmp_path / "USER_MODULE_IMPORTED").exists(), f"mymodel was not imported\n{r.describe()}"
    assert (tmp_path / "USER_MODULE_BUILT").exists(), f"mymodel.build was not called\n{r.describe()}"
    assert shadow_markers(tmp_path) == [], f"shadow modules imported from the cwd\n{r.describe()}"
    assert r.rc == 0 and f"{REPORT_PREFIX} EQUIVALENT" in r.out, r.describe()


_EXIT_SOURCES = {
    "at-import": "import sys\n\nsys.exit(0)\n\n\ndef build():\n    return None\n",
    "in-build": "import sys\n\n\ndef build():\n    sys.exit(0)\n",
}


@pytest.mark.parametrize("where", ["at-import", "in-build"])
@pytest.mark.parametrize("how", ["in-process", "subprocess"])
def test_user_module_calling_sys_exit_is_an_error(wd, capsys, where, how):
    module = f"exiting_{where.replace('-', '_')}_{uuid.uuid4().hex[:8]}"
    (wd / f"{module}.py").write_text(_EXIT_SOURCES[where])
    argv = ("check", "--mcn", "net.mat", "--keras", f"{module}:build")
    if how == "in-process":
        r = cli(capsys, *argv)
        sys.modules.pop(module, None)
    else:
        r = console(*argv, cwd=wd)
    assert_error(r, where=wd)


# --------------------------------------------------------------------------- report files


@pytest.mark.parametrize(
    "option, target",
    [
        ("--json", "net.mat"),
        ("--html", "net.mat"),
        ("--json", "model.keras"),
        ("--html", "model.keras"),
        ("--json", "./net.mat"),
        ("--html", "{abs}/net.mat"),
    ],
)
def test_check_report_onto_an_input_is_refused(wd, capsys, option, target):
    before = {name: (wd / name).read_bytes() for name in ("net.mat", "model.keras")}
    r = cli(capsys, "check", "--mcn", "net.mat", "--keras", "model.keras", option, target.format(abs=wd))
    assert_error(r, where=wd)
    for name, data in before.items():
        assert (wd / name).read_bytes() == data, f"{name} was overwritten\n{r.describe()}"


@pytest.mark.parametrize("command", ["diagnose", "train-parity"])
def test_other_reports_onto_the_net_are_refused(wd, capsys, command):
    before = (wd / "net.mat").read_bytes()
    if command == "diagnose":
        argv = ("diagnose", "--mcn", "net.mat", "--keras", "model.keras", "--json", "net.mat")
    else:
        argv = (*TRAIN_SMALL, "--json", "net.mat")
    r = cli(capsys, *argv)
    assert_error(r, where=wd)
    assert (wd / "net.mat").read_bytes() == before, r.describe()


def _bad_net_file(path: Path) -> None:
    raw = net_to_raw(small_net())
    raw["layers"].items[2]["weights"] = Cell(["abc", np.zeros((1, 2))])
    save_raw(path, raw)


@pytest.mark.parametrize("failure", ["bad-net", "bad-keras"])
def test_a_failed_run_leaves_existing_reports_intact(wd, capsys, failure):
    old = {"old.html": "<html><body>old report</body></html>\n", "old.json": '{"old": true}\n'}
    for name, text in old.items():
        (wd / name).write_text(text)
    _bad_net_file(wd / "bad.mat")
    mcn, keras = ("bad.mat", "model.keras") if failure == "bad-net" else ("net.mat", "nosuchmodule_xyz:build")
    r = cli(capsys, "check", "--mcn", mcn, "--keras", keras, "--html", "old.html", "--json", "old.json")
    assert_error(r, where=wd)
    for name, text in old.items():
        assert (wd / name).read_text() == text, f"{name} was truncated or rewritten\n{r.describe()}"


def test_numeric_layer_name_gives_no_half_written_report(wd, capsys):
    raw = net_to_raw(small_net())
    raw["layers"].items[2]["name"] = 3.0  # a MATLAB double as the name
    save_raw(wd / "numname.mat", raw)
    r = cli(
        capsys,
        "check",
        "--mcn",
        "numname.mat",
        "--keras",
        "model.keras",
        "--json",
        "r.json",
        "--html",
        "r.html",
    )
    assert_sane(r, "check", wd)
    if r.rc == 2:
        assert not (wd / "r.json").exists() and not (wd / "r.html").exists(), "half-written report"
    else:
        strict_json(wd / "r.json")
        page = (wd / "r.html").read_text()
        assert page.rstrip().endswith("</html>"), page[-200:]
    for command in ("reference", "diagnose"):
        argv = [command, "--mcn", "numname.mat"] + (
            [] if command == "reference" else ["--keras", "model.keras"]
        )
        assert_sane(cli(capsys, *argv), command, wd)


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
