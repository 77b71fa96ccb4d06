"""calibjax side by side with an equivalent PyTorch implementation (benchmarks/torch_reference.py), same shapes,
same process sequence, on this machine's accelerator if jax and torch both see one, else on the CPU.

  pip install -e '.[bench]'                  # torch, for the PyTorch side
  python benchmarks/speed.py                 # every section, markdown table on stdout
  python benchmarks/speed.py --sections step --repeats 5 --out speed.md

Sections:
  ceiling  fp32 matrix product 2048^3 in jax and in torch, GFLOP/s: the machine's practical ceiling.
  step     one ConvNet-3 SGD step (width 128, instance norm, lr 0.01, momentum 0.9, cross-entropy) at batch 256
           and 100 on 28x28x1 (Fashion-MNIST) and 32x32x3 (CIFAR) inputs; `--large` adds batch 1024 and 2048.
  gm       one DC and one DSA distillation iteration on Fashion-MNIST at the reference settings (a fresh
           ConvNet-3, 256 real images per class, the reference outer x inner loops: IPC 1 1 x 1, IPC 10 10 x 50),
           classes mapped as calibjax does by default (one at a time on the CPU, all vmapped on accelerators:
           `matching.default_class_chunk`); `--gm-ipcs` (default 1 10), median of `--gm-repeats`
           iterations after the first. Needs the Fashion-MNIST IDX files (`make data`).
  mtt      one MTT iteration on Fashion-MNIST at IPC 10 (`--mtt-ipcs`), N = 20 student steps (`--mtt-steps`)
           on the whole synthetic set with DSA, as calibjax runs it (the rolled scan, memory mode "none" or those
           of `--mtt-memory`; benchmarks/mtt_step.py) and as the reference runs it (flat parameters,
           create_graph); "first" is calibjax's compilation, PyTorch's first iteration. Needs Fashion-MNIST too.

Every measurement runs in its own process (so that peak memory is that setting's): the median of `--repeats`
steps after two warm-up steps; "first" is the first step (compilation for calibjax). GFLOP/s counts the
convolutions' and the head's multiply-adds of the forward and backward pass (the first conv's input gradient
excluded), not the elementwise work. Peak memory is the process's maximum resident set on the CPU, the device's
peak allocation on a GPU. The load average is printed before and after: timings on a shared machine vary.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

SECTIONS = ("ceiling", "step", "gm", "mtt")
FMNIST, CIFAR = (28, 28, 1), (32, 32, 3)


def convnet_step_gflop(batch_size: int, image_shape: tuple[int, int, int], *, width: int = 128,
                       depth: int = 3, num_classes: int = 10) -> float:
  """Multiply-add FLOPs (x2) of one ConvNet step: forward, input gradients (not of the first conv) and kernel
  gradients of every conv, and the head's three products."""
  height, _, channels = image_shape
  size = 32 if channels == 1 and height == 28 else height  # the first conv pads 28 px to 32
  flops, in_channels = 0.0, channels
  for layer in range(depth):
    forward = 2.0 * batch_size * size * size * 9 * in_channels * width
    flops += forward * (2 if layer == 0 else 3)
    size //= 2
    in_channels = width
  flops += 3 * 2.0 * batch_size * width * size * size * num_classes
  return flops / 1e9


