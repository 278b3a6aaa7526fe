"""Training parity on the bundled digits (a reduced run of what train-parity does)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fixtures.seed import fixed_model, question_model
from harness.io.imdb import digits_imdb
from harness.mcn import McnError, seed_net
from harness.training.parity import plot_parity, train_parity


@pytest.fixture(scope="module")
def imdb():
    return digits_imdb()


def short_run(model_module, imdb, epochs: int):
    """The seed net against ``model_module``'s model: ``epochs`` epochs of at most two steps of 8 images."""
    return train_parity(
        seed_net(0),
        model_module.build_model(),
        imdb,
        epochs=epochs,
        batch_size=8,
        max_steps_per_epoch=2,
        progress=None,
    )


@pytest.fixture(scope="module")
def fixed_run(imdb):
    return short_run(fixed_model, imdb, epochs=2)


def test_corrected_model_coincides_within_float32_drift(fixed_run):
    assert len(fixed_run.steps) == 4 and [s.epoch for s in fixed_run.steps] == [1, 1, 2, 2]
    for s in fixed_run.steps:
        assert abs(s.loss_keras - s.loss_ref) <= 1e-5 * abs(s.loss_ref)
        assert s.error_keras == s.error_ref
        assert s.max_weight_rel < 1e-4  # float32 rounding, not a different update
    assert fixed_run.val_error_keras == fixed_run.val_error_ref


def test_question_model_parts_from_the_first_step(imdb):
    run = short_run(question_model, imdb, epochs=1)
    first = run.steps[0]
    assert first.max_weight_diff > 1e-4  # RMSprop vs SGD with momentum: a different first step
    assert run.settings["optimizer"] == "RMSprop"


def test_plot_and_json(tmp_path, fixed_run):
    plot_parity(fixed_run, str(tmp_path / "curves.png"))
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(fixed_run.to_json())
    assert len(data["steps"]) == 4 and {"loss_ref", "loss_keras", "max_weight_diff"} <= set(data["steps"][0])
    assert data["settings"]["optimizer"] == "MatConvNetSGD"


def test_bad_arguments(imdb):
    with pytest.raises(McnError, match="epochs"):
        train_parity(seed_net(0), fixed_model.build_model(), imdb, epochs=0, progress=None)
    empty = digits_imdb()
    empty.set = np.full_like(empty.set, 2)
    with pytest.raises(McnError, match="training images"):
        train_parity(seed_net(0), fixed_model.build_model(), empty, epochs=1, progress=None)
