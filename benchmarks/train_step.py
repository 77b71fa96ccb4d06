"""Wall time of one ConvNet-3 SGD step on Fashion-MNIST-shaped batches (the PyTorch reference's 0.618 s / 0.223 s
at batch 256 / 100 on a 2-core CPU is in docs/reference-quirks.md §9).

  python benchmarks/train_step.py [--repeats 10]

Prints a markdown table: compile time, median step time and calibjax / reference ratio per batch size.
"""

import argparse
import os
import time

import jax
import numpy as np
import optax

from calibjax import models, parallel
from calibjax.train import step as step_lib

REFERENCE_SECONDS = {256: 0.618, 100: 0.223}  # docs/reference-quirks.md §9, torch 2.14.1, 2 threads


def time_step(batch_size: int, repeats: int) -> tuple[float, float]:
  net = models.build("convnet", num_classes=10, input_shape=(28, 28, 1))
  tx = optax.sgd(0.01, momentum=0.9)
  loss = step_lib.label_loss(
      lambda logits, labels: optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean())
  mesh = parallel.make_mesh()
  state = parallel.replicate(step_lib.init_train_state(net, tx, jax.random.key(0)), mesh)
  step = step_lib.jit_train_step(step_lib.make_train_step(net, loss, tx), mesh)
  rng = np.random.default_rng(0)
  batch = parallel.shard_batch({"images": rng.random((batch_size, 28, 28, 1), np.float32),
                                "labels": rng.integers(0, 10, batch_size).astype(np.int32)}, mesh)
  start = time.perf_counter()
  state, metrics = step(state, jax.random.key(1), batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, metrics = step(state, jax.random.key(1), batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return compile_s, float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args()
  print(f"devices: {jax.devices()}; load average before: {os.getloadavg()[0]:.2f}\n")
  print("| batch | compile s | step s (median) | PyTorch reference s | calibjax / reference |")
  print("|---|---|---|---|---|")
  for batch_size in (256, 100):
    compile_s, step_s = time_step(batch_size, args.repeats)
    ref = REFERENCE_SECONDS[batch_size]
    print(f"| {batch_size} | {compile_s:.2f} | {step_s:.3f} | {ref} | {step_s / ref:.2f} |")


if __name__ == "__main__":
  main()
