"""Wall time of one DC / DSA distillation iteration on Fashion-MNIST: classes vmapped versus a per-class loop.

    .venv/bin/python benchmarks/distill_step.py            # IPC 1 and 10, DC and DSA, vmap and loop
    .venv/bin/python benchmarks/distill_step.py --quick    # smoke run: IPC 1, ConvNet width 16, 16 real/class

Setting: Fashion-MNIST train split (60000 x 28 x 28 x 1, 10 classes) normalised with the references' fixed
statistics, held on the device as a `RealPool`; the ConvNet of the references (depth 3, width 128, instance
norm, PyTorch-default init); synthetic sets initialised from real images; the reference (outer, inner) loops
(IPC 1: 1 x 1, IPC 10: 10 x 50), batch_real 256, batch_train 256, DSA strategy
color_crop_cutout_flip_scale_rotate. One iteration = `gm.make_gm_iteration` (vmap over classes) or
`gm.per_class_loop_reference` (a Python loop over the classes unrolled in the same jitted function).

Each setting runs in its own process. "s / iteration" is the median of `--repeats` iterations after the first
(each on a fresh key, `block_until_ready`); "compile" is the first iteration's extra time over that median
(tracing + XLA compilation of the jitted pieces). "driver" is the loop driver `loop_driver="auto"` picked (the
Python driver on CPU: see `calibjax.distill.gm`). "peak RSS" is the process's maximum resident memory (data,
both iterations, compilation). Prints a markdown table with the load average, since the machine may be
shared. PyTorch reference on this kind of machine (from the task brief): DC 5.76 s (IPC 1), 158.9 s (IPC 10);
DSA 173.4 s (IPC 10).
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
import numpy as np

from calibjax import data as data_lib
from calibjax import models
from calibjax.distill import gm, matching
from calibjax.distill.synthetic import init_synthetic

PYTORCH_SECONDS = {("dc", 1): 5.76, ("dc", 10): 158.9, ("dsa", 10): 173.4}


def load_fashion_mnist() -> tuple[np.ndarray, np.ndarray, int]:
  train = data_lib.load("fashion_mnist", "train")
  images = data_lib.Normalize.for_dataset("fashion_mnist").apply(train.images).astype(np.float32)
  return images, np.asarray(train.labels), train.num_classes


def time_iteration(config: gm.GMConfig, *, width: int, repeats: int) -> dict:
  """Times one setting in this process: first call (compile + run), then the median of `repeats` calls."""
  images_np, labels, num_classes = load_fashion_mnist()
  pool = jax.device_put(matching.make_real_pool(images_np, labels, num_classes=num_classes,
                                                batch_real=config.batch_real))
  net = models.build("convnet", num_classes=num_classes, input_shape=images_np.shape[1:], width=width,
                     depth=3)
  make = gm.make_gm_iteration if config.class_map == "vmap" else gm.per_class_loop_reference
  iteration = make(net, config)
  synset = init_synthetic(jax.random.key(0), images_np, labels, ipc=config.ipc, num_classes=num_classes)
  images = synset.images
  opt_state = matching.image_optimizer(config).init(images)
  times = []
  for i in range(repeats + 1):
    start = time.perf_counter()
    images, opt_state, metrics = iteration(images, opt_state, jax.random.key(1 + i), pool)
    jax.block_until_ready((images, metrics))
    times.append(time.perf_counter() - start)
  if not np.isfinite(float(metrics["loss"])):
    raise RuntimeError(f"non-finite matching loss for {config}")
  steady = statistics.median(times[1:])
  return {"first_s": times[0], "compile_s": times[0] - steady, "step_s": steady,
          "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
          "driver": gm.resolve_loop_driver(config)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="smoke run: IPC 1, width 16, batch_real 16, 1 timed iteration, no DSA class loop")
  parser.add_argument("--ipcs", type=int, nargs="+", default=[1, 10])
  parser.add_argument("--methods", nargs="+", default=["dc", "dsa"], choices=gm.METHODS)
  parser.add_argument("--class-maps", nargs="+", default=["vmap", "loop"], choices=matching.CLASS_MAPS)
  parser.add_argument("--repeats", type=int, default=2, help="timed iterations per setting after the first")
  parser.add_argument("--single", help=argparse.SUPPRESS)  # "method,ipc,class_map,width,batch_real,repeats"
  args = parser.parse_args()
  if args.single:
    method, ipc, class_map, width, batch_real, repeats = args.single.split(",")
    config = gm.GMConfig(method=method, ipc=int(ipc), batch_real=int(batch_real), class_map=class_map)
    print(json.dumps(time_iteration(config, width=int(width), repeats=int(repeats))))
    return

  width, batch_real, ipcs, repeats = 128, 256, args.ipcs, args.repeats
  if args.quick:
    width, batch_real, ipcs, repeats = 16, 16, [1], 1
  print(f"jax {jax.__version__}, backend {jax.default_backend()} ({platform.machine()}), "
        f"{os.cpu_count()} CPUs; ConvNet-3 width {width}, batch_real {batch_real}; "
        f"median of {repeats} iteration(s) after the first")
  print(f"load average before: {', '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
  rows = []
  for method in args.methods:
    for ipc in ipcs:
      for class_map in args.class_maps:
        if args.quick and method == "dsa" and class_map == "loop":
          continue  # its compile (10 unrolled classes x 2 DSA switches) dominates a smoke run
        # One process per setting: a clean peak-memory figure, and no compiled state shared between rows.
        single = f"{method},{ipc},{class_map},{width},{batch_real},{repeats}"
        out = subprocess.run([sys.executable, __file__, "--single", single], check=True, capture_output=True,
                             text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        outer, inner = gm.outer_inner_loops(ipc)
        reference = None if args.quick else PYTORCH_SECONDS.get((method, ipc))
        rows.append(f"| {method.upper()} | {ipc} | {outer} x {inner} | {class_map} | {r['driver']} | "
                    f"{r['compile_s']:.1f} | {r['step_s']:.2f} | {r['peak_rss_gb']:.1f} | "
                    f"{'' if reference is None else f'{reference:.2f}'} |")
        print(rows[-1], flush=True)
  print("\n| method | IPC | outer x inner | classes | driver | compile (s) | s / iteration | peak RSS (GB) | "
        "PyTorch s / iteration |")
  print("|---|---|---|---|---|---|---|---|---|")
  print("\n".join(rows))
  print(f"\nload average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
  main()
