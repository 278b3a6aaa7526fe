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

import math
import shutil
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.sparse

import harness
from harness.mcn import save_net

from .inputs import (
    Cell,
    dead_channel_bnorm_net,
    net_to_raw,
    save_raw,
    shadow_markers,
    small_net,
    with_last_bias,
    write_shadow_modules,
    write_user_model,
)
from .running import (
    REPORT_PREFIX,
    TRAIN_SMALL,
    assert_error,
    assert_sane,
    cli,
    console,
    strict_json,
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
