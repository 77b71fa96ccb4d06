"""The pieces of one DC iteration, timed alone in calibjax and in the PyTorch reference of torch_reference.py:
one matching step over all classes (real gradients, synthetic gradients with their graph, the distance and its
gradient to the images), the real images' gradients alone, and one inner SGD step on the whole synthetic set.
An IPC 10 iteration is 10 matching steps and 9 x 50 inner steps; comparing the sum of the pieces with
benchmarks/speed.py's iteration time shows what the loop around them costs.

  python benchmarks/gm_parts.py --ipc 10          # one process per framework, a markdown table

Fashion-MNIST, ConvNet-3 width 128, 256 real images per class, DC (no augmentation), median of 3 (matching) and
5 (inner step) calls after one warm-up call. Needs torch (`pip install -e '.[bench]'`) and `make data`.
"""

import argparse
import functools
import json
import os
import subprocess
import sys
import time

import numpy as np

BATCH_REAL = 256


def _median_seconds(call, repeats: int) -> float:
  call()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def calibjax_parts(ipc: int) -> dict:
  import jax
  import jax.numpy as jnp

  import distill_step
  from calibjax import models
  from calibjax.distill import gm, matching
  from calibjax.distill.synthetic import init_synthetic

  config = gm.GMConfig(method="dc", ipc=ipc, batch_real=BATCH_REAL)
  images_np, labels, num_classes = distill_step.load_fashion_mnist()
  pool = jax.device_put(matching.make_real_pool(images_np, labels, num_classes=num_classes,
                                                batch_real=BATCH_REAL))
  net = models.build("convnet", num_classes=num_classes, input_shape=images_np.shape[1:], width=128, depth=3)
  images = init_synthetic(jax.random.key(0), images_np, labels, ipc=ipc, num_classes=num_classes).images
  tx = matching.image_optimizer(config)
  opt_state = tx.init(images)
  params = net.init(jax.random.key(1))[0]
  state = matching.require_stateless(net)
  real_grad = jax.grad(lambda p, x, y: gm._cross_entropy(net, state, p, x, y))

  @jax.jit  # the parameters are an argument, as in the iteration (not constants XLA could fold)
  def matching_step(images, opt_state, params, key):
    batch = matching.sample_real(key, pool, BATCH_REAL)
    return matching.image_step(lambda x: gm.matching_loss(net, config, x, params, batch, key), tx, images,
                               opt_state)

  @jax.jit
  def real_gradients(params, key):
    batch = matching.sample_real(key, pool, BATCH_REAL)
    return jax.lax.map(lambda args: real_grad(params, args[0], jnp.full(BATCH_REAL, args[1])),
                       (batch, jnp.arange(num_classes)))

  inner_step = jax.jit(functools.partial(gm._inner_sgd, net, config))
  every = jnp.arange(images.shape[0])
  run = lambda f: (lambda: jax.block_until_ready(f()))
  return {"matching step": _median_seconds(
              run(lambda: matching_step(images, opt_state, params, jax.random.key(2))), 3),
          "real gradients": _median_seconds(run(lambda: real_gradients(params, jax.random.key(2))), 3),
          "inner step": _median_seconds(run(lambda: inner_step(params, images, every, jax.random.key(3), 0.0)), 5)}


def pytorch_parts(ipc: int) -> dict:
  import torch
  from torch import nn

  import torch_reference as reference
  torch.set_num_threads(os.cpu_count())
  by_class = reference.fashion_mnist_by_class(
      os.environ.get("CALIBJAX_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
  generator = torch.Generator().manual_seed(0)
  syn = torch.cat([c[torch.randperm(len(c), generator=generator)[:ipc]] for c in by_class]).requires_grad_(True)
  syn_labels = torch.arange(len(by_class)).repeat_interleave(ipc)
  net = reference.convnet(1)
  params = list(net.parameters())

  def real_gradient(c, images):
    real = images[torch.randint(len(images), (BATCH_REAL,), generator=generator)]
    return torch.autograd.grad(nn.functional.cross_entropy(net(real), torch.full((BATCH_REAL,), c)), params)

  def matching_step():
    reference.matching_loss(net, by_class, syn, syn_labels, ipc=ipc, batch_real=BATCH_REAL, augment=False,
                            generator=generator).backward()

  optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
  train_images = syn.detach().clone()

  def inner_step():
    optimizer.zero_grad()
    nn.functional.cross_entropy(net(train_images), syn_labels).backward()
    optimizer.step()

  return {"matching step": _median_seconds(matching_step, 3),
          "real gradients": _median_seconds(lambda: [real_gradient(c, x) for c, x in enumerate(by_class)], 3),
          "inner step": _median_seconds(inner_step, 5)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ipc", type=int, default=10)
  parser.add_argument("--framework", choices=["jax", "torch"], help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.framework:
    parts = calibjax_parts if args.framework == "jax" else pytorch_parts
    print(json.dumps(parts(args.ipc)))
    return
  results = {}
  for framework in ("jax", "torch"):
    out = subprocess.run([sys.executable, __file__, "--ipc", str(args.ipc), "--framework", framework],
                         check=True, capture_output=True, text=True).stdout
    results[framework] = json.loads(out.strip().splitlines()[-1])
  print(f"`python benchmarks/gm_parts.py --ipc {args.ipc}`; load average after: "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}\n")
  print(f"| DC piece, IPC {args.ipc} | calibjax s | PyTorch s | calibjax / PyTorch |\n|---|---|---|---|")
  for piece in results["jax"]:
    ours, theirs = results["jax"][piece], results["torch"][piece]
    print(f"| {piece} | {ours:.3f} | {theirs:.3f} | {ours / theirs:.2f} |")


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  main()
