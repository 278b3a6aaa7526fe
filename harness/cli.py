"""The ``mcn-harness`` command line.

    mcn-harness                      the bundled seed: MatConvNet vs the question's Keras
                                     model, then vs the corrected one (both reports)
    mcn-harness check --mcn PATH|seed --keras module:callable|PATH.keras|seed-question|seed-fixed
                      [--batch N] [--dtype float64|float32] [--mode normal|test]
                      [--dialect master|beta25] [--json PATH] [--html PATH] [--weights net|model]
    mcn-harness diagnose --mcn ... --keras ...      static findings only (fast)
    mcn-harness reference --mcn ...                 the net through the MatConvNet reference
    mcn-harness train-parity --mcn ... --keras ... [--epochs N] [--data digits|imdb.mat] [--plot curves.png]

Exit status: 0 equivalent (or no findings; train-parity: weights still agree at the end),
1 divergent (or findings; train-parity: weights parted), 2 bad usage or bad input (one
line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from .inputs import InputError, keras_model_factory, load_mcn_spec, probe_batch
from .mcn import McnError, vl_simplenn
from .mcn.net import Net

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class _Usage(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        raise _Usage(message)


def _colour(text: str, code: str, stream) -> str:
    if os.environ.get("NO_COLOR") or not getattr(stream, "isatty", lambda: False)():
        return text
    return f"\033[{code}m{text}\033[0m"


def _paint(report_text: str, stream) -> str:
    lines = []
    for line in report_text.splitlines():
        if " DIFF " in line or "DIVERGENT" in line:
            line = _colour(line, "31", stream)
        elif "EQUIVALENT" in line:
            line = _colour(line, "32", stream)
        elif " known " in line:
            line = _colour(line, "33", stream)
        lines.append(line)
    return "\n".join(lines)


def _silence_native_stderr() -> None:
    """Point file descriptor 2 at /dev/null and keep Python's ``sys.stderr`` on the real
    stderr: TensorFlow's C++ start-up lines (oneDNN notice, absl warnings) ignore
    TF_CPP_MIN_LOG_LEVEL and would bury the one line this tool prints on an error.
    MCN_HARNESS_NATIVE_LOGS=1 keeps them."""
    if os.environ.get("MCN_HARNESS_NATIVE_LOGS"):
        return
    sys.stderr.flush()
    real = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    sys.stderr = os.fdopen(real, "w", buffering=1)


def _load(args) -> tuple[Net, object]:
    base = Path.cwd()
    if str(base) not in sys.path:
        sys.path.insert(0, str(base))  # module:callable relative to where the user stands
    net = load_mcn_spec(args.mcn, "--mcn", base)
    factory = keras_model_factory(args.keras, "--keras", base)
    try:
        model = factory()
    except InputError:
        raise
    except Exception as err:
        raise InputError(
            f"--keras {args.keras!r}: building the model failed: {type(err).__name__}: {err}"
        ) from None
    import keras

    if not isinstance(model, keras.Model):
        raise InputError(f"--keras {args.keras!r}: expected a keras.Model, got {type(model).__name__}")
    size = net.meta.get("inputSize")
    if size is not None:
        want = tuple(int(v) for v in np.asarray(size, dtype=float).ravel()[:3])
        got = tuple(model.inputs[0].shape[1:])
        if (
            len(got) == 3
            and tuple(int(g) if g is not None else w for g, w in zip(got, want, strict=False)) != want
        ):
            raise InputError(
                f"--keras {args.keras!r}: the model takes inputs of {got} (H, W, C), "
                f"the net {want} (inputSize)"
            )
    return net, model


def _alignment_fatal(net: Net, model) -> str | None:
    """A model whose parameter layers cannot be paired with the net's cannot be compared."""
    from .compare.align import align

    alignment = align(net, model)
    for pair in alignment.pairs:
        if net.layers[pair.index].type in ("conv", "convt", "bnorm") and pair.param_layer is None:
            return (
                f"cannot align the model with the net: MatConvNet layer '{pair.name}' ({pair.type}) "
                "has no Keras partner"
            )
    return None


