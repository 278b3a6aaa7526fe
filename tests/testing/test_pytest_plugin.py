"""The pytest plugin: a user's project guarded by a few lines, run through pytester.

Inner runs are in-process (TensorFlow and the seed models are imported here first, so
pytester's sys.modules snapshot keeps them); the two checks about what gets imported run
in a fresh interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import keras  # noqa: F401  (imported before the inner runs: see the module docstring)
import pytest

import fixtures.seed.fixed_model  # noqa: F401
import fixtures.seed.question_model  # noqa: F401

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
SEED = ["-p", "mcn_harness", "--mcn-net", "seed"]
FIXED = [*SEED, "--keras-model", "fixtures.seed.fixed_model:build_model"]
QUESTION = [*SEED, "--keras-model", "fixtures.seed.question_model:build_model"]

USER_TESTS = """
import numpy as np

def test_port_matches_matconvnet(harness_equivalence):
    harness_equivalence()

def test_probe_batch(probe_batch, mcn_net):
    x, labels = probe_batch
    assert x.shape == (28, 28, 1, 4) and x.dtype == np.float64
    assert labels.shape == (1, 4) and set(labels.ravel()) <= {1.0, 2.0}
    assert np.array_equal(x, np.random.RandomState(0).randn(28, 28, 1, 4))
    assert mcn_net.layers[-1].type == "softmaxloss"
