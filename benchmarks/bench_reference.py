"""Seed network forward+backward at batch 256, float32: the reference against TensorFlow.

Both run in this process on the same weights and batch; the baseline is TensorFlow/Keras
(a compiled tf.function with a GradientTape). Runs alternate between the two, so that
both see the same machine load, and the best of N of each gives the ratio
reference / TensorFlow. Goal: ratio <= 1.5.

    python benchmarks/bench_reference.py [--batch 256] [--repeats 5]

The official figure is taken with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset in that
command alone (some sandboxes set them for old OpenBLAS builds, and they slow a current
one)::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_reference.py

The script prints those variables, the OpenBLAS libraries loaded with the kernel each
runs (through threadpoolctl when it is installed) and the load average, so that a figure
can be reproduced. Other processes on the machine distort both timings: run it when the
machine is quiet.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from harness.mcn import seed_net, vl_simplenn  # noqa: E402

_ENV_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")


def keras_seed(net):
    import keras

    layers = [keras.Input((28, 28, 1), dtype="float32")]
    for layer in net.layers:
        if layer.type == "conv":
            f, b = layer.weights
            groups = 512 // f.shape[2] if layer.name == "ip1" else 1
            conv = keras.layers.Conv2D(f.shape[3], f.shape[:2], groups=groups, name=layer.name)
            layers.append(conv)
        elif layer.type == "pool":
            p = int(np.asarray(layer.pool).ravel()[0])
            layers.append(keras.layers.MaxPooling2D(p, int(layer.stride), name=layer.name))
        elif layer.type == "relu":
            layers.append(keras.layers.ReLU(name=layer.name))
    model = keras.Sequential(layers)
    for layer in net.layers:
        if layer.type == "conv":
            model.get_layer(layer.name).set_weights([layer.weights[0], layer.weights[1].ravel()])
    return model


def _owner(path: str) -> str:
    """Which package bundles a BLAS library, and whether the reference's convolutions call it
    (harness.mcn.kernels.blas binds numpy's OpenBLAS when it can, else scipy's)."""
    from harness.mcn.kernels.blas import cblas

    parent = os.path.basename(os.path.dirname(path))
    owner = {"numpy.libs": "numpy's", "scipy.libs": "scipy's"}.get(parent, parent)
    bound = cblas().library
    if bound and os.path.realpath(bound) == os.path.realpath(path):
        owner += ", used by the reference's conv"
    return f"{owner}: {os.path.basename(path)}"


def _openblas_from_maps() -> list[str]:
    """Without threadpoolctl: ask each OpenBLAS mapped into this process for its kernel (Linux)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "openblas" in line.lower() and "/" in line})
    except OSError:
        return []
    lines = []
    for path in paths:
        lib = ctypes.CDLL(path)
        for prefix in ("scipy_", ""):
            for suffix in ("64_", ""):
                fn = getattr(lib, f"{prefix}openblas_get_corename{suffix}", None)
                if fn is not None:
                    fn.restype = ctypes.c_char_p
                    lines.append(f"kernel={fn().decode()}  ({_owner(path)})")
                    break
            else:
                continue
            break
    return lines


def blas_report() -> list[str]:
    """The environment variables that steer OpenBLAS and the BLAS kernels this process runs."""
    lines = ["  " + "  ".join(f"{v}={os.environ.get(v, '<unset>')}" for v in _ENV_VARS)]
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        found = _openblas_from_maps()
        lines += [f"  BLAS: {line}" for line in found]
        if not found:  # only the build configuration is known
            cfg = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
            lines.append(f"  BLAS (numpy build): {cfg.get('openblas configuration', cfg.get('name'))}")
        lines.append("  (pip install threadpoolctl for the versions and thread counts)")
        return lines
    for lib in threadpool_info():
        if lib.get("user_api") == "blas":
            lines.append(
                f"  BLAS: {lib['internal_api']} {lib.get('version')}  kernel={lib.get('architecture')}  "
                f"threads={lib['num_threads']}  ({_owner(lib['filepath'])})"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    load_start = os.getloadavg()[0]

    import tensorflow as tf

    net = seed_net(seed=0)
    rng = np.random.RandomState(0)
    x = rng.randn(28, 28, 1, args.batch).astype(np.float32)
    labels = rng.randint(1, 3, size=(1, args.batch)).astype(float)

    def reference():
        return vl_simplenn(net, x, 1.0, labels)

    model = keras_seed(net)
    xk = tf.constant(x.transpose(3, 0, 1, 2))
    yk = tf.constant(labels.ravel().astype(np.int32) - 1)

    @tf.function
    def tf_step():
        with tf.GradientTape() as tape:
            tape.watch(xk)
            logits = tf.reshape(model(xk), (-1, 2))
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(yk, logits))
        return tape.gradient(loss, [xk, *model.trainable_variables])

    def tensorflow():
        return [g.numpy() for g in tf_step()]

    runs: dict[str, list[float]] = {"reference": [], "tensorflow": []}
    reference(), tensorflow()  # warm up (tracing, allocation, BLAS threads)
    for _ in range(args.repeats):
        for name, fn in (("reference", reference), ("tensorflow", tensorflow)):
            t0 = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - t0)

    t_ref, t_tf = min(runs["reference"]), min(runs["tensorflow"])
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(f"seed network forward+backward, batch {args.batch}, float32, best of {args.repeats} (alternating)")
    print(f"  reference (NumPy):   {t_ref * 1e3:8.1f} ms  (median {med['reference'] * 1e3:.1f})")
    print(f"  TensorFlow/Keras:    {t_tf * 1e3:8.1f} ms  (median {med['tensorflow'] * 1e3:.1f}; baseline)")
    print(
        f"  ratio reference/TensorFlow: {t_ref / t_tf:.2f}  (goal <= 1.5; ratio of medians "
        f"{med['reference'] / med['tensorflow']:.2f})"
    )
    print("environment:")
    for line in blas_report():
        print(line)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"  cores: {cores}  load average (1 min) at start {load_start:.2f}, "
        f"at end {os.getloadavg()[0]:.2f} (includes this run)"
    )


if __name__ == "__main__":
    main()
