"""The ``mcn-harness`` command line.

``mcn-harness`` with no arguments runs the bundled seed network through the MatConvNet
reference (forward and backward) and prints a per-layer table. ``mcn-harness reference
--mcn PATH`` does the same for a user's .mat net. Exit codes: 0 success, 2 bad usage or
bad input (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from .mcn import McnError, load_net, seed_net, vl_simplenn, vl_simplenn_tidy
from .mcn.net import Net


def _input_size(net: Net) -> tuple[int, int, int]:
    size = net.meta.get("inputSize")
    if size is None:
        raise McnError("Expected net.meta.inputSize ([H W C]) to build a probe batch; the net has none.")
    h, w, c = (int(v) for v in np.asarray(size, dtype=float).ravel()[:3])
    return h, w, c


def _reference(args: argparse.Namespace) -> int:
    net = seed_net(seed=args.seed) if args.mcn == "seed" else vl_simplenn_tidy(load_net(args.mcn))
    dtype = np.float64 if args.dtype == "float64" else np.float32
    h, w, c = _input_size(net)
    rng = np.random.RandomState(args.seed)
    x = rng.randn(h, w, c, args.batch).astype(dtype)
    last = net.layers[-1]
    labels = None
    if last.type in ("softmaxloss", "loss"):
        n_classes = int(np.asarray(net.layers[-2].weights[0]).shape[3]) if net.layers[-2].weights else 2
        labels = rng.randint(1, n_classes + 1, size=(1, args.batch)).astype(float)
    res = vl_simplenn(
        net, x, 1.0, labels, mode=args.mode, dialect=args.dialect, rng=np.random.default_rng(args.seed)
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
        print(
            f"{i + 1:>3}  {layer.name:<12.12} {layer.type:<12} {shape:<20} {float(np.max(np.abs(y))):>10.3g} "
            f"{float(np.max(np.abs(dx))):>10.3g}"
        )
    print(f"loss: {float(np.asarray(res[-1].x).ravel()[0]):.6g}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcn-harness", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    ref = sub.add_parser("reference", help="run a net through the MatConvNet reference, forward and backward")
    ref.add_argument("--mcn", default="seed", help="a .mat file holding a simplenn net, or 'seed' (default)")
    ref.add_argument("--batch", type=int, default=4)
    ref.add_argument("--dtype", choices=("float64", "float32"), default="float32")
    ref.add_argument("--mode", choices=("normal", "test"), default="normal")
    ref.add_argument("--dialect", choices=("master", "beta25"), default="master")
    ref.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["reference", *(argv or [])])
    try:
        if args.batch < 1:
            raise McnError(f"Expected --batch >= 1. Received --batch={args.batch}")
        return _reference(args)
    except McnError as err:
        print(f"mcn-harness: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