"""


@pytest.fixture
def user(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.syspathinsert(ROOT)  # so that fixtures.seed... imports from the temp dir
    pytester.makepyfile(test_user=USER_TESTS)
    return pytester


def _reports(directory: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))}


def test_fixed_model_passes_and_reports(user: pytest.Pytester):
    result = user.runpytest(*FIXED, "--harness-report", "out")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        ["mcn-harness: net seed, keras model fixtures.seed.fixed_model:build_model, float64*"]
    )
    reports = _reports(user.path / "out")
    assert list(reports) == ["test_user.py_test_port_matches_matconvnet.json"]
    data = reports["test_user.py_test_port_matches_matconvnet.json"]
    assert data["schema"] == "mcn-harness/report/4" and data["ok"] is True
    assert (data["dtype"], data["mode"], data["dialect"]) == ("float64", "normal", "master")


def test_question_model_fails_with_the_table_and_still_reports(user: pytest.Pytester):
    result = user.runpytest(*QUESTION, "--harness-report", "out", "--harness-dialect", "beta25")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*mcn-harness report: DIVERGENT (float64, mode normal, dialect beta25)*",
            "*first divergence: layer 'ip1'*",
            "*conv2d_5*dzdw{1}* DIFF*",
            "*findings (*):",  # the whole CheckResult, not only the table
            "*groups] ip1 / conv2d_5*",
            "test_user.py:*: EquivalenceError",  # the user's line, not the plugin's; an AssertionError
            "mcn-harness: 1 JSON report(s) written to *out",
        ]
    )
    assert "pytest_plugin.py" not in result.stdout.str()  # __tracebackhide__
    data = _reports(user.path / "out")["test_user.py_test_port_matches_matconvnet.json"]
    assert data["ok"] is False and data["dialect"] == "beta25"
    assert data["first_divergence"]["culprit"] == "ip1"


def test_check_takes_explicit_arguments(pytester: pytest.Pytester):
    pytester.syspathinsert(ROOT)
    pytester.makepyfile(
        """
        import harness
        from harness.translate import to_keras

        def test_translation(harness_equivalence):
            net = harness.seed_net(seed=3)
            first = harness_equivalence(net=net, model=to_keras(net), dialect="beta25")
            second = harness_equivalence(net=net, model=to_keras(net), x=first_x(), mode="test")
            assert first.ok and first.report.dialect == "beta25" and first.report.mode == "normal"
            assert second.report.mode == "test" and second.report.dialect == "master"

        def first_x():
            import numpy as np
            return np.random.RandomState(1).randn(28, 28, 1, 2)
        """
    )
    # no --mcn-net / --keras-model: explicit arguments need neither
    result = pytester.runpytest("-p", "mcn_harness", "--harness-report", "out")
    result.assert_outcomes(passed=1)
    names = sorted(p.name for p in (pytester.path / "out").glob("*.json"))
    assert names == ["test_check_takes_explicit_arguments.py_test_translation-2.json"] + [
        "test_check_takes_explicit_arguments.py_test_translation.json"
    ]


def test_skips_without_options(user: pytest.Pytester):
    result = user.runpytest("-p", "mcn_harness", "-rs")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(["*mcn-harness: no MatConvNet net given (pass --mcn-net*"])
    result = user.runpytest(*SEED, "-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*mcn-harness: no Keras model given (pass --keras-model*"])


def test_ini_options_and_a_saved_model(pytester: pytest.Pytester, tmp_path: Path):
    from harness import seed_net
    from harness.translate import to_keras

    to_keras(seed_net(seed=0)).save(pytester.path / "seed.keras")
    pytester.makeini("[pytest]\nmcn_net = seed\nkeras_model = seed.keras\n")
    pytester.makepyfile(
        """
        def test_model(keras_model, mcn_net):
            assert [l.name for l in keras_model.layers if l.weights][-1] == "classifier"
            assert keras_model.get_layer("ip1").groups == 2
        """
    )
    pytester.runpytest("-p", "mcn_harness").assert_outcomes(passed=1)


@pytest.mark.parametrize(
    "value, message",
    [
        ("fixtures.seed.no_such_model:build_model", "cannot import module 'fixtures.seed.no_such_model'"),
        ("fixtures.seed.fixed_model:no_such_callable", "has no attribute 'no_such_callable'"),
        ("missing.keras", "no such file"),
        ("fixtures.seed.fixed_model", "expected module:callable"),
        ("fixtures.seed.fixed_model:keras", "'keras' is not callable"),
    ],
)
def test_bad_keras_model_is_a_usage_error(user: pytest.Pytester, value: str, message: str):
    result = user.runpytest(*SEED, "--keras-model", value)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    errors = [line for line in result.stderr.lines if line.startswith("ERROR:")]
    assert len(errors) == 1 and f"--keras-model {value!r}: " in errors[0] and message in errors[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mcn-net", "missing.mat"], "--mcn-net 'missing.mat': no such file"),
        (["--harness-batch", "0"], "--harness-batch 0: expected a positive number"),
        (["--harness-dtype", "float16"], "invalid choice: 'float16'"),
    ],
)
def test_other_bad_options_are_usage_errors(user: pytest.Pytester, args: list[str], message: str):
    result = user.runpytest("-p", "mcn_harness", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()


def test_callable_must_return_a_model(pytester: pytest.Pytester):
    pytester.syspathinsert()
    pytester.makepyfile(not_a_model="def build():\n    return 42\n")
    pytester.makepyfile("def test_model(keras_model):\n    pass\n")
    result = pytester.runpytest("-p", "mcn_harness", "--keras-model", "not_a_model:build")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*--keras-model 'not_a_model:build': expected a keras.Model, got int*"])


def _fresh(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    return done.stdout.strip()


def test_importing_the_plugin_does_not_import_tensorflow():
    code = (
        "import sys, harness.testing.pytest_plugin; print(sorted({'tensorflow', 'keras'} & set(sys.modules)))"
    )
    assert _fresh(code) == "[]"


def test_a_run_that_uses_no_fixture_does_not_import_tensorflow(pytester: pytest.Pytester):
    pytester.syspathinsert(ROOT)
    pytester.makepyfile("import sys\n\ndef test_light():\n    assert 'tensorflow' not in sys.modules\n")
    result = pytester.runpytest_subprocess(*FIXED)
    result.assert_outcomes(passed=1)


def test_harness_images_probe_with_the_users_imdb(user: pytest.Pytester):
    """--harness-images: probe_batch and harness_equivalence take the user's images (test
    set first), not random ones; the fixed model stays equivalent on them."""
    import numpy as np
    import scipy.io

    rng = np.random.RandomState(5)
    data = rng.rand(28, 28, 1, 6).astype(np.float32)
    labels = np.array([[1, 2, 2, 1, 2, 1]], float)
    sets = np.array([[1, 3, 1, 3, 3, 1]], float)
    scipy.io.savemat(user.path / "imdb.mat", {"images": {"data": data, "labels": labels, "set": sets}})
    user.makepyfile(
        test_images="""
import numpy as np
import scipy.io

def test_probe_batch_is_the_imdb(probe_batch):
    x, labels = probe_batch
    data = scipy.io.loadmat("imdb.mat")["images"][0, 0]["data"]
    assert np.array_equal(x, data[..., [1, 3, 4, 0]].astype(np.float64))
    assert labels.tolist() == [[2.0, 1.0, 2.0, 1.0]]

def test_images_reach_the_check(harness_equivalence, monkeypatch):
    import harness.pipeline

    seen = []
    real = harness.pipeline.check
    monkeypatch.setattr(harness.pipeline, "check", lambda *a, **k: seen.append(a[2]) or real(*a, **k))
    assert harness_equivalence().ok
    data = scipy.io.loadmat("imdb.mat")["images"][0, 0]["data"]
    assert len(seen) == 1 and np.array_equal(seen[0], data[..., [1, 3, 4, 0]])
"""
    )
    result = user.runpytest(*FIXED, "--harness-images", "imdb.mat", "test_images.py")
    result.assert_outcomes(passed=2)
    bad = user.runpytest(*FIXED, "--harness-images", "missing.mat", "test_images.py")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*--harness-images *missing.mat: no such file or directory*"])
