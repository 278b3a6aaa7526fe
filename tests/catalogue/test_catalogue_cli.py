"""User-style ports through the command line: a `.keras` file and a `module:callable`,
with the harness loading the net's weights into whatever the user wrote (the default
``weights="net"``) and a random probe batch. Exit codes: 0 equivalent, 1 divergent."""

from __future__ import annotations

import numpy as np
import pytest

from harness.mcn import save_net
from tests.golden import case_net, load_case
from tests.test_cli import ROOT, run

from .golden_nets import SEED_SMALL
from .ports import PORTS


@pytest.fixture(scope="module")
def seed_small(tmp_path_factory) -> str:
    net = case_net(load_case(SEED_SMALL))
    net.meta = {"inputSize": np.array([[28.0, 28.0, 1.0]])}
    path = tmp_path_factory.mktemp("net") / "seed_small.mat"
    save_net(path, net)
    return str(path)


def test_module_callable_subclass_port_is_equivalent(seed_small):
    """A functional port with fused activations, named as module:callable."""
    done = run("check", "--mcn", seed_small, "--keras", "tests.catalogue.ports:build_fused_seed", cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "EQUIVALENT" in done.stdout


@pytest.mark.parametrize("name, code", [("seq_seed", 0), ("seq_seed__relu_logits", 1)])
def test_keras_file_ports(seed_small, tmp_path, name, code):
    path = tmp_path / f"{name}.keras"
    PORTS[name].build().save(path)
    done = run("check", "--mcn", seed_small, "--keras", str(path))
    assert done.returncode == code, done.stdout + done.stderr
    if code == 1:
        assert "first divergence: layer 'classifier'" in done.stdout, done.stdout
