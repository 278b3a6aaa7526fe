"""The pytest plugin (entry point ``mcn_harness``): options and thin fixtures only.

A project guards its Keras port of a MatConvNet net with a test such as::

    def test_port_matches_matconvnet(harness_equivalence):
        harness_equivalence()

run as ``pytest --mcn-net net.mat --keras-model mypkg.model:build``. The comparison
itself is ``harness.compare`` / ``harness.assert_equivalent``; this file turns command
line options into the net, the model, a probe batch and a JSON report per test.

Importing this module does not import TensorFlow (only the NumPy reference): the plugin
is loaded in every pytest run of the environment, so the heavy imports wait until a
collected test asks for one of the fixtures. The loading itself lives in harness.inputs.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from harness.io.specs import InputError as _OptionError
from harness.io.specs import build_model as _build_model
from harness.io.specs import keras_model_factory as _model_factory
from harness.io.specs import load_mcn_spec as _load_net
from harness.io.specs import parse_model_spec as _parse_model_spec
from harness.io.specs import probe_batch as _probe_batch
from harness.io.text import safe_text
from harness.mcn import McnError

__all__ = [
    "harness_equivalence",
    "keras_model",
    "mcn_net",
    "probe_batch",
]

# fixtures that need --keras-model / --mcn-net resolved (checked once, after collection)
_NEEDS_MODEL = ("keras_model", "harness_equivalence")
_NEEDS_NET = ("mcn_net", "probe_batch", "harness_equivalence")


@dataclass
class _Settings:
    """The parsed options; the net and the model factory are resolved lazily, once."""

    net_spec: str | None
    net_option: str  # "--mcn-net" or "mcn_net (ini)": named in error messages
    net_base: Path  # relative paths are read from here
    model_spec: str | None
    model_option: str
    model_base: Path
    dtype: str
    mode: str
    dialect: str
    batch: int
    report_dir: Path | None
    images: Path | None = None
    _net: Any = None
    _factory: Any = None
    reports: list[Path] = field(default_factory=list)

    def net(self):
        """The tidied net (read once per session; callers get copies)."""
        if self._net is None:
            self._net = _load_net(self.net_spec, self.net_option, self.net_base)
        return self._net

    def factory(self):
        """A zero-argument callable that returns a fresh keras.Model."""
        if self._factory is None:
            self._factory = _model_factory(self.model_spec, self.model_option, self.model_base)
        return self._factory


_SETTINGS = pytest.StashKey[_Settings]()


# --------------------------------------------------------------------------- options


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mcn-harness", "mcn-harness: MatConvNet vs Keras equivalence")

    def choice(name: str, choices: tuple[str, str], help: str) -> None:
        """An option with fixed choices; the first is the default."""
        group.addoption(name, choices=choices, default=choices[0], help=help)

    group.addoption(
        "--mcn-net",
        metavar="PATH",
        help="MatConvNet simplenn net: a .mat file, or 'seed' for the bundled seed net "
        "(fixture mcn_net; ini: mcn_net)",
    )
    group.addoption(
        "--keras-model",
        metavar="MODULE:CALLABLE|PATH",
        help="Keras model: module:callable returning a keras.Model, or a .keras file "
        "(fixture keras_model; ini: keras_model)",
    )
    choice(
        "--harness-dtype",
        ("float64", "float32"),
        "precision of both sides in harness_equivalence (default float64)",
    )
    choice(
        "--harness-mode",
        ("normal", "test"),
        "vl_simplenn mode: normal (training: dropout, bnorm batch statistics) or test",
    )
    choice(
        "--harness-dialect",
        ("master", "beta25"),
        "MatConvNet loss convention: master (divided by N) or beta25 (summed)",
    )
    group.addoption(
        "--harness-batch",
        type=int,
        default=4,
        metavar="N",
        help="images in the probe_batch fixture (default 4)",
    )
    group.addoption(
        "--harness-images",
        metavar="PATH",
        help="probe with your data instead of random images: an imdb .mat, a PNG/JPEG file or a "
        "directory of them (fixtures probe_batch and harness_equivalence)",
    )
    group.addoption(
        "--harness-report",
        metavar="DIR",
        help="write a JSON report per test that uses harness_equivalence into DIR",
    )
    parser.addini("mcn_net", "MatConvNet net for the mcn_net fixture (like --mcn-net)", default="")
    parser.addini("keras_model", "Keras model for the keras_model fixture (like --keras-model)", default="")


def pytest_configure(config: pytest.Config) -> None:
    try:
        settings = _settings(config)
    except _OptionError as err:
        raise pytest.UsageError(str(err)) from None
    config.stash[_SETTINGS] = settings


def _settings(config: pytest.Config) -> _Settings:
    """Check every option that can be checked without importing anything heavy."""
    here = Path(config.invocation_params.dir)
    ini_dir = Path(config.inipath).parent if config.inipath else Path(config.rootpath)

    def pick(option: str, ini: str) -> tuple[str | None, str, Path]:
        value = config.getoption(option)
        if value is not None:
            return (value.strip() or None), f"--{option.replace('_', '-')}", here
        value = str(config.getini(ini)).strip()
        return (value or None), f"{ini} (ini)", ini_dir

    net_spec, net_option, net_base = pick("mcn_net", "mcn_net")
    model_spec, model_option, model_base = pick("keras_model", "keras_model")
    if net_spec is not None and net_spec != "seed":
        path = net_base / net_spec
        if not path.is_file():
            raise _OptionError(
                f"{net_option} {net_spec!r}: no such file ({path}); expected a .mat file or 'seed'"
            )
    if model_spec is not None:
        _parse_model_spec(model_spec, model_option, model_base)
    batch = config.getoption("harness_batch")
    if batch < 1:
        raise _OptionError(f"--harness-batch {batch}: expected a positive number of images")
    report_dir = config.getoption("harness_report")
    if report_dir is not None:
        report_dir = here / report_dir
        if report_dir.exists() and not report_dir.is_dir():
            raise _OptionError(f"--harness-report {report_dir}: exists and is not a directory")
    images = config.getoption("harness_images")
    if images is not None:
        images = here / images
        if not images.exists():
            raise _OptionError(f"--harness-images {images}: no such file or directory")
    return _Settings(
        images=images,
        net_spec=net_spec,
        net_option=net_option,
        net_base=net_base,
        model_spec=model_spec,
        model_option=model_option,
        model_base=model_base,
        dtype=config.getoption("harness_dtype"),
        mode=config.getoption("harness_mode"),
        dialect=config.getoption("harness_dialect"),
        batch=batch,
        report_dir=report_dir,
    )


def pytest_collection_finish(session: pytest.Session) -> None:
    """Resolve the net and the model factory once the tests that need them are known:
    a missing module or callable is then a usage error, and a run that uses none of the
    fixtures never imports TensorFlow."""
    settings = session.config.stash.get(_SETTINGS, None)
    if settings is None:
        return
    names = {name for item in session.items for name in getattr(item, "fixturenames", ())}
    try:
        if settings.net_spec is not None and names.intersection(_NEEDS_NET):
            settings.net()
        if settings.model_spec is not None and names.intersection(_NEEDS_MODEL):
            settings.factory()
    except _OptionError as err:
        raise pytest.UsageError(str(err)) from None


def pytest_report_header(config: pytest.Config) -> str | None:
    settings = config.stash.get(_SETTINGS, None)
    if settings is None or (settings.net_spec is None and settings.model_spec is None):
        return None
    return (
        f"mcn-harness: net {settings.net_spec}, keras model {settings.model_spec}, {settings.dtype}, "
        f"mode {settings.mode}, dialect {settings.dialect}, batch {settings.batch}"
    )


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    settings = config.stash.get(_SETTINGS, None)
    if settings is not None and settings.reports:
        terminalreporter.write_line(
            f"mcn-harness: {len(settings.reports)} JSON report(s) written to {settings.report_dir}"
        )


# --------------------------------------------------------------------------- resolving


def _report_path(directory: Path, nodeid: str, taken: list[Path]) -> Path:
    """``directory/<node id made filesystem-safe>.json``; a second check in the same
    test gets ``-2`` and so on; long ids are cut and keep a hash of the full id."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid).strip("._") or "test"
    if len(safe) > 150:
        safe = f"{safe[:140]}-{hashlib.sha1(nodeid.encode()).hexdigest()[:8]}"
    path = directory / f"{safe}.json"
    k = 2
    while path in taken:
        path = directory / f"{safe}-{k}.json"
        k += 1
    return path


