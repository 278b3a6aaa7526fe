"""The ``mcn-harness`` command line.

    mcn-harness                      the bundled seed: MatConvNet vs the question's Keras
                                     model, then vs the corrected one (both reports)
    mcn-harness check --mcn PATH|seed --keras module:callable|PATH.keras|seed-question|seed-fixed
                      [--batch N] [--dtype float64|float32] [--mode normal|test]
                      [--dialect master|beta25] [--json PATH] [--html PATH] [--weights net|model]
    mcn-harness diagnose --mcn ... --keras ...      static findings only (fast)
    mcn-harness reference --mcn ...                 the net through the MatConvNet reference
    mcn-harness port --mcn PATH --out DIR           a faithful Keras port: DIR/model.keras,
                                                    DIR/model.py, DIR/test_port.py
    check and reference also take [--images imdb.mat|image|dir] [--upto LAYER]
    [--input-size H W C] (for a net without meta.inputSize)
    mcn-harness train-parity --mcn ... --keras ... [--epochs N] [--data digits|imdb.mat] [--plot curves.png]
    diagnose and train-parity take simplenn and DagNN nets (a DagNN net's layers are found
    in the model by name; train-parity feeds its one image input and its Loss layers' labels)

Exit status: 0 equivalent (or no findings; train-parity: weights still agree at the end),
1 divergent (or findings; train-parity: weights parted), only ever from a completed
comparison; 2 could not run: bad usage, bad input, a crash, a model that calls sys.exit
(one line on stderr naming the file, layer and field; ``--debug`` adds the traceback).

Only ``--keras module:callable`` imports code from the working directory, after the
installed packages; report files (--json, --html, --plot) are written whole, after
everything is computed, and never over an input.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from harness.cli_reference import probe_images, run_reference
from harness.io.specs import (
    InputError,
    build_model,
    input_size,
    keras_model_factory,
    load_mcn_spec,
    num_classes,
    resolve_input_size,
    with_input_size,
)
from harness.io.text import json_dumps, safe_text, write_atomic
from harness.mcn import McnError
from harness.mcn.kernels import threads
from harness.mcn.net import Net

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


def _load(args, dagnn: bool = False) -> tuple[Net, object]:
    from harness.mcn.dagnn import DagNet

    base = Path.cwd()
    net = load_mcn_spec(args.mcn, "--mcn", base, upto=getattr(args, "upto", None), dagnn=dagnn)
    if isinstance(net, DagNet) and (getattr(args, "upto", None) or getattr(args, "images", None)):
        raise InputError("--upto and --images apply to simplenn networks only in check so far")
    factory = keras_model_factory(args.keras, "--keras", base)
    model = build_model(factory, "--keras", args.keras)
    if isinstance(net, DagNet):
        return net, model
    hwc, source = resolve_input_size(net, model, args.input_size)
    if source == "net.meta.inputSize":
        want = hwc
        inputs = getattr(model, "inputs", None) or []
        got = tuple(inputs[0].shape[1:]) if inputs else ()
        if (
            len(got) == 3
            and tuple(int(g) if g is not None else w for g, w in zip(got, want, strict=False)) != want
        ):
            raise InputError(
                f"--keras {args.keras!r}: the model takes inputs of {got} (H, W, C), "
                f"the net {want} (inputSize)"
            )
    return with_input_size(net, hwc, source), model


def _run_options(args) -> dict:
    """--seed, --dtype and --dialect (every command has them) as keyword arguments."""
    return {"seed": args.seed, "dtype": args.dtype, "dialect": args.dialect}


def _check_one(net: Net, model, args, out) -> int:
    from harness.equivalence.report import to_html
    from harness.pipeline import check

    images = probe_images(net, args)
    x, labels = (images.x, images.labels) if images is not None else (None, None)
    if images is not None:
        net.notes = [*net.notes, *images.notes]
    result = check(
        net,
        model,
        x,
        labels,
        batch=args.batch,
        mode=args.mode,
        weights=args.weights,
        upto=getattr(args, "upto", None),
        input_size=args.input_size,
        **_run_options(args),
    )
    # everything is computed and rendered before anything is printed or written: a
    # failure while rendering can then never follow a printed verdict
    lines = result.lines()
    table = len(str(result.report).splitlines())
    files = {}
    if args.json:
        files[args.json] = result.to_json()
    if args.html:
        files[args.html] = to_html(result.report, result.findings)
    print(_paint("\n".join(lines[:table]), out), file=out)
    if lines[table:]:
        print("\n".join(lines[table:]), file=out)
    for path, text in files.items():
        write_atomic(path, text)
    return 0 if result.ok else 1


def _cmd_check(args) -> int:
    net, model = _load(args, dagnn=True)
    return _check_one(net, model, args, sys.stdout)


def _cmd_diagnose(args) -> int:
    from harness.diagnosis.findings import diagnose
    from harness.mcn.dagnn import DagNet

    net, model = _load(args, dagnn=True)
    findings = diagnose(net, model, input_size=args.input_size if isinstance(net, DagNet) else None)
    text = json_dumps([f.to_dict() for f in findings]) if args.json else None
    for f in findings:
        print(safe_text(f))
    if text is not None:
        write_atomic(args.json, text)
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


def _cmd_port(args) -> int:
    from harness.mcn.dagnn import DagNet
    from harness.translate.port import write_dag_port, write_port

    net = load_mcn_spec(args.mcn, "--mcn", Path.cwd(), dagnn=True)
    mcn_path = None if args.mcn == "seed" else os.path.abspath(args.mcn)
    if isinstance(net, DagNet):
        result = write_dag_port(
            net, args.out, mcn_path=mcn_path, input_size=args.input_size, overwrite=args.overwrite
        )
    else:
        net = with_input_size(net, *resolve_input_size(net, None, args.input_size))
        result = write_port(net, args.out, mcn_path=mcn_path, overwrite=args.overwrite)
    for note in [*net.notes, *result.notes]:
        print(f"note: {safe_text(note)}")
    for path in result.written:
        print(f"wrote {safe_text(path)}")
    here = safe_text(args.out)
    print(
        f"check it:  mcn-harness check --mcn {safe_text(args.mcn)} --keras {here}/model.keras\n"
        f"guard it:  python -m pytest {here}/test_port.py"
    )
    return 0


def _cmd_train_parity(args) -> int:
    from harness.io.imdb import check_imdb_labels, digits_imdb, load_imdb
    from harness.mcn.dagnn import DagNet
    from harness.training.dag_parity import check_dag_imdb, dag_training_vars
    from harness.training.parity import check_plot_path, plot_parity, train_parity

    if args.plot:
        check_plot_path(args.plot)  # before hours of training, not after
    net, model = _load(args, dagnn=True)
    if args.optimizer == "model" and getattr(model, "optimizer", None) is None:
        raise InputError(
            f"--keras {args.keras!r}: the model is not compiled, and --optimizer model (the default) trains "
            "with its compiled optimizer: compile it, or pass --optimizer matconvnet (cnn_train's update)"
        )
    dag = isinstance(net, DagNet)
    if dag:
        dag_training_vars(net)  # one image input and a Loss layer, before reading the data
    try:
        imdb = digits_imdb() if args.data == "digits" else load_imdb(args.data)
    except McnError as err:  # about the --data file, not the --mcn one
        text = str(err).removeprefix(f"{args.data}: ")
        raise InputError(f"--data {args.data!r}: {text}") from None
    if dag:
        check_dag_imdb(net, model, imdb, f"--data {args.data!r}")
    elif imdb.images.shape[:3] != input_size(net):
        raise InputError(
            f"--data {args.data!r}: images are {imdb.images.shape[:3]} (H, W, C), the net takes "
            f"{input_size(net)} (inputSize)"
        )
    else:
        check_imdb_labels(imdb, num_classes(net), f"--data {args.data!r}")
    result = train_parity(
        net,
        model,
        imdb,
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        max_steps_per_epoch=args.max_steps,
        **_run_options(args),
    )
    print("\n".join(result.lines()))
    if args.json:
        write_atomic(args.json, result.to_json())
    if args.plot:
        plot_parity(result, args.plot)
        print(f"plot written to {safe_text(args.plot)}")
    last = result.steps[-1]
    finite = np.isfinite([last.max_weight_diff, last.loss_ref, last.loss_keras]).all()
    return 0 if finite and last.max_weight_diff <= 1e-3 * max(1.0, abs(last.loss_ref)) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mcn-harness",
        description="Find where a Keras port of a MatConvNet network diverges.",
        epilog="Exit status: 0 equivalent, 1 divergent, 2 could not run. Add --debug anywhere to see "
        "the traceback of an error.",
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
        p.add_argument(
            "--input-size",
            type=int,
            nargs=3,
            metavar=("H", "W", "C"),
            help="the input size for a net without meta.inputSize (default: the Keras model's, "
            "else inferred from the net)",
        )

    def probing(p):
        p.add_argument(
            "--images",
            help="probe with your data: an imdb .mat, a PNG/JPEG file or a directory of them "
            "(default: random images)",
        )
        p.add_argument("--upto", help="compare only up to this layer (name or 1-based index)")

    check = sub.add_parser("check", help="compare every layer's activations and gradients")
    common(check, True)
    probing(check)
    check.add_argument("--json", help="write the report as JSON (schema in harness/equivalence/report.py)")
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
    probing(ref)
    port = sub.add_parser(
        "port", help="write a faithful Keras port of the net: model.keras, model.py and a regression test"
    )
    port.add_argument("--mcn", default="seed", help="a .mat file holding a simplenn net, or 'seed' (default)")
    port.add_argument("--out", required=True, help="the directory to write into (created if missing)")
    port.add_argument(
        "--input-size",
        type=int,
        nargs=3,
        metavar=("H", "W", "C"),
        help="the input size for a net without meta.inputSize (default: inferred from the net)",
    )
    port.add_argument("--overwrite", action="store_true", help="replace files a previous port wrote")
    return parser


def _drop_cwd_from_path() -> None:
    """``python -m`` and ``python -c`` put the working directory first on sys.path: a
    keras.py or numpy.py lying next to the user's data would then be imported in place of
    the real package. Only ``--keras module:callable`` imports from there (appended last,
    by harness.inputs)."""
    here = os.path.realpath(os.getcwd())
    sys.path[:] = [p for p in sys.path if p and os.path.realpath(p) != here]


def _check_outputs(args) -> None:
    """Report files must not overwrite an input, nor each other."""
    inputs = {}
    for option in ("mcn", "keras", "data"):
        value = getattr(args, option, None)
        if value and os.path.exists(value):
            inputs[os.path.realpath(value)] = f"--{option}"
    seen = {}
    for option in ("json", "html", "plot"):
        value = getattr(args, option, None)
        if not value:
            continue
        real = os.path.realpath(value)
        if real in inputs:
            raise _Usage(f"--{option} {value!r} is the {inputs[real]} input: refusing to overwrite it")
        if real in seen:
            raise _Usage(f"--{option} {value!r} is also given to {seen[real]}")
        if os.path.isdir(real):
            raise _Usage(f"--{option} {value!r} is a directory")
        if not os.path.isdir(os.path.dirname(real)):
            raise _Usage(f"--{option} {value!r}: no such directory ({os.path.dirname(real)})")
        seen[real] = f"--{option}"


def _run(args) -> int:
    if getattr(args, "command", None) is None:
        return _cmd_seed_demo(args)
    if getattr(args, "batch", 1) < 1:
        raise _Usage(f"--batch {args.batch}: expected a positive number of images")
    if args.command == "train-parity":
        for option in ("epochs", "batch_size", "max_steps"):
            value = getattr(args, option)
            if value is not None and value < 1:
                raise _Usage(f"--{option.replace('_', '-')} {value}: expected a positive number")
    _check_outputs(args)
    commands = {
        "check": _cmd_check,
        "diagnose": _cmd_diagnose,
        "reference": run_reference,
        "train-parity": _cmd_train_parity,
        "port": _cmd_port,
    }
    return commands[args.command](args)


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 equivalent, 1 divergent (only from a completed comparison), 2 could
    not run (one line on stderr; ``--debug`` adds the traceback)."""
    from_console = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    if from_console:
        _drop_cwd_from_path()
        # The reference allocates fresh arrays per layer; reusing freed memory spares a page
        # fault per page on every pass (see harness.mcn.kernels.threads.keep_freed_memory).
        threads.keep_freed_memory()
        if not argv or argv[0] in ("check", "diagnose", "train-parity", "port"):
            _silence_native_stderr()
            import logging

            logging.getLogger("tensorflow").setLevel(logging.ERROR)  # retracing notices are not for users
    try:
        if not argv:
            args = parser.parse_args(["check"])
            args.json = args.html = None
            args.command = None
        else:
            args = parser.parse_args(argv)  # --help exits here, with status 0, as it should
            if args.command is None:
                raise _Usage(
                    "expected a command: check, diagnose, reference, train-parity or port "
                    "(or no arguments for the seed demo)"
                )
    except _Usage as err:
        return _fail(err, False)
    try:
        return _run(args)
    except KeyboardInterrupt:
        print("mcn-harness: interrupted", file=sys.stderr)
        return 130
    except SystemExit as err:  # only the user's code can get here (argument parsing is done)
        return _fail(f"the Keras model's code called sys.exit({err.code!r}); no verdict", debug)
    except _Usage as err:
        return _fail(err, debug)
    except McnError as err:
        return _fail(_naming_the_file(err, args), debug)
    except MemoryError:
        return _fail(
            "out of memory (lower --batch, or set MCN_HARNESS_MEMORY_BUDGET below the machine's memory)",
            debug,
        )
    except RecursionError:
        return _fail("input nested too deeply to process", debug)
    except OSError as err:
        return _fail(err, debug)
    except Exception as err:
        return _fail(
            f"internal error: {type(err).__name__}: {err} (no verdict; --debug shows the traceback)", debug
        )


def _naming_the_file(err: McnError, args) -> str:
    """An error about the net (its layers, its inputSize) names the --mcn file it came
    from, unless the message already names it or an option."""
    text = str(err)
    spec = getattr(args, "mcn", None)
    if not spec or spec == "seed" or spec in text or text.startswith("--"):
        return text
    return f"--mcn {spec!r}: {text}"


def _fail(err, debug: bool) -> int:
    """One line on stderr, exit 2; with --debug, the traceback first."""
    if debug:
        import traceback

        traceback.print_exc(file=sys.stderr)
    print(f"mcn-harness: error: {_one_line(err)}", file=sys.stderr)
    return 2


def _one_line(err) -> str:
    return safe_text(" ".join(str(err).split()))


if __name__ == "__main__":
    sys.exit(main())