def _check_one(net: Net, model, args, out) -> int:
    from .compare import compare
    from .compare.diagnose import diagnose
    from .compare.report import to_html

    fatal = _alignment_fatal(net, model)
    if fatal:
        raise InputError(fatal)
    findings = diagnose(net, model)
    x, labels = probe_batch(net, args.batch, seed=args.seed)
    report = compare(
        net, model, x, labels, dtype=args.dtype, mode=args.mode, dialect=args.dialect, weights=args.weights
    )
    if report.alignment_problems and all("shapes" in p for p in report.alignment_problems):
        raise InputError(report.alignment_problems[0])
    print(_paint(str(report), out), file=out)
    causes = []
    if not report.ok and report.first_divergence:
        from .compare.diagnose import probe_causes

        causes = probe_causes(
            net, model, report, x, labels, mode=args.mode, dialect=args.dialect, weights=args.weights
        )
        for c in causes:
            print(f"likely cause at '{report.first_divergence['culprit']}': {c}", file=out)
    if findings:
        print(f"\nfindings ({len(findings)}):", file=out)
        for f in findings:
            print(f"  {f}", file=out)
    if args.json:
        payload = report.to_dict()
        payload["findings"] = [f.to_dict() for f in findings]
        payload["causes"] = causes
        Path(args.json).write_text(json.dumps(payload, indent=2, sort_keys=True))
    if args.html:
        Path(args.html).write_text(to_html(report, findings))
    return 0 if report.ok else 1


def _cmd_check(args) -> int:
    net, model = _load(args)
    return _check_one(net, model, args, sys.stdout)


def _cmd_diagnose(args) -> int:
    from .compare.diagnose import diagnose

    net, model = _load(args)
    findings = diagnose(net, model)
    for f in findings:
        print(f)
    if args.json:
        Path(args.json).write_text(json.dumps([f.to_dict() for f in findings], indent=2, sort_keys=True))
    if not findings:
        print("no static differences found")
    return 1 if findings else 0


def _cmd_seed_demo(args) -> int:
    """No arguments: the seed net against the question's model, then the corrected one."""
    status = {}
    for spec in ("seed-question", "seed-fixed"):
        args.mcn, args.keras = "seed", spec
        title = {
            "seed-question": "the Keras model from the question",
            "seed-fixed": "the corrected Keras model",
        }
        print(f"=== MatConvNet seed network vs {title[spec]} ({spec}) ===")
        net, model = _load(args)
        status[spec] = _check_one(net, model, args, sys.stdout)
        print()
    ok = status["seed-question"] == 1 and status["seed-fixed"] == 0
    print(
        "summary: the question's model diverges (first at ip1's filter groups, then the training set-up); "
        "the corrected model is equivalent."
        if ok
        else "summary: unexpected result, see the reports above"
    )
    return 0 if ok else 1


def _cmd_reference(args) -> int:
    net = load_mcn_spec(args.mcn, "--mcn", Path.cwd())
    dtype = np.float64 if args.dtype == "float64" else np.float32
    x, labels = probe_batch(net, args.batch, seed=args.seed)
    res = vl_simplenn(
        net,
        x.astype(dtype),
        1.0 if labels is not None else None,
        labels,
        mode=args.mode,
        dialect=args.dialect,
        rng=np.random.default_rng(args.seed),
    )
    print(
        f"MatConvNet reference: {len(net.layers)} layers, batch {args.batch}, {args.dtype}, "
        f"mode {args.mode}, dialect {args.dialect}"
    )
    print(f"{'#':>3}  {'layer':<12} {'type':<12} {'output (H x W x C)':<20} {'|x|max':>10} {'|dzdx|max':>10}")
    for i, layer in enumerate(net.layers):
        y = res[i + 1].x
        shape = " x ".join(str(s) for s in np.shape(y)[:3]) if np.ndim(y) == 4 else "scalar"
        dx = res[i].dzdx
        dmax = "" if dx is None else f"{float(np.max(np.abs(dx))):>10.3g}"
        print(
            f"{i + 1:>3}  {layer.name:<12.12} {layer.type:<12} {shape:<20} "
            f"{float(np.max(np.abs(y))):>10.3g} {dmax}"
        )
    return 0


