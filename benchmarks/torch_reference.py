"""The PyTorch side of benchmarks/speed.py: the same ConvNet-3 and SGD step as calibjax, written here so that
both sides run the same shapes in the same process sequence (torch is the optional `bench` extra, never a
runtime dependency of calibjax).

The network is the dataset-distillation ConvNet (docs/protocols.md §3.1) as the reference PyTorch code builds it:
3 x [conv 3x3 (width 128, bias) -> GroupNorm(128, 128) (instance norm, affine) -> ReLU -> AvgPool 2x2], flatten,
linear; 1-channel inputs are padded by 3 so that 28 px behaves like 32 px. NCHW, as the reference code runs it.
"""

import time

import numpy as np
import torch
from torch import nn


def convnet(in_channels: int, num_classes: int = 10, width: int = 128, depth: int = 3) -> nn.Sequential:
  layers, channels = [], in_channels
  for layer in range(depth):
    padding = 3 if (layer == 0 and in_channels == 1) else 1
    layers += [nn.Conv2d(channels, width, 3, padding=padding), nn.GroupNorm(width, width, affine=True),
               nn.ReLU(), nn.AvgPool2d(2, 2)]
    channels = width
  return nn.Sequential(*layers, nn.Flatten(), nn.Linear(width * 4 * 4, num_classes))


def device() -> torch.device:
  return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(dev: torch.device) -> None:
  if dev.type == "cuda":
    torch.cuda.synchronize()


def time_train_step(*, batch_size: int, image_shape: tuple[int, int, int], repeats: int, warmup: int = 2) -> dict:
  """Median seconds of one SGD step (lr 0.01, momentum 0.9, cross-entropy) after `warmup` steps."""
  dev = device()
  height, width, channels = image_shape
  net = convnet(channels).to(dev)
  optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
  generator = np.random.default_rng(0)
  images = torch.from_numpy(generator.random((batch_size, channels, height, width), np.float32)).to(dev)
  labels = torch.from_numpy(generator.integers(0, 10, batch_size)).to(dev)

  def step():
    optimizer.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(net(images), labels)
    loss.backward()
    optimizer.step()

  start = time.perf_counter()
  step()
  _sync(dev)
  first = time.perf_counter() - start
  for _ in range(warmup - 1):
    step()
  times = []
  for _ in range(repeats):
    _sync(dev)
    start = time.perf_counter()
    step()
    _sync(dev)
    times.append(time.perf_counter() - start)
  return {"first_s": first, "step_s": float(np.median(times))}


def matmul_gflops(size: int = 2048, repeats: int = 10) -> float:
  """Best fp32 throughput of a size^3 matrix product, GFLOP/s."""
  dev = device()
  a = torch.randn(size, size, device=dev)
  b = torch.randn(size, size, device=dev)
  (a @ b).sum().item()
  best = float("inf")
  for _ in range(repeats):
    _sync(dev)
    start = time.perf_counter()
    a @ b
    _sync(dev)
    best = min(best, time.perf_counter() - start)
  return 2 * size ** 3 / best / 1e9


# ---- Gradient matching (DC / DSA), as the reference DC / DSA code runs one iteration ----------------------------
# One iteration: a freshly initialised network; `outer` times: for every class, the per-layer cosine distance of
# the gradients on 256 real images and on the class's synthetic images (create_graph), summed over classes, one
# SGD step (lr 0.1, momentum 0.5) on the images; between outer steps `inner` epochs of SGD (lr 0.01) on the
# synthetic set, batch 256. DSA: one augmentation family drawn per call (the reference's 'S' mode) from
# color / crop / cutout / flip / scale / rotate, the same draw for the real and the synthetic batch of a class.

OUTER_INNER = {1: (1, 1), 10: (10, 50), 50: (50, 10)}
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2861, 0.3530


