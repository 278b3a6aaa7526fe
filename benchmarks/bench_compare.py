"""Wall time of harness.compare on the seed network (batch 32, float64) against a bare
Keras forward+backward of the same model in the same process.

The baseline is what any check must do at least once: run the Keras model forward and
backward (a GradientTape over the model call, gradients for the input and every weight).
compare() also runs the NumPy reference, observes the model's real call (every
intermediate tensor and its derivative, under one tape), aligns by value and builds the
report. Goal: ratio < 3 (the cost of observing). A float32 model also pays for its float64
copy (cloned, checked against the original on the batch).

    python benchmarks/bench_compare.py [--batch 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import harness  # noqa: E402
from harness.mcn import seed_net  # noqa: E402


def best_of(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import tensorflow as tf

    from harness.translate import to_keras

    net = seed_net(seed=0)
    model = to_keras(net, dtype="float64")
    rng = np.random.RandomState(0)
    x = rng.randn(28, 28, 1, args.batch)
    labels = rng.randint(1, 3, size=(1, args.batch)).astype(float)
    xk = tf.constant(x.transpose(3, 0, 1, 2))
    yk = tf.constant(labels.ravel().astype(np.int32) - 1)

    def keras_step():
        with tf.GradientTape() as tape:
            tape.watch(xk)
            logits = tf.reshape(model(xk), (-1, 2))
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(yk, logits))
        return [g.numpy() for g in tape.gradient(loss, [xk, *model.trainable_variables])]

    def check():
        report = harness.compare(net, model, x, labels)
        assert report.ok
        return report

    model32 = to_keras(net)  # what users hold: float32, compared through its float64 copy

    def check_float32_model():
        report = harness.compare(net, model32, x, labels)
        assert report.ok, str(report)
        return report

    t_keras = best_of(keras_step, args.repeats)
    t_compare = best_of(check, args.repeats)
    t_compare32 = best_of(check_float32_model, args.repeats)
    print(f"seed network, batch {args.batch}, float64, best of {args.repeats}")
    print(f"  Keras forward+backward (eager): {t_keras * 1e3:8.1f} ms  (baseline)")
    print(f"  harness.compare(), float64 model:            {t_compare * 1e3:8.1f} ms")
    print(f"  harness.compare(), float32 model (copied):   {t_compare32 * 1e3:8.1f} ms")
    print(f"  ratio compare/Keras: {t_compare / t_keras:.2f}  (goal < 3)")
    print(f"  ratio compare/Keras with the float64 copy: {t_compare32 / t_keras:.2f}")


if __name__ == "__main__":
    main()
