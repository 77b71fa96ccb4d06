"""Wall time and peak memory of one MTT iteration versus the number of unrolled student steps N.

    .venv/bin/python benchmarks/mtt_step.py                 # N = 10/20/40/80, memory none/remat/tesla
    .venv/bin/python benchmarks/mtt_step.py --quick         # smoke run: width 16, IPC 1, N = 2/4
    .venv/bin/python benchmarks/mtt_step.py --unroll rolled --repeats 0   # compile + XLA memory only
    .venv/bin/python benchmarks/mtt_step.py --ipc 1         # 10 images per student step

Setting: Fashion-MNIST (28 x 28 x 1, 10 classes) normalised with the references' fixed statistics; ConvNet-3
(width 128, instance norm, PyTorch-default init); IPC 10 (`--ipc`) initialised from real training images;
batch_syn = the whole set (100 images per student step at IPC 10, the reference default); DSA
color_crop_cutout_flip_scale_rotate (non-Siamese, align_corners=True); no MDT; expert_epochs 2, max_start_epoch 2. The expert trajectories are
synthetic (snapshot k = a fresh initialisation + k small random steps, 2 experts): an iteration's cost does
not depend on their values. One iteration = `calibjax.distill.mtt.make_iteration` (expert and start sampling,
the N-step unroll, its gradient, the image and lr updates), jitted with the carry donated.

Each setting runs in its own process. "compile" is `lower(...).compile()` of the iteration; "s / iteration" is
the median of `--repeats` iterations (each on a fresh key, `block_until_ready`; none with `--repeats 0`);
"XLA temp" is the compiled program's temporary-buffer size (`memory_analysis()`, the activations the gradient
keeps); "peak RSS" is the process's maximum resident memory (data, compilation and the iterations). "unroll"
is the scan unrolling (`--unroll`, default "auto": the rolled scan on every backend, whose memory the memory
modes bound; "full" unrolls it, compile time and memory growing with N; see `calibjax.distill.mtt`).
Prints a markdown table with the load average, since the machine may be shared. PyTorch reference on a
2-core CPU at IPC 10 (docs/reference-quirks.md §9): 8.7 / 18.2 / 34.1 s and 4.9 / 8.6 / 15.7 GB peak RSS at
N = 10 / 20 / 40.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from calibjax import data as data_lib
from calibjax import models
from calibjax.distill import matching, mtt
from calibjax.distill.synthetic import class_major_labels, init_synthetic

PYTORCH = {10: (8.7, 4.9), 20: (18.2, 8.6), 40: (34.1, 15.7)}  # N -> (s / iteration, peak RSS GB)


def fake_trajectories(net: models.Network, *, experts: int, snapshots: int) -> object:
  """Leaves (experts, snapshots, ...): each expert a fresh initialisation plus k small random steps."""
  trajectories = []
  for e in range(experts):
    params, _ = net.init(jax.random.key(e))
    rng = np.random.default_rng(e)
    step = jax.tree.map(lambda p: 1e-3 * rng.standard_normal(p.shape, np.float32), params)
    trajectories.append(jax.tree.map(lambda p, d: np.stack([np.asarray(p) + k * d for k in range(snapshots)]),
                                     params, step))
  return jax.tree.map(lambda *xs: np.stack(xs), *trajectories)


def time_iteration(*, syn_steps: int, memory: str, unroll: str, width: int, ipc: int, repeats: int) -> dict:
  """Times one setting in this process: compile, then the median of `repeats` iterations (if any)."""
  train = data_lib.load("fashion_mnist", "train")
  images = data_lib.Normalize.for_dataset("fashion_mnist").apply(train.images).astype(np.float32)
  net = models.build("convnet", num_classes=train.num_classes, input_shape=images.shape[1:], width=width,
                     depth=3)
  config = mtt.MTTConfig(ipc=ipc, lr_img=1000.0, syn_steps=syn_steps, expert_epochs=2, max_start_epoch=2,
                         memory=memory, unroll=unroll, dsa_params=matching.DSAParams(align_corners=True))
  trajectories = jax.device_put(fake_trajectories(net, experts=2, snapshots=config.snapshots))
  synset = init_synthetic(jax.random.key(0), images, train.labels, ipc=ipc, num_classes=train.num_classes)
  carry = {"synset": synset, "img_opt": matching.image_optimizer(config).init(synset.images),
           "lr_opt": mtt.lr_optimizer(config).init(synset.log_lr)}
  labels = jnp.asarray(class_major_labels(train.num_classes, ipc))
  step = jax.jit(mtt.make_iteration(net, config, labels), donate_argnums=(0,))
  start = time.perf_counter()
  compiled = step.lower(carry, jax.random.key(0), trajectories).compile()
  compile_s = time.perf_counter() - start
  analysis = compiled.memory_analysis()
  times = []
  for i in range(repeats):
    start = time.perf_counter()
    carry, metrics = compiled(carry, jax.random.key(1 + i), trajectories)
    jax.block_until_ready((carry, metrics))
    times.append(time.perf_counter() - start)
  if repeats and not np.isfinite(float(metrics["loss"])):
    raise RuntimeError(f"non-finite MTT loss for N={syn_steps}, memory={memory}")
  return {"compile_s": compile_s, "step_s": statistics.median(times) if times else None,
          "temp_gb": None if analysis is None else analysis.temp_size_in_bytes / 2 ** 30,
          "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
          "unroll": "full" if mtt.scan_unroll(config) is True else "rolled"}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="smoke run: width 16, IPC 1, N = 2 and 4, 1 iteration")
  parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 40, 80])
  parser.add_argument("--memory", nargs="+", default=list(mtt.MEMORY_MODES), choices=mtt.MEMORY_MODES)
  parser.add_argument("--unroll", default="auto", choices=mtt.UNROLLS)
  parser.add_argument("--ipc", type=int, default=10,
                      help="images per class (IPC 10: 100 images per student step; IPC 1: 10)")
  parser.add_argument("--repeats", type=int, default=2,
                      help="timed iterations per setting after compilation (0: compile and memory only)")
  parser.add_argument("--single", help=argparse.SUPPRESS)  # "syn_steps,memory,unroll,width,ipc,repeats"
  args = parser.parse_args()
  if args.single:
    syn_steps, memory, unroll, width, ipc, repeats = args.single.split(",")
    print(json.dumps(time_iteration(syn_steps=int(syn_steps), memory=memory, unroll=unroll, width=int(width),
                                    ipc=int(ipc), repeats=int(repeats))))
    return

  width, ipc, steps, repeats = 128, args.ipc, args.steps, args.repeats
  if args.quick:
    width, ipc, steps, repeats = 16, 1, [2, 4], min(repeats, 1)
  print(f"jax {jax.__version__}, backend {jax.default_backend()} ({platform.machine()}), "
        f"{os.cpu_count()} CPUs; ConvNet-3 width {width}, IPC {ipc}; median of {repeats} iteration(s) after "
        "compilation")
  print(f"load average before: {', '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
  rows = []
  for memory in args.memory:
    for n in steps:
      # One process per setting: a clean peak-memory figure, and no compiled state shared between rows.
      single = f"{n},{memory},{args.unroll},{width},{ipc},{repeats}"
      out = subprocess.run([sys.executable, __file__, "--single", single], check=True, capture_output=True,
                           text=True).stdout
      r = json.loads(out.strip().splitlines()[-1])
      ref_s, ref_gb = PYTORCH.get(n, (None, None)) if ipc == 10 and width == 128 else (None, None)
      temp = "" if r["temp_gb"] is None else f"{r['temp_gb']:.2f}"
      step_s = "" if r["step_s"] is None else f"{r['step_s']:.2f}"
      rows.append(f"| {n} | {memory} | {r['unroll']} | {r['compile_s']:.1f} | {step_s} | {temp} | "
                  f"{r['peak_rss_gb']:.2f} | {'' if ref_s is None else ref_s} | "
                  f"{'' if ref_gb is None else ref_gb} |")
      print(rows[-1], flush=True)
  print("\n| N | memory | unroll | compile (s) | s / iteration | XLA temp (GB) | peak RSS (GB) | "
        "PyTorch s / iteration | PyTorch peak RSS (GB) |")
  print("|---|---|---|---|---|---|---|---|---|")
  print("\n".join(rows))
  print(f"\nload average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
  main()