# --------------------------------------------------------------------------- fixtures

_NO_NET = "no MatConvNet net given (pass --mcn-net PATH|seed or set mcn_net in the ini)"
_NO_MODEL = "no Keras model given (pass --keras-model module:callable|PATH or set keras_model in the ini)"


def _from_option(spec: str | None, missing: str, make: Callable[[], Any]) -> Any:
    """``make()`` for a fixture read from the option ``spec``: the test is skipped with
    "mcn-harness: ``missing``" when the option is not given, and fails with one line when
    what it names cannot be read."""
    if spec is None:
        pytest.skip(f"mcn-harness: {missing}")
    try:
        return make()
    except _OptionError as err:
        pytest.fail(f"mcn-harness could not run: {safe_text(err)}", pytrace=False)


@pytest.fixture
def mcn_net(request: pytest.FixtureRequest):
    """The MatConvNet net of --mcn-net (tidied; a fresh copy per test)."""
    settings = request.config.stash[_SETTINGS]
    return _from_option(settings.net_spec, _NO_NET, lambda: settings.net().copy())


@pytest.fixture
def keras_model(request: pytest.FixtureRequest):
    """A fresh keras.Model from --keras-model (the callable is called once per test)."""
    settings = request.config.stash[_SETTINGS]
    return _from_option(
        settings.model_spec,
        _NO_MODEL,
        lambda: _build_model(settings.factory(), settings.model_option, settings.model_spec),
    )