def _peak_memory_gb(framework: str) -> float:
  if framework == "torch":
    import torch
    if torch.cuda.is_available():
      return torch.cuda.max_memory_allocated() / 2 ** 30
  else:
    import jax
    stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
      return stats["peak_bytes_in_use"] / 2 ** 30
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def _jax_train_step(*, batch_size: int, image_shape: tuple[int, int, int], repeats: int) -> dict:
  import jax
  import numpy as np
  import optax

  from calibjax import models, parallel
  from calibjax.train import step as step_lib

  net = models.build("convnet", num_classes=10, input_shape=image_shape)
  tx = optax.sgd(0.01, momentum=0.9)
  loss = step_lib.label_loss(
      lambda logits, labels: optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean())
  mesh = parallel.make_mesh()
  state = parallel.replicate(step_lib.init_train_state(net, tx, jax.random.key(0)), mesh)
  step = step_lib.jit_train_step(step_lib.make_train_step(net, loss, tx), mesh)
  generator = np.random.default_rng(0)
  batch = parallel.shard_batch({"images": generator.random((batch_size, *image_shape), np.float32),
                                "labels": generator.integers(0, 10, batch_size).astype(np.int32)}, mesh)
  start = time.perf_counter()
  state, metrics = step(state, jax.random.key(1), batch)
  jax.block_until_ready(metrics)
  first = time.perf_counter() - start
  state, metrics = step(state, jax.random.key(1), batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state, metrics = step(state, jax.random.key(1), batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return {"first_s": first, "step_s": float(np.median(times))}


def _jax_matmul_gflops(size: int = 2048, repeats: int = 10) -> float:
  import jax
  a = jax.random.normal(jax.random.key(0), (size, size))
  product = jax.jit(lambda a: a @ a)
  product(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    product(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size ** 3 / best / 1e9


def _jax_gm_iteration(*, method: str, ipc: int, repeats: int) -> dict:
  import distill_step
  from calibjax.distill import gm
  config = gm.GMConfig(method=method, ipc=ipc, batch_real=256, class_map="vmap")
  return distill_step.time_iteration(config, width=128, repeats=repeats)


def _jax_mtt_iteration(*, ipc: int, syn_steps: int, repeats: int, memory: str = "none") -> dict:
  import mtt_step
  result = mtt_step.time_iteration(syn_steps=syn_steps, memory=memory, unroll="auto", width=128, ipc=ipc,
                                   repeats=repeats)
  return {"first_s": result["compile_s"], "step_s": result["step_s"]}


def child(spec: dict) -> dict:
  """One measurement in this process (spec: framework, section and its parameters)."""
  framework, section = spec["framework"], spec["section"]
  if framework == "torch":
    import torch
    import torch_reference as impl
    torch.set_num_threads(os.cpu_count())
    device = str(impl.device())
  else:
    import jax
    device = jax.devices()[0].device_kind
  if section == "ceiling":
    result = {"gflops": impl.matmul_gflops() if framework == "torch" else _jax_matmul_gflops()}
  elif section == "gm":
    settings = dict(method=spec["method"], ipc=spec["ipc"], repeats=spec["repeats"])
    result = (impl.time_gm_iteration(**settings, data_dir=_fashion_mnist_dir()) if framework == "torch"
              else _jax_gm_iteration(**settings))
  elif section == "mtt":
    settings = dict(ipc=spec["ipc"], syn_steps=spec["syn_steps"], repeats=spec["repeats"])
    result = (impl.time_mtt_iteration(**settings, data_dir=_fashion_mnist_dir()) if framework == "torch"
              else _jax_mtt_iteration(**settings, memory=spec["memory"]))
  else:
    time_step = impl.time_train_step if framework == "torch" else _jax_train_step
    result = time_step(batch_size=spec["batch_size"], image_shape=tuple(spec["image_shape"]),
                       repeats=spec["repeats"])
  return {**result, "peak_gb": _peak_memory_gb(framework), "device": device}


def _fashion_mnist_dir() -> str:
  return os.environ.get("CALIBJAX_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")


def run_child(spec: dict) -> dict:
  completed = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                             text=True, check=False)
  lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
  if completed.returncode != 0 or not lines:
    raise RuntimeError(f"{spec} failed:\n{completed.stderr[-3000:]}")
  return json.loads(lines[-1])


def step_settings(large: bool) -> list[tuple[int, tuple[int, int, int]]]:
  batches = (256, 100) + ((1024, 2048) if large else ())
  return [(batch, shape) for shape in (FMNIST, CIFAR) for batch in batches]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--large", action="store_true", help="also batch 1024 and 2048 (accelerators)")
  parser.add_argument("--gm-ipcs", type=int, nargs="+", default=[1, 10], choices=[1, 10, 50])
  parser.add_argument("--gm-repeats", type=int, default=2)
  parser.add_argument("--mtt-ipcs", type=int, nargs="+", default=[10])
  parser.add_argument("--mtt-steps", type=int, nargs="+", default=[20])
  parser.add_argument("--mtt-memory", nargs="+", default=["none"], choices=["none", "remat", "tesla"])
  parser.add_argument("--mtt-repeats", type=int, default=3)
  parser.add_argument("--out", help="also write the tables to this file")
  parser.add_argument("--child", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(child(json.loads(args.child))))
    return
  header = [f"`python benchmarks/speed.py{''.join(' ' + arg for arg in sys.argv[1:])}`",
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
            f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", ""]
  out = open(args.out, "w") if args.out else None  # written row by row: a run cut short keeps its rows

  def emit(*rows):
    for row in rows:
      print(row, flush=True)
      if out:
        out.write(row + "\n")
        out.flush()

  emit(*header)

  if "ceiling" in args.sections:
    emit("| fp32 matmul 2048³ | device | GFLOP/s |", "|---|---|---|")
    for framework in ("jax", "torch"):
      result = run_child({"framework": framework, "section": "ceiling"})
      emit(f"| {framework} | {result['device']} | {result['gflops']:.0f} |")
    emit("")
  if "step" in args.sections:
    emit("| ConvNet-3 step | batch | calibjax s (first) | PyTorch s (first) | calibjax / PyTorch | "
         "calibjax GFLOP/s | PyTorch GFLOP/s | peak GB calibjax / PyTorch | device |",
         "|---|---|---|---|---|---|---|---|---|")
    for batch, shape in step_settings(args.large):
      spec = {"section": "step", "batch_size": batch, "image_shape": shape, "repeats": args.repeats}
      ours, theirs = run_child({**spec, "framework": "jax"}), run_child({**spec, "framework": "torch"})
      gflop = convnet_step_gflop(batch, shape)
      emit(f"| {'x'.join(map(str, shape))} | {batch} | {ours['step_s']:.3f} ({ours['first_s']:.1f}) | "
           f"{theirs['step_s']:.3f} ({theirs['first_s']:.1f}) | {ours['step_s'] / theirs['step_s']:.2f} | "
           f"{gflop / ours['step_s']:.0f} | {gflop / theirs['step_s']:.0f} | "
           f"{ours['peak_gb']:.2f} / {theirs['peak_gb']:.2f} | {ours['device']} |")
    emit("")
  if "gm" in args.sections:
    from calibjax.distill import gm
    emit("| distillation iteration | IPC | outer x inner | calibjax s (first) | PyTorch s (first) | "
         "calibjax / PyTorch | peak GB calibjax / PyTorch | device |", "|---|---|---|---|---|---|---|---|")
    for ipc in args.gm_ipcs:
      for method in ("dc", "dsa"):
        spec = {"section": "gm", "method": method, "ipc": ipc, "repeats": args.gm_repeats}
        ours, theirs = run_child({**spec, "framework": "jax"}), run_child({**spec, "framework": "torch"})
        outer, inner = gm.outer_inner_loops(ipc)
        emit(f"| {method.upper()} | {ipc} | {outer} x {inner} | {ours['step_s']:.2f} ({ours['first_s']:.1f}) | "
             f"{theirs['step_s']:.2f} ({theirs['first_s']:.1f}) | {ours['step_s'] / theirs['step_s']:.2f} | "
             f"{ours['peak_gb']:.2f} / {theirs['peak_gb']:.2f} | {ours['device']} |")
    emit("")
  if "mtt" in args.sections:
    emit("| MTT iteration | IPC | N | calibjax memory mode | calibjax s (compile) | PyTorch s (first) | "
         "calibjax / PyTorch | peak GB calibjax / PyTorch | device |", "|---|---|---|---|---|---|---|---|---|")
    for ipc in args.mtt_ipcs:
      for syn_steps in args.mtt_steps:
        spec = {"section": "mtt", "ipc": ipc, "syn_steps": syn_steps, "repeats": args.mtt_repeats}
        theirs = run_child({**spec, "framework": "torch"})  # PyTorch has one mode: every step's graph kept
        for memory in args.mtt_memory:
          ours = run_child({**spec, "memory": memory, "framework": "jax"})
          emit(f"| MTT | {ipc} | {syn_steps} | {memory} | {ours['step_s']:.2f} ({ours['first_s']:.1f}) | "
               f"{theirs['step_s']:.2f} ({theirs['first_s']:.1f}) | {ours['step_s'] / theirs['step_s']:.2f} | "
               f"{ours['peak_gb']:.2f} / {theirs['peak_gb']:.2f} | {ours['device']} |")
    emit("")
  emit(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
  if out:
    out.close()


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  main()
