"""The harness judged on Keras ports it did not write.

Every port of ``ports.py`` was written the way users write Keras (Sequential, functional
with ``keras.ops``, subclassed with logic in ``call()`` and layers declared in any order,
a Lambda around ``tf.nn.local_response_normalization``, a Permute + Flatten + Dense head,
float32 and float64), moves its weights by hand, and is checked against MatConvNet's stored
outputs without harness code (``test_catalogue_independent.py``). Here the harness must
agree: a faithful port is EQUIVALENT, a port with a planted bug is DIVERGENT and blamed on
the first MatConvNet layer whose output the bug changes.

The ports transfer their own weights, so the comparison runs with ``weights="model"``;
faithful ports are also checked with the harness loading the net's weights by structure
(``weights="net"``), which has to find each parameter layer in whatever style.
"""

from __future__ import annotations

import numpy as np
import pytest

import harness
from tests.golden import case_net, load_case

from .ports import CATALOGUE, SUBTLE, Port

# Ports the catalogue calls faithful from their forward outputs, whose backward pass is not
# MatConvNet's: the harness must call them DIVERGENT and blame this layer.
BACKWARD_DIVERGENT = {
    # ZeroPadding2D + MaxPooling2D after relu2: where a window's real cells are all 0 (ReLU)
    # the pad's 0 ties with them, and TensorFlow sends the derivative to the pad cell while
    # MatConvNet sends it to the first real maximum. Checked below against MatConvNet's own
    # stored derivative at relu2's output.
    "lambda_lrn_mixed": "pool2",
    "permute_mixed": "pool2",
    # ip1 as one Dense with block-diagonal weights: the forward pass is exact, but the
    # weights off MatConvNet's two filter groups get derivatives, so training differs.
    "subclass_seed": "ip1",
}

# Ports whose verdict under the harness's contract differs from the catalogue's label, and why.
EXPECTED_VERDICT = {
    # The model then returns softmax probabilities, which are exactly MatConvNet's: a model
    # ending in a softmax is read as returning probabilities (its loss takes them as such).
    # Whether the user's training loss then applies another softmax (from_logits=True) is
    # a training set-up question, not one of the model's function.
    "seq_seed__extra_softmax": True,
}


def _case(port: Port):
    case = load_case(port.case)
    net = case_net(case)
    x = np.asarray(case.inputs["x"], dtype=np.float64)
    labels = np.asarray(case.inputs["labels"], dtype=np.float64)
    mode = str(case.opts.get("mode", "normal")) if isinstance(case.opts, dict) else "normal"
    return net, x, labels, mode


@pytest.mark.parametrize("port", [p for p in CATALOGUE if p.faithful], ids=lambda p: p.name)
@pytest.mark.parametrize("weights", ["model", "net"])
def test_faithful_port_is_equivalent(port, weights):
    net, x, labels, mode = _case(port)
    report = harness.compare(net, port.build(), x, labels, mode=mode, weights=weights)
    assert report.dtype == "float64" or any("float32" in n for n in report.notes), str(report)
    if port.name not in BACKWARD_DIVERGENT:
        assert report.ok, str(report)
        return
    fd = report.first_divergence
    assert fd is not None and fd.culprit == BACKWARD_DIVERGENT[port.name], str(report)
    assert all(r.ok or r.limitation for r in report.rows if r.tensor in ("x", "output")), str(report)
    if fd.culprit == "pool2":  # the harness's reference is MatConvNet's own stored derivative
        row = next(r for r in report.rows if not r.ok and not r.limitation)
        stored = np.asarray(load_case(port.case).outputs["dzdx"][6])  # res(7): relu2's output
        i = tuple(row.worst_index_mcn)
        assert stored[i] == pytest.approx(row.ref_value, rel=1e-5, abs=1e-7), str(report)
        assert abs(stored[i] - row.keras_value) > 1e-3, str(report)


@pytest.mark.parametrize("port", [p for p in CATALOGUE + SUBTLE if not p.faithful], ids=lambda p: p.name)
def test_planted_bug_is_detected_and_blamed(port):
    net, x, labels, mode = _case(port)
    report = harness.compare(net, port.build(), x, labels, mode=mode, weights="model")
    if EXPECTED_VERDICT.get(port.name) is True:
        assert report.ok, str(report)
        return
    assert not report.ok, f"{port.name} ({port.bug}) not detected\n{report}"
    fd = report.first_divergence
    assert fd is not None and fd.culprit == port.culprit, f"{port.name} ({port.bug})\n{report}"
