"""The hostile-input tests' shared machinery: the CLI run in-process (``cli``) or as the
console script (``console``), the contract every run must keep (``assert_error``) and strict
JSON. The shared input files are the fixtures ``shared`` and ``wd`` (conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.cli import main

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
