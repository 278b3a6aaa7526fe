"""Seed network forward+backward at batch 256, float32: the reference against TensorFlow.

Both run in this process on the same weights and batch; the baseline is TensorFlow/Keras
(a compiled tf.function with a GradientTape). Prints the best-of-N wall time of each and
the ratio reference / TensorFlow. Goal: ratio <= 1.5.

    python benchmarks/bench_reference.py [--batch 256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from harness.mcn import seed_net, vl_simplenn  # noqa: E402


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


def best_of(fn, repeats: int) -> float:
    fn()  # warm up (tracing, allocation)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

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

    t_ref = best_of(reference, args.repeats)
    t_tf = best_of(lambda: [g.numpy() for g in tf_step()], args.repeats)
    print(f"seed network forward+backward, batch {args.batch}, float32, best of {args.repeats}")
    print(f"  reference (NumPy): {t_ref * 1e3:8.1f} ms")
    print(f"  TensorFlow/Keras:  {t_tf * 1e3:8.1f} ms  (baseline)")
    print(f"  ratio reference/TensorFlow: {t_ref / t_tf:.2f}  (goal <= 1.5)")


if __name__ == "__main__":
    main()
