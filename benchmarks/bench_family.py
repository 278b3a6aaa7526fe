"""The reference against TensorFlow on the shapes of real nets: forward+backward, float32.

Cases (each a simplenn net run by ``vl_simplenn`` and the same net in stock Keras layers,
on the same weights and batch, in this process):

    seed     the seed network, 28x28x1, batch 256
    dncnn    17 convolutions 3x3 over 64 channels, pad 1, ReLUs; 64x64x1, batch 8
    vgg      3x3 convolutions in three pooled stages, a fully connected head; 64x64x3, batch 16
    alexnet  11x11 stride 4, LRN, filter groups, pooling, fully connected head; 127x127x3, batch 16
    resnet   a DagNN: a stem and five residual blocks (conv-BatchNorm-ReLU-conv-BatchNorm, Sum
             with the block's input or a strided 1x1 projection, ReLU) over 32 and 64
             channels, global average pooling, a classifier and softmaxlog; 32x32x3, batch 16;
             the reference is DagNet.eval, TensorFlow the same graph in stock layers with
             BatchNormalization(training=True) (batch moments, as mode "normal")

Runs alternate between the two sides (the baseline is a compiled tf.function with a
GradientTape); the ratio is the median reference time over the median TensorFlow time
(goal <= 1.5 on every case). Peak memory: the reference's peak of NumPy allocations during
one pass (tracemalloc), TensorFlow's peak CPU allocator use during one pass.

    python benchmarks/bench_family.py [--cases seed,dncnn,vgg,alexnet] [--repeats 5]

As for bench_reference.py, the official figures are taken with OPENBLAS_CORETYPE and
OPENBLAS_L2_SIZE unset in that command, on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import tracemalloc

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_reference import blas_report  # noqa: E402

from harness.mcn import Layer, Net, seed_net, vl_simplenn, vl_simplenn_tidy  # noqa: E402
from harness.mcn.dagnn import DagLayer, DagNet, Param  # noqa: E402
from harness.mcn.kernels import threads  # noqa: E402


def _conv(rng, name, h, w, c, k, **kw):
    f = (rng.standard_normal((h, w, c, k)) * np.sqrt(2.0 / (h * w * c))).astype(np.float32)
    return Layer("conv", name, [f, np.zeros((1, k), np.float32)], **kw)


def dncnn() -> tuple[Net, tuple, int]:
    rng = np.random.default_rng(0)
    layers = [_conv(rng, "conv1", 3, 3, 1, 64, pad=1), Layer("relu", "relu1")]
    for i in range(2, 17):
        layers += [_conv(rng, f"conv{i}", 3, 3, 64, 64, pad=1), Layer("relu", f"relu{i}")]
    layers.append(_conv(rng, "conv17", 3, 3, 64, 1, pad=1))
    return Net(layers, {"inputSize": [64, 64, 1]}), (64, 64, 1), 8


def vgg() -> tuple[Net, tuple, int]:
    rng = np.random.default_rng(1)
    layers, c = [], 3
    for stage, k in enumerate((64, 128, 256), start=1):
        for j in (1, 2):
            layers += [_conv(rng, f"conv{stage}_{j}", 3, 3, c, k, pad=1), Layer("relu", f"relu{stage}_{j}")]
            c = k
        layers.append(Layer("pool", f"pool{stage}", method="max", pool=2, stride=2))
    layers += [_conv(rng, "fc6", 8, 8, 256, 512), Layer("relu", "relu6"), _conv(rng, "fc7", 1, 1, 512, 10)]
    layers.append(Layer("softmaxloss", "loss"))
    return Net(layers, {"inputSize": [64, 64, 3]}), (64, 64, 3), 16


def alexnet() -> tuple[Net, tuple, int]:
    rng = np.random.default_rng(2)
    lrn = {"param": [5, 1, 1e-4, 0.75]}
    layers = [
        _conv(rng, "conv1", 11, 11, 3, 96, stride=4),
        Layer("relu", "relu1"),
        Layer("lrn", "norm1", **lrn),
        Layer("pool", "pool1", method="max", pool=3, stride=2),
        _conv(rng, "conv2", 5, 5, 48, 256, pad=2),
        Layer("relu", "relu2"),
        Layer("lrn", "norm2", **lrn),
        Layer("pool", "pool2", method="max", pool=3, stride=2),
        _conv(rng, "conv3", 3, 3, 256, 384, pad=1),
        Layer("relu", "relu3"),
        _conv(rng, "conv4", 3, 3, 192, 384, pad=1),
        Layer("relu", "relu4"),
        _conv(rng, "conv5", 3, 3, 192, 256, pad=1),
        Layer("relu", "relu5"),
        Layer("pool", "pool5", method="max", pool=3, stride=2),
        _conv(rng, "fc6", 2, 2, 256, 1024),
        Layer("relu", "relu6"),
        _conv(rng, "fc7", 1, 1, 1024, 10),
        Layer("softmaxloss", "loss"),
    ]
    return Net(layers, {"inputSize": [127, 127, 3]}), (127, 127, 3), 16


def seed() -> tuple[Net, tuple, int]:
    net = seed_net(seed=0)
    for layer in net.layers:
        layer.weights = [np.asarray(w, np.float32) for w in layer.weights]
    return net, (28, 28, 1), 256


def resnet() -> tuple[DagNet, tuple, int]:
    rng = np.random.default_rng(3)
    layers, params = [], []

    def conv(name, src, h, c, k, *, stride=1, pad=None):
        f = (rng.standard_normal((h, h, c, k)) * np.sqrt(2.0 / (h * h * c))).astype(np.float32)
        params.extend([Param(f"{name}f", f), Param(f"{name}b", np.zeros((k, 1), np.float32))])
        block = {"pad": h // 2 if pad is None else pad, "stride": stride}
        layers.append(DagLayer(name, "dagnn.Conv", [src], [name], [f"{name}f", f"{name}b"], block))
        return name

    def bnorm(name, src, k):
        g, b = np.ones((k, 1), np.float32), np.zeros((k, 1), np.float32)
        m = np.stack([np.zeros(k), np.ones(k)], axis=1).astype(np.float32)
        params.extend([Param(f"{name}g", g), Param(f"{name}b", b), Param(f"{name}m", m)])
        layers.append(DagLayer(name, "dagnn.BatchNorm", [src], [name], [f"{name}g", f"{name}b", f"{name}m"]))
        return name

    def relu(name, src):
        layers.append(DagLayer(name, "dagnn.ReLU", [src], [name], []))
        return name

    x = relu("stem_relu", bnorm("stem_bn", conv("stem", "input", 3, 3, 32), 32))
    c = 32
    for i, (k, stride) in enumerate([(32, 1), (32, 1), (64, 2), (64, 1), (64, 1)], start=1):
        a = relu(f"b{i}_relu1", bnorm(f"b{i}_bn1", conv(f"b{i}_conv1", x, 3, c, k, stride=stride), k))
        a = bnorm(f"b{i}_bn2", conv(f"b{i}_conv2", a, 3, k, k), k)
        skip = x if (k, stride) == (c, 1) else conv(f"b{i}_proj", x, 1, c, k, stride=stride)
        layers.append(DagLayer(f"b{i}_sum", "dagnn.Sum", [a, skip], [f"b{i}_sum"], []))
        x, c = relu(f"b{i}_relu2", f"b{i}_sum"), k
    layers.append(DagLayer("pool", "dagnn.Pooling", [x], ["pool"], [], {"method": "avg", "pool_size": 16}))
    conv("prediction", "pool", 1, c, 10)
    layers.append(
        DagLayer("loss", "dagnn.Loss", ["prediction", "label"], ["objective"], [], {"loss": "softmaxlog"})
    )
    return DagNet(layers, params=params), (32, 32, 3), 16


CASES = {"seed": seed, "dncnn": dncnn, "vgg": vgg, "alexnet": alexnet, "resnet": resnet}


def keras_dag_model(net: DagNet, hwc: tuple):
    """The DagNN net in stock Keras layers (float32): ZeroPadding2D + Conv2D,
    BatchNormalization (epsilon 1e-5), ReLU, Add, AveragePooling2D; the scores."""
    import keras

    tensors = {"input": keras.Input(hwc, dtype="float32")}
    for layer in net.layers:
        src = [tensors.get(name) for name in layer.inputs]
        if layer.type == "dagnn.Conv":
            f = np.asarray(net.param(layer.params[0]).value)
            f = f.reshape(f.shape + (1,) * (4 - f.ndim))
            pad, stride = (int(np.ravel(layer.block.get(key, 0))[0]) for key in ("pad", "stride"))
            y = keras.layers.ZeroPadding2D(pad)(src[0]) if pad else src[0]
            conv = keras.layers.Conv2D(f.shape[3], f.shape[:2], strides=stride)
            y = conv(y)
            conv.set_weights([f, np.asarray(net.param(layer.params[1]).value).ravel()])
        elif layer.type == "dagnn.BatchNorm":
            bn = keras.layers.BatchNormalization(epsilon=1e-5)
            y = bn(src[0], training=True)
        elif layer.type == "dagnn.ReLU":
            y = keras.layers.ReLU()(src[0])
        elif layer.type == "dagnn.Sum":
            y = keras.layers.Add()(src)
        elif layer.type == "dagnn.Pooling":
            p = int(np.ravel(layer.block["pool_size"])[0])
            y = keras.layers.AveragePooling2D(p, p)(src[0])
        else:
            continue  # the loss: computed on the scores by the baseline
        tensors[layer.outputs[0]] = y
    return keras.Model(tensors["input"], tensors["prediction"])


def keras_model(net: Net, hwc: tuple):
    """The net in stock Keras layers (float32): ZeroPadding2D + Conv2D (groups), ReLU,
    MaxPooling2D, and TensorFlow's LRN in a Lambda; the scores, without the loss."""
    import keras
    import tensorflow as tf

    x = inputs = keras.Input(hwc, dtype="float32")
    channels = hwc[2]
    for layer in net.layers:
        if layer.type == "conv":
            f = np.asarray(layer.weights[0])
            f = f.reshape(f.shape + (1,) * (4 - f.ndim))
            pad = int(np.asarray(layer.pad).ravel()[0])
            if pad:
                x = keras.layers.ZeroPadding2D(pad)(x)
            stride = int(np.asarray(layer.stride).ravel()[0])
            conv = keras.layers.Conv2D(f.shape[3], f.shape[:2], strides=stride, groups=channels // f.shape[2])
            x = conv(x)
            conv.set_weights([f, np.asarray(layer.weights[1]).ravel()])
            channels = f.shape[3]
        elif layer.type == "relu":
            x = keras.layers.ReLU()(x)
        elif layer.type == "pool":
            p, s = int(np.asarray(layer.pool).ravel()[0]), int(np.asarray(layer.stride).ravel()[0])
            x = keras.layers.MaxPooling2D(p, s)(x)
        elif layer.type == "lrn":
            n, kappa, alpha, beta = (float(v) for v in np.asarray(layer.param).ravel())
            x = keras.layers.Lambda(
                lambda t, n=n, kappa=kappa, alpha=alpha, beta=beta: tf.nn.local_response_normalization(
                    t, depth_radius=int((n - 1) // 2), bias=kappa, alpha=alpha, beta=beta
                )
            )(x)
    return keras.Model(inputs, x)


def run_case(name: str, repeats: int) -> dict:
    import tensorflow as tf

    net, hwc, batch = CASES[name]()
    dag = isinstance(net, DagNet)
    net = net if dag else vl_simplenn_tidy(net)
    rng = np.random.RandomState(0)
    x = rng.randn(*hwc, batch).astype(np.float32)
    has_loss = dag or net.layers[-1].type == "softmaxloss"
    model = keras_dag_model(net, hwc) if dag else keras_model(net, hwc)
    classes = model.output_shape[-1]
    labels = rng.randint(1, classes + 1, size=(1, batch)).astype(float) if has_loss else None
    out_shape = tuple(model.output_shape[1:])
    dzdy = 1.0 if has_loss else np.ones((*out_shape, batch), np.float32)

    def reference():
        if dag:
            net.eval({"input": x, "label": labels}, {"objective": 1.0})
            return net.params[0].der
        return vl_simplenn(net, x, dzdy, labels)

    xk = tf.constant(x.transpose(3, 0, 1, 2))
    yk = None if labels is None else tf.constant(labels.ravel().astype(np.int32) - 1)

    @tf.function
    def tf_step():
        with tf.GradientTape() as tape:
            tape.watch(xk)
            out = model(xk)
            if yk is not None:
                logits = tf.reshape(out, (-1, classes))
                loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(yk, logits))
            else:
                loss = tf.reduce_sum(out)
        return tape.gradient(loss, [xk, *model.trainable_variables])

    def tensorflow():
        return [g.numpy() for g in tf_step()]

    reference(), tensorflow()  # warm up (tracing, allocation, BLAS threads)
    tracemalloc.start()
    reference()
    ref_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    tf.config.experimental.reset_memory_stats("CPU:0")
    tensorflow()
    tf_peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
    runs: dict[str, list[float]] = {"reference": [], "tensorflow": []}
    for _ in range(repeats):
        for side, fn in (("reference", reference), ("tensorflow", tensorflow)):
            t0 = time.perf_counter()
            fn()
            runs[side].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "case": name,
        "batch": batch,
        "hwc": hwc,
        "reference_s": med["reference"],
        "tensorflow_s": med["tensorflow"],
        "ratio": med["reference"] / med["tensorflow"],
        "best_ratio": min(runs["reference"]) / min(runs["tensorflow"]),
        "reference_peak_mb": ref_peak / 2**20,
        "tensorflow_peak_mb": tf_peak / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    load_start = os.getloadavg()[0]
    kept = threads.keep_freed_memory()  # as the mcn-harness command does
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; expected some of {list(CASES)}")
    print(f"forward+backward, float32, median of {args.repeats} alternating runs (goal: ratio <= 1.5)")
    print(
        f"{'case':<8} {'input':<14} {'batch':>5} {'reference':>11} {'TensorFlow':>11} {'ratio':>6} "
        f"{'(best)':>7} {'ref peak':>10} {'TF peak':>10}"
    )
    for name in names:
        r = run_case(name, args.repeats)
        hwc = "x".join(str(d) for d in r["hwc"])
        times = f"{r['reference_s'] * 1e3:>9.0f}ms {r['tensorflow_s'] * 1e3:>9.0f}ms"
        peaks = f"{r['reference_peak_mb']:>8.0f}MB {r['tensorflow_peak_mb']:>8.0f}MB"
        print(
            f"{name:<8} {hwc:<14} {r['batch']:>5} {times} {r['ratio']:>6.2f} {r['best_ratio']:>7.2f} {peaks}",
            flush=True,
        )
    print("environment:")
    for line in blas_report():
        print(line)
    print(f"  malloc keeps freed memory (as mcn-harness does): {kept}")
    print(f"  compiled loops (BatchNorm, ReLU, average pooling, im2col, tap products): {compiled_loops()}")
    print(f"  load average (1 min) at start {load_start:.2f}, at end {os.getloadavg()[0]:.2f}")


def compiled_loops() -> str:
    """Whether the reference runs its compiled loops (harness.mcn.kernels.jit), and numba's version."""
    from harness.mcn.kernels import jit

    if not jit.available():
        return "off (numpy forms: numba missing or MCN_HARNESS_NO_JIT=1)"
    import numba

    return f"on (numba {numba.__version__})"


if __name__ == "__main__":
    main()