@pytest.fixture
def probe_batch(mcn_net, request: pytest.FixtureRequest):
    """``(x, labels)``: x H x W x C x N from the net's inputSize (N = --harness-batch,
    RandomState(0)), labels 1 x N, 1-based, in range of the classifier's outputs; with
    --harness-images, the user's images (``harness.io.images``)."""
    settings = request.config.stash[_SETTINGS]
    if settings.images is not None:
        return _image_batch(mcn_net, settings)
    return _probe_batch(mcn_net, settings.batch)


def _image_batch(net, settings: _Settings):
    """``(x, labels)`` from --harness-images for ``net``; a file that cannot be read fails
    the test with one line."""
    from harness.io.images import load_probe_images
    from harness.io.specs import input_size, num_classes, resolve_input_size, with_input_size

    try:
        net = with_input_size(net, *resolve_input_size(net))
        has_loss = bool(net.layers) and net.layers[-1].type in ("softmaxloss", "loss")
        batch = load_probe_images(
            settings.images,
            input_size(net),
            settings.batch,
            normalization=net.meta.get("normalization"),
            classes=num_classes(net) if has_loss else None,
            option="--harness-images",
        )
    except McnError as err:
        pytest.fail(f"mcn-harness could not run: {safe_text(' '.join(str(err).split()))}", pytrace=False)
    return batch.x, batch.labels


@pytest.fixture
def harness_equivalence(request: pytest.FixtureRequest):
    """``check(net=None, model=None, x=None, labels=None, **options) -> CheckResult``.

    ``harness.check`` of the net with the model (by default the mcn_net, keras_model and
    probe_batch fixtures) in the configured dtype, mode and dialect (``options``
    override them). A divergence fails the test with ``EquivalenceError`` (the report,
    the causes and the findings); a comparison that cannot run fails with one line,
    "mcn-harness could not run: ...". With --harness-report the JSON report is written
    first, pass or fail.
    """
    from harness.testing.asserts import EquivalenceFixture

    settings = request.config.stash[_SETTINGS]

    def report_path() -> Path:
        path = _report_path(settings.report_dir, request.node.nodeid, settings.reports)
        settings.reports.append(path)
        return path

    fixture = EquivalenceFixture(
        net=lambda: request.getfixturevalue("mcn_net"),
        model=lambda: request.getfixturevalue("keras_model"),
        batch=settings.batch,
        options={"dtype": settings.dtype, "mode": settings.mode, "dialect": settings.dialect},
        report_path=None if settings.report_dir is None else report_path,
    )

    def check(net=None, model=None, x=None, labels=None, **options: Any):
        __tracebackhide__ = True
        if x is None and settings.images is not None:
            x, own = _image_batch(net if net is not None else request.getfixturevalue("mcn_net"), settings)
            labels = own if labels is None else labels
        try:
            return fixture(net, model, x, labels, **options)
        except AssertionError:
            raise  # a completed comparison that diverged: the verdict
        except SystemExit as err:  # never let the model's code end the run as a verdict
            pytest.fail(
                f"mcn-harness could not run: the model's code called sys.exit({err.code!r})", pytrace=False
            )
        except McnError as err:
            pytest.fail(f"mcn-harness could not run: {safe_text(' '.join(str(err).split()))}", pytrace=False)

    return check