def fashion_mnist_by_class(directory: str) -> list[torch.Tensor]:
  """The normalised training images of each class, (N_c, 1, 28, 28) each, read from the IDX files."""
  import gzip
  import os
  with gzip.open(os.path.join(directory, "train-images-idx3-ubyte.gz")) as f:
    images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
  with gzip.open(os.path.join(directory, "train-labels-idx1-ubyte.gz")) as f:
    labels = np.frombuffer(f.read(), np.uint8, offset=8)
  images = (images.astype(np.float32) / 255.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
  return [torch.from_numpy(images[labels == c].copy()) for c in range(10)]


def _layer_distance(real: torch.Tensor, syn: torch.Tensor) -> torch.Tensor:
  if real.dim() == 1:  # biases and norm parameters are not matched
    return torch.zeros((), device=real.device)
  real, syn = real.reshape(real.shape[0], -1), syn.reshape(syn.shape[0], -1)
  cosine = (real * syn).sum(-1) / (real.norm(dim=-1) * syn.norm(dim=-1) + 1e-6)
  return (1 - cosine).sum()


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
  grid = nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
  return nn.functional.grid_sample(x, grid, align_corners=False)


def dsa(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
  """One DSA family at the reference parameters, its random draw from `generator` (seeded per class, so the
  real and the synthetic batch get the same draw, as the reference's siamese seed does)."""
  n, dev = x.shape[0], x.device
  rand = lambda *shape: torch.rand(*shape, generator=generator).to(dev)
  family = ("color", "crop", "cutout", "flip", "scale", "rotate")[int(torch.randint(6, (1,), generator=generator))]
  if family == "color":
    x = x + (rand(n, 1, 1, 1) - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (rand(n, 1, 1, 1) * 2.0) + mean
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - mean) * (rand(n, 1, 1, 1) + 0.5) + mean
  if family == "flip":
    return torch.where(rand(n, 1, 1, 1) < 0.5, x.flip(3), x)
  if family in ("scale", "rotate"):
    theta = torch.zeros(n, 2, 3, device=dev)
    if family == "scale":
      theta[:, 0, 0] = rand(n) * (1.2 - 1 / 1.2) + 1 / 1.2
      theta[:, 1, 1] = rand(n) * (1.2 - 1 / 1.2) + 1 / 1.2
    else:
      angle = (rand(n) - 0.5) * 2 * 15 / 180 * np.pi
      theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle), torch.sin(-angle)
      theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle), torch.cos(angle)
    return _affine(x, theta)
  size = x.shape[2]
  if family == "crop":  # integer translation by up to 1/8 of the side, zero fill
    shift = int(size * 0.125 + 0.5)
    dy = torch.randint(-shift, shift + 1, (n,), generator=generator).to(dev)
    dx = torch.randint(-shift, shift + 1, (n,), generator=generator).to(dev)
    rows = (torch.arange(size, device=dev)[None] + dy[:, None]).clamp(-1, size)  # -1 / size: the zero border
    cols = (torch.arange(size, device=dev)[None] + dx[:, None]).clamp(-1, size)
    padded = nn.functional.pad(x, [1, 1, 1, 1])
    return padded[torch.arange(n, device=dev)[:, None, None, None], torch.arange(x.shape[1], device=dev)[None, :, None, None],
                  (rows + 1)[:, None, :, None], (cols + 1)[:, None, None, :]]
  half = int(size * 0.5 + 0.5)  # cutout: a zeroed square of half the side
  cy = torch.randint(0, size + (1 - half % 2), (n,), generator=generator).to(dev)
  cx = torch.randint(0, size + (1 - half % 2), (n,), generator=generator).to(dev)
  grid = torch.arange(size, device=dev)
  inside_y = ((grid[None] - cy[:, None] + half // 2) >= 0) & ((grid[None] - cy[:, None] + half // 2) < half)
  inside_x = ((grid[None] - cx[:, None] + half // 2) >= 0) & ((grid[None] - cx[:, None] + half // 2) < half)
  return x * (~(inside_y[:, :, None] & inside_x[:, None, :]))[:, None].to(x.dtype)


def matching_loss(net: nn.Module, by_class: list[torch.Tensor], syn: torch.Tensor, syn_labels: torch.Tensor, *,
                  ipc: int, batch_real: int, augment: bool, generator: torch.Generator) -> torch.Tensor:
  """Σ over classes of the per-layer gradient distance between `batch_real` real images of the class and its
  synthetic images (their gradients kept in the graph); DSA with the same draw for both when `augment`."""
  params, dev = list(net.parameters()), syn.device
  loss = torch.zeros((), device=dev)
  for c, images in enumerate(by_class):
    real = images[torch.randint(len(images), (batch_real,), generator=generator).to(dev)]
    syn_c = syn[c * ipc:(c + 1) * ipc]
    if augment:
      seed = int(torch.randint(2 ** 31, (1,), generator=generator))
      real = dsa(real, torch.Generator().manual_seed(seed))
      syn_c = dsa(syn_c, torch.Generator().manual_seed(seed))
    real_labels = torch.full((batch_real,), c, device=dev)
    grads_real = torch.autograd.grad(nn.functional.cross_entropy(net(real), real_labels), params)
    grads_syn = torch.autograd.grad(nn.functional.cross_entropy(net(syn_c), syn_labels[c * ipc:(c + 1) * ipc]),
                                    params, create_graph=True)
    loss = loss + sum(_layer_distance(r.detach(), s) for r, s in zip(grads_real, grads_syn))
  return loss


def time_gm_iteration(*, method: str, ipc: int, repeats: int, data_dir: str, batch_real: int = 256) -> dict:
  """First and median seconds of one DC / DSA iteration (module comment above) on Fashion-MNIST."""
  dev = device()
  by_class = [images.to(dev) for images in fashion_mnist_by_class(data_dir)]
  generator = torch.Generator().manual_seed(0)
  syn = torch.cat([c[torch.randperm(len(c), generator=generator)[:ipc].to(dev)] for c in by_class])
  syn.requires_grad_(True)
  syn_labels = torch.arange(10, device=dev).repeat_interleave(ipc)
  image_optimizer = torch.optim.SGD([syn], lr=0.1, momentum=0.5)
  outer, inner = OUTER_INNER[ipc]
  augment = method == "dsa"

  def iteration():
    net = convnet(1).to(dev)
    net_optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    for step in range(outer):
      loss = matching_loss(net, by_class, syn, syn_labels, ipc=ipc, batch_real=batch_real, augment=augment,
                           generator=generator)
      image_optimizer.zero_grad()
      loss.backward()
      image_optimizer.step()
      if step == outer - 1:
        break
      train_images, train_labels = syn.detach().clone(), syn_labels
      for _ in range(inner):
        order = torch.randperm(len(train_images), generator=generator).to(dev)
        for start in range(0, len(order), 256):
          batch = order[start:start + 256]
          x = train_images[batch]
          if augment:
            x = dsa(x, torch.Generator().manual_seed(int(torch.randint(2 ** 31, (1,), generator=generator))))
          net_optimizer.zero_grad()
          nn.functional.cross_entropy(net(x), train_labels[batch]).backward()
          net_optimizer.step()
    return float(loss.detach())

  return _time_iterations(iteration, repeats, dev)


# ---- Trajectory matching (MTT), as the reference MTT code runs one iteration -----------------------------------
# The student's parameters are one flat vector (the reference's reparametrised module); N = `syn_steps` steps
# θ_{k+1} = θ_k − lr·∇θ CE(net(DSA(X_k)); θ_k) on minibatches of the synthetic set (the whole set by default),
# each gradient kept in the graph (create_graph); the loss ‖θ_N − θ*‖² / ‖θ_0 − θ*‖²; one SGD step (momentum 0.5)
# on the images and on the learned lr. DSA draws one family per call, not Siamese. The expert trajectory is
# synthetic (a fresh initialisation and a small random step to the target): the cost does not depend on it.


def time_mtt_iteration(*, ipc: int, syn_steps: int, repeats: int, data_dir: str,
                       batch_syn: int | None = None) -> dict:
  """First and median seconds of one MTT iteration (module comment above) on Fashion-MNIST."""
  dev = device()
  by_class = fashion_mnist_by_class(data_dir)
  generator = torch.Generator().manual_seed(0)
  syn = torch.cat([c[torch.randperm(len(c), generator=generator)[:ipc]] for c in by_class]).to(dev)
  syn.requires_grad_(True)
  syn_labels = torch.arange(10, device=dev).repeat_interleave(ipc)
  syn_lr = torch.tensor(0.01, device=dev, requires_grad=True)
  image_optimizer = torch.optim.SGD([syn], lr=1000.0, momentum=0.5)
  lr_optimizer = torch.optim.SGD([syn_lr], lr=1e-5, momentum=0.5)
  net = convnet(1).to(dev)
  names = [name for name, _ in net.named_parameters()]
  shapes = [p.shape for _, p in net.named_parameters()]
  start = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
  target = start + 1e-3 * torch.randn(start.shape, generator=generator).to(dev)
  batch = batch_syn or len(syn_labels)

  def forward(flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    tensors = [t.view(shape) for t, shape in zip(torch.split(flat, [s.numel() for s in shapes]), shapes)]
    return torch.func.functional_call(net, dict(zip(names, tensors)), (x,))

  def iteration():
    params, chunks = start.clone().requires_grad_(True), []
    for _ in range(syn_steps):
      if not chunks:  # a fresh permutation whenever the previous one is used up, as the reference does
        chunks = list(torch.split(torch.randperm(len(syn_labels), generator=generator).to(dev), batch))
      rows = chunks.pop()
      x = dsa(syn[rows], torch.Generator().manual_seed(int(torch.randint(2 ** 31, (1,), generator=generator))))
      loss = nn.functional.cross_entropy(forward(params, x), syn_labels[rows])
      grad, = torch.autograd.grad(loss, params, create_graph=True)
      params = params - syn_lr * grad
    loss = ((params - target) ** 2).sum() / ((start - target) ** 2).sum()
    image_optimizer.zero_grad()
    lr_optimizer.zero_grad()
    loss.backward()
    image_optimizer.step()
    lr_optimizer.step()
    return float(loss.detach())

  return _time_iterations(iteration, repeats, dev)


def _time_iterations(iteration, repeats: int, dev: torch.device) -> dict:
  times = []
  for _ in range(repeats + 1):
    _sync(dev)
    begin = time.perf_counter()
    iteration()
    _sync(dev)
    times.append(time.perf_counter() - begin)
  return {"first_s": times[0], "step_s": float(np.median(times[1:]))}