def _cmd_train_parity(args) -> int:
    from .data import digits_imdb, load_imdb
    from .parity import plot_parity, train_parity

    net, model = _load(args)
    imdb = digits_imdb() if args.data == "digits" else load_imdb(args.data)
    if imdb.images.shape[:3] != tuple(
        int(v) for v in np.asarray(net.meta.get("inputSize"), float).ravel()[:3]
    ):
        raise InputError(
            f"--data {args.data!r}: images are {imdb.images.shape[:3]} (H, W, C), the net takes "
            f"{tuple(int(v) for v in np.asarray(net.meta.get('inputSize'), float).ravel()[:3])}"
        )
    result = train_parity(
        net,
        model,
        imdb,
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        dtype=args.dtype,
        dialect=args.dialect,
        seed=args.seed,
        max_steps_per_epoch=args.max_steps,
    )
    print(
        f"{'step':>5} {'epoch':>5} {'lr':>8} {'loss ref':>10} {'loss keras':>10} {'err ref':>8} "
        f"{'err keras':>9} {'max |dw|':>10}"
    )
    for s in result.steps:
        print(
            f"{s.step:>5} {s.epoch:>5} {s.learning_rate:>8.2g} {s.loss_ref:>10.6f} {s.loss_keras:>10.6f} "
            f"{100 * s.error_ref:>7.1f}% {100 * s.error_keras:>8.1f}% {s.max_weight_diff:>10.2e}"
        )
    if result.val_error_ref:
        print(
            "validation error per epoch: reference "
            + " ".join(f"{100 * v:.1f}%" for v in result.val_error_ref)
            + "; Keras "
            + " ".join(f"{100 * v:.1f}%" for v in result.val_error_keras)
        )
    if args.plot:
        plot_parity(result, args.plot)
        print(f"plot written to {args.plot}")
    if args.json:
        Path(args.json).write_text(result.to_json())
    last = result.steps[-1]
    return 0 if last.max_weight_diff <= 1e-3 * max(1.0, abs(last.loss_ref)) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mcn-harness", description="Find where a Keras port of a MatConvNet network diverges."
    )
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    def common(p, keras_needed: bool):
        p.add_argument(
            "--mcn", default="seed", help="a .mat file holding a simplenn net, or 'seed' (default)"
        )
        if keras_needed:
            p.add_argument(
                "--keras",
                default="seed-question",
                help="module:callable, a .keras file, seed-question (default) or seed-fixed",
            )
        p.add_argument("--batch", type=int, default=4, help="images in the probe batch (default 4)")
        p.add_argument("--dtype", choices=("float64", "float32"), default="float64")
        p.add_argument("--mode", choices=("normal", "test"), default="normal")
        p.add_argument("--dialect", choices=("master", "beta25"), default="master")
        p.add_argument("--seed", type=int, default=0, help="seed of the probe batch")

    check = sub.add_parser("check", help="compare every layer's activations and gradients")
    common(check, True)
    check.add_argument("--json", help="write the report as JSON (schema in harness/compare/report.py)")
    check.add_argument("--html", help="write a self-contained HTML report")
    check.add_argument(
        "--weights",
        choices=("net", "model"),
        default="net",
        help="'net': load the net's weights into the model (default); 'model': keep the model's",
    )
    diag = sub.add_parser("diagnose", help="static differences only, without running the networks")
    common(diag, True)
    diag.add_argument("--json", help="write the findings as JSON")
    par = sub.add_parser("train-parity", help="train the reference and the Keras model side by side and plot")
    common(par, True)
    par.set_defaults(dtype="float32", keras="seed-fixed")
    par.add_argument("--epochs", type=int, default=3)
    par.add_argument("--batch-size", type=int, default=32, help="images per step (default 32)")
    par.add_argument("--max-steps", type=int, default=None, help="steps per epoch at most (default: all)")
    par.add_argument("--data", default="digits", help="an imdb .mat file, or 'digits' (bundled, default)")
    par.add_argument(
        "--optimizer",
        choices=("model", "matconvnet"),
        default="model",
        help="the model's compiled optimizer (default) or harness.matconvnet_optimizer",
    )
    par.add_argument("--plot", help="write the curves as PNG")
    par.add_argument("--json", help="write the per-step figures as JSON")
    ref = sub.add_parser("reference", help="run a net through the MatConvNet reference, forward and backward")
    common(ref, False)
    return parser


def main(argv: list[str] | None = None) -> int:
    from_console = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if from_console and (not argv or argv[0] in ("check", "diagnose", "train-parity")):
        _silence_native_stderr()
        import logging

        logging.getLogger("tensorflow").setLevel(logging.ERROR)  # retracing notices are not for users
    try:
        if not argv:
            args = parser.parse_args(["check"])
            args.json = args.html = None
            return _cmd_seed_demo(args)
        args = parser.parse_args(argv)
        if args.command is None:
            raise _Usage(
                "expected a command: check, diagnose or reference (or no arguments for the seed demo)"
            )
        if args.batch < 1:
            raise _Usage(f"--batch {args.batch}: expected a positive number of images")
        commands = {
            "check": _cmd_check,
            "diagnose": _cmd_diagnose,
            "reference": _cmd_reference,
            "train-parity": _cmd_train_parity,
        }
        return commands[args.command](args)
    except _Usage as err:
        print(f"mcn-harness: error: {err}", file=sys.stderr)
        return 2
    except McnError as err:
        print(f"mcn-harness: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"mcn-harness: error: {_one_line(err)}", file=sys.stderr)
        return 2


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


if __name__ == "__main__":
    sys.exit(main())
