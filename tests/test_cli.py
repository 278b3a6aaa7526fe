"""The mcn-harness command line, end to end through the console script."""

from __future__ import annotations

import html.parser
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from harness.mcn import save_net, seed_net

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("mcn-harness")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "harness.cli", *args]
    env = {k: v for k, v in os.environ.items() if k != "MCN_HARNESS_NATIVE_LOGS"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd or ROOT, env=env, timeout=300)


@pytest.fixture(scope="module")
def demo() -> subprocess.CompletedProcess:
    return run()


def test_no_arguments_checks_the_seed_against_both_models(demo):
    assert demo.returncode == 0, demo.stderr
    out = demo.stdout
    question, fixed = out.split("=== MatConvNet seed network vs the corrected Keras model")
    assert "DIVERGENT" in question and "first divergence: layer 'ip1'" in question
    assert "EQUIVALENT" in fixed
    # the question's model: every cause the issue names
    for needle in (
        "[groups] ip1 / conv2d_5: MatConvNet 2 filter groups",
        "Keras 1",
        "[optimizer] optimizer: MatConvNet SGD with momentum 0.9; Keras RMSprop",
        "[weight decay] optimizer: MatConvNet 0.0005",
        "learning-rate decay, not weight decay",
        "[learning-rate schedule] optimizer: MatConvNet 0.01 for 10 epochs, 0.001 for 10 epochs, "
        "0.0001 for 10 epochs",
        "[bias learning-rate multiplier] optimizer: MatConvNet learningRate [1 2]",
        "Keras GlorotUniform",
        "Gaussian(0, 0.01",
    ):
        assert needle in question, needle
    assert demo.stderr.strip() == ""  # no native log noise
    assert "\x1b[" not in out  # plain when piped


def test_check_exit_codes_json_and_html(tmp_path):
    ok = run("check", "--mcn", "seed", "--keras", "seed-fixed", "--json", str(tmp_path / "f.json"))
    assert ok.returncode == 0, ok.stderr
    assert json.loads((tmp_path / "f.json").read_text())["ok"] is True
    bad = run(
        "check",
        "--keras",
        "seed-question",
        "--json",
        str(tmp_path / "q.json"),
        "--html",
        str(tmp_path / "q.html"),
    )
    assert bad.returncode == 1
    data = json.loads((tmp_path / "q.json").read_text())
    assert data["schema"] == "mcn-harness/report/4" and data["first_divergence"]["culprit"] == "ip1"
    assert any(f["kind"] == "groups" for f in data["findings"])
    page = (tmp_path / "q.html").read_text()
    _check_html(page)


class _Collect(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str | None]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += attrs

    def handle_data(self, data):
        self.text.append(data)


def _check_html(page: str) -> _Collect:
    p = _Collect()
    p.feed(page)
    assert p.tags.count("table") >= 2 and "svg" in p.tags and "circle" in p.tags
    assert "script" not in p.tags and "link" not in p.tags and "img" not in p.tags
    assert not [v for k, v in p.attrs if k in ("src", "href") or (v and "http" in v and k != "xmlns")]
    return p


def test_untrusted_layer_names_stay_inert(tmp_path):
    net = seed_net(seed=0)
    evil = "<script>alert(1)</script>"
    net.layers[0].name = evil
    net.layers[1].name = "pool\x1b[31m1"
    save_net(tmp_path / "evil.mat", net)
    res = run(
        "check",
        "--mcn",
        str(tmp_path / "evil.mat"),
        "--keras",
        "seed-question",
        "--json",
        str(tmp_path / "e.json"),
        "--html",
        str(tmp_path / "e.html"),
    )
    assert res.returncode == 1, res.stderr
    assert "\x1b[31m" not in res.stdout  # control characters dropped in the terminal
    page = (tmp_path / "e.html").read_text()
    parsed = _check_html(page)
    assert evil in "".join(parsed.text)  # rendered as text
    assert "<script>" not in page
    names = {r["layer"] for r in json.loads((tmp_path / "e.json").read_text())["rows"]}
    assert evil in names  # JSON keeps the name as a plain string


def test_diagnose_is_static_and_fast():
    res = run("diagnose", "--keras", "seed-question")
    assert res.returncode == 1
    assert "[groups] ip1" in res.stdout and "RMSprop" in res.stdout


def _write_module(tmp_path: Path, body: str) -> None:
    (tmp_path / "usermodel.py").write_text(body)


@pytest.mark.parametrize(
    "args, message",
    [
        (("check", "--mcn", "missing.mat"), "no such file"),
        (("check", "--mcn", "nonet.mat"), "Received variables: weights"),
        (("check", "--keras", "usermodel:nothing"), "has no attribute 'nothing'"),
        (("check", "--keras", "usermodel:unalignable"), "cannot align"),
        (("check", "--keras", "usermodel:wrong_input"), "the model takes inputs of (32, 32, 3)"),
        (("check", "--keras", "nomodule:build"), "cannot import module"),
        (("check", "--batch", "0"), "--batch 0"),
        (("frobnicate",), "invalid choice"),
    ],
    ids=[
        "bad-path",
        "mat-without-net",
        "no-callable",
        "unalignable",
        "input-size",
        "no-module",
        "batch",
        "command",
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    scipy.io.savemat(tmp_path / "nonet.mat", {"weights": np.ones(3)})
    _write_module(
        tmp_path,
        "import keras\n"
        "def unalignable():\n"
        "    L = keras.layers\n"
        "    return keras.Sequential([keras.Input((28, 28, 1)), L.Flatten(), L.Dense(2)])\n"
        "def wrong_input():\n"
        "    return keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(2, 3)])\n",
    )
    res = run(*args, cwd=tmp_path)
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mcn-harness: error:"), res.stderr
    assert message in lines[0]
    assert "Traceback" not in res.stderr
