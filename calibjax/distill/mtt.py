"""Trajectory matching (MTT; Cazenavette et al., CVPR 2022) with a learned student lr, optional Masked
Distillation Training (MDT) and three memory modes for the unrolled student. docs/protocols.md §2, §1.9.

One distillation ITERATION (the reference's distill.py loop body), from one key:

1. draw an expert e ~ U{0..E-1} and a start epoch t ~ U{0..max_start_epoch-1} (upper bound exclusive, as
   the reference's randint); θ₀ = θ*_{e,t}, target θ* = θ*_{e,t+M} with M = expert_epochs;
2. unroll N = syn_steps student SGD steps θ_{k+1} = θ_k − lr·∇θ CE(net(Mask(DSA(X_k)); θ_k), y_k) in ONE
   `jax.lax.scan` over the pure `net.apply` (no flat-parameter re-implementation of the model). X_k is the
   next chunk of `batch_syn` images of a random permutation of the synthetic set, re-permuted when exhausted
   (the reference's `indices_chunks`); DSA is non-Siamese (per-sample parameters); the MDT mask (if on) is
   applied after the augmentation with `calibjax.masks.mask_inputs`, the primitive MTS and the
   gradient-matching MDT use (paper 000 Eq. 8: every student step sees Mask(B′, r));
3. loss = ‖θ_N − θ*‖² / ‖θ₀ − θ*‖², both sums over all parameters;
4. one SGD-with-momentum step on the images (lr_img, momentum 0.5) and one on the learned lr (lr_lr,
   momentum 0.5), as the reference.

Learned lr. The synthetic set stores `log_lr` and the student uses lr = exp(log_lr), so the lr stays positive
(the reference optimises the raw lr, nothing clamps it and it can turn negative: mtt-distillation#16). To keep
the reference's `lr_lr` values meaningful, the momentum SGD runs on the RAW-lr gradient g = ∂L/∂lr and is
applied as the reference's step: buf ← m·buf + g, u = −lr_lr·buf, lr ← lr + u when u ≥ 0, and lr ← lr·exp(u/lr)
(the same to first order, always positive) when u < 0; it differs only where the reference would drive lr
towards or below zero (`update_log_lr`). Gradients reach the lr through every student step.

Minibatches. When batch_syn does not divide n = C·ipc (Tiny ImageNet IPC 50: 10000 / 300), the reference's
permutation split has one short chunk, which its `pop()` takes first. Here each permutation is laid out as
ceil(n / b) fixed-size chunks with the padding in front, so the first chunk holds the n mod b real indices
plus padding of weight 0, and the loss of a chunk is the mean over its real entries: the same batches with
fixed shapes.

Memory (`memory`):

- "none": reverse-mode through the scan; XLA keeps every step's activations of the second-order graph, so
  peak memory grows linearly in N (the reference: +0.36 GB per step at Fashion-MNIST IPC 10,
  docs/reference-quirks.md §9).
- "remat": `jax.checkpoint` of the scan body; the backward pass recomputes one step at a time, so only the
  parameters θ_k of each step are stored (N·|θ|, 1.3 MB per step for ConvNet-3 on 28 px) instead of its
  activations. Gradients equal "none" up to float reassociation.
- "tesla": TESLA's constant-memory gradient (Cui et al., ICML 2023): with θ_N = θ₀ − lr·Σ_k g_k, it keeps
  only the direct dependence of each g_k on (X_k, lr) and treats θ_k as a constant, so ∂L/∂X = Σ_k
  VJP(−lr·g_k, v) with the same v = ∂L/∂θ_N for every k. Two forward sweeps (the first computes θ_N and v,
  the second recomputes θ_k and accumulates the VJPs), memory independent of N. It drops the second-order
  terms through θ_k, so it differs from "none" by O(lr²) (tests compare it with the exact gradient and with
  the same approximation written as plain reverse-mode).

Measured (XLA temporary buffers of the compiled iteration, `memory_analysis()`; Fashion-MNIST ConvNet-3 width
128, IPC 10, whole-set batches, no DSA), rolled scan, N = 2 -> 8: "none" 1.55 -> 4.20 GB (0.44 GB per step),
"remat" 0.585 -> 0.592 GB, "tesla" 0.605 -> 0.605 GB. The bound needs the ROLLED scan: in a fully unrolled
program XLA:CPU's scheduler keeps the recomputed activations of every step alive (N = 2 -> 6: 1.13 -> 2.90 GB
for all three modes; the same with a hand-written custom_vjp whose recomputation waits on an optimisation
barrier), so with `unroll="full"` the memory modes change the arithmetic but not the peak.

Scan unrolling (`unroll`). XLA:CPU runs convolution weight gradients very slowly inside a while loop
(jax-ml/jax#12868; see `calibjax.distill.gm`): with `lax.conv`, a rolled 2-step unroll at width 128 did not finish
in 200 s. On the CPU backend the ConvNet computes every convolution as a patch product
(`models.fast_paths`), which loops do not slow down: at IPC 1, N = 10 (`benchmarks/mtt_step.py --ipc 1 --steps 10
--memory none --unroll rolled full`, 2 shared cores) the rolled scan compiles in 17 s against 55 s fully unrolled
and runs as fast (3.9 vs 4.2 s per iteration); at N = 40 it compiles in 18 s (317 s fully unrolled, README
Benchmarks) and with `memory=remat` peaks at 1.3 GB resident. So "auto" (default) keeps the scan rolled on every
backend, where the memory modes bound the peak; "full" unrolls it (compile time and memory growing with N
whatever `memory` says); "rolled" is "auto". The unroll is a `lax.scan` in every case.
"""

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import ml_collections
import optax

from calibjax import parallel
from calibjax.data.augment.dsa import DSAParams, dsa_augment
from calibjax.data.prepare import Splits
from calibjax.distill import buffer as buffer_lib
from calibjax.distill import matching
from calibjax.distill.interface import Distiller
from calibjax.distill.synthetic import class_major_labels, init_synthetic
from calibjax.errors import ConfigError
from calibjax.masks import mask_inputs
from calibjax.models import Network

MEMORY_MODES = ("none", "remat", "tesla")
UNROLLS = ("auto", "rolled", "full")

# The reference's argparse defaults (distill.py:413-473), used for every (dataset, ipc) not in the table.
# MTT and its follow-ups publish no MNIST / Fashion-MNIST hyperparameters (docs/protocols.md §2.4): the
# Fashion-MNIST values are these defaults, not published values, and are to be tuned in-project.
_ARGPARSE = dict(syn_steps=20, expert_epochs=3, max_start_epoch=25, batch_syn=0, lr_img=1000.0, lr_lr=1e-5,
                 lr_teacher=0.01, zca=False)


def _row(syn_steps, expert_epochs, max_start_epoch, batch_syn, lr_img, lr_lr, lr_teacher, zca):
  return dict(syn_steps=syn_steps, expert_epochs=expert_epochs, max_start_epoch=max_start_epoch,
              batch_syn=batch_syn, lr_img=float(lr_img), lr_lr=lr_lr, lr_teacher=lr_teacher, zca=zca)


# docs/protocols.md §2.4: the author's table as transcribed in a third-party README (the official one is an image,
# mtt-distillation#7). batch_syn 0 = the whole synthetic set.
TABLE = {
    ("cifar10", 1): _row(50, 2, 2, 0, 100, 1e-7, 0.01, True),
    # mtt-distillation#31: the published lr_img of this row makes syn_lr explode (a typo confirmed by the
    # maintainer); the transcription's 100 is one of the two values reported stable (100, 1000).
    ("cifar10", 10): _row(30, 2, 20, 0, 100, 1e-5, 0.001, True),
    ("cifar10", 50): _row(30, 2, 40, 0, 1000, 1e-5, 0.001, False),
    ("cifar100", 1): _row(20, 3, 20, 0, 1000, 1e-5, 0.01, True),
    ("cifar100", 10): _row(20, 2, 20, 0, 1000, 1e-5, 0.01, False),
    ("cifar100", 50): _row(80, 2, 40, 125, 1000, 1e-5, 0.01, True),
    ("tiny_imagenet", 1): _row(10, 2, 10, 0, 1e4, 1e-4, 0.01, False),
    ("tiny_imagenet", 10): _row(20, 2, 40, 200, 1e4, 1e-4, 0.01, False),
    ("tiny_imagenet", 50): _row(20, 2, 40, 300, 1e4, 1e-4, 0.01, False),
    # ImageNet subsets (ConvNetD5, 128 px): lr_img 1e5 as the maintainer's reply (mtt-distillation#1) and the
    # MTS fork; the README example uses 1000.
    ("imagenette", 1): _row(20, 2, 10, 0, 1e5, 1e-6, 0.01, False),
    ("imagenette", 10): _row(20, 2, 10, 20, 1e5, 1e-6, 0.01, False),
}


# Fashion-MNIST (IPC 1 and 10), chosen in-project from 30-40-iteration probes on a 1-expert buffer
# (configs/buffer.py, 30 epochs of 500 images per class): with the argparse lr_lr 1e-5 the learned lr fell from
# 0.01 to ~0 within 5 iterations (the 10-image student overshoots the expert, loss 2-4, and the lr step is
# large next to the lr), after which loss = 1 and the images learn nothing; lr_lr 1e-7 (the CIFAR-10 IPC 1
# value) keeps it near 0.01. Start epochs >= 10 begin at loss 2-4 (the late expert barely moves in 3 epochs),
# starts below 10 at 0.6-1.4 and fall to ~0.5 within 30 iterations, so max_start_epoch is 10 (the small-IPC
# rows of the table use 2-20).
IN_PROJECT = {("fashion_mnist", ipc): _row(20, 3, 10, 0, 1000, 1e-7, 0.01, False) for ipc in (1, 10)}


def reference_row(dataset: str, ipc: int) -> dict:
  """The reference's MTT hyperparameters for `dataset` at `ipc`, `lr_img` (the image lr, `distill.lr_img`)
  included.

  (dataset, ipc) pairs of the published table (`TABLE`: cifar10, cifar100, tiny_imagenet, imagenette at IPC 1,
  10, 50) get its row; Fashion-MNIST at IPC 1 and 10 the in-project row (`IN_PROJECT`: no published values
  exist); every other pair the reference's argparse defaults, which are not published values for it.
  """
  return dict(TABLE.get((dataset, ipc)) or IN_PROJECT.get((dataset, ipc), _ARGPARSE))


def default_config(dataset: str, ipc: int) -> ml_collections.ConfigDict:
  """The `config.distill.mtt` block of `reference_row(dataset, ipc)` (its `lr_img` goes to `distill.lr_img`).

  Fields:
    syn_steps: N, student steps per iteration.
    expert_epochs: M, expert epochs between the start and the target parameters.
    max_start_epoch: start epochs are drawn from [0, max_start_epoch).
    batch_syn: synthetic images per student step; 0 = the whole synthetic set.
    lr_lr: SGD lr of the learned student lr (see the module docstring for how it is applied).
    lr_teacher: initial student lr.
    zca_expected: whether the reference whitens this dataset/IPC with ZCA (informational: the data config
      decides, and the buffer must have been built with the same setting).
    buffer_dir: the workdir of a `buffer` run (required).
    max_experts: use only the first this many experts of the buffer (0 = all); bounds device memory.
    memory: "none" | "remat" | "tesla" (module docstring).
    unroll: "auto" | "rolled" | "full" (module docstring).
  """
  row = reference_row(dataset, ipc)
  c = ml_collections.ConfigDict()
  c.syn_steps = row["syn_steps"]
  c.expert_epochs = row["expert_epochs"]
  c.max_start_epoch = row["max_start_epoch"]
  c.batch_syn = row["batch_syn"]
  c.lr_lr = row["lr_lr"]
  c.lr_teacher = row["lr_teacher"]
  c.zca_expected = row["zca"]
  c.buffer_dir = ""
  c.max_experts = 0
  c.memory = "none"
  c.unroll = "auto"
  return c


@dataclasses.dataclass(frozen=True, kw_only=True)
class MTTConfig(matching.MatchingConfig):
  """MTT settings (plain Python values; hashable). See `matching.MatchingConfig` for ipc, lr_img, momentum,
  the DSA settings (used non-Siamese here) and the MDT mode; batch_real, class_map and class_chunk are unused.

  Attributes:
    syn_steps: student steps per iteration (N).
    expert_epochs: M.
    max_start_epoch: start epochs are drawn from [0, max_start_epoch).
    batch_syn: images per student step; None = the whole synthetic set.
    lr_lr: SGD lr of the learned lr.
    lr_teacher: initial learned lr.
    memory: "none" | "remat" | "tesla".
    unroll: "auto" | "rolled" | "full".
  """

  lr_img: float = 1000.0
  syn_steps: int = 20
  expert_epochs: int = 3
  max_start_epoch: int = 25
  batch_syn: int | None = None
  lr_lr: float = 1e-5
  lr_teacher: float = 0.01
  memory: str = "none"
  unroll: str = "auto"

  def __post_init__(self):
    super().__post_init__()
    if self.syn_steps < 1 or self.expert_epochs < 1 or self.max_start_epoch < 1:
      raise ConfigError(f"syn_steps, expert_epochs and max_start_epoch must be at least 1, got "
                        f"{self.syn_steps}, {self.expert_epochs}, {self.max_start_epoch}")
    if self.batch_syn is not None and self.batch_syn < 1:
      raise ConfigError(f"batch_syn must be at least 1 (0 in configs: the whole set), got {self.batch_syn}")
    if self.lr_lr < 0 or self.lr_teacher <= 0:
      raise ConfigError(f"need lr_lr >= 0 and lr_teacher > 0, got {self.lr_lr} and {self.lr_teacher}")
    if self.memory not in MEMORY_MODES:
      raise ConfigError(f"unknown mtt memory mode '{self.memory}'; use one of {MEMORY_MODES}")
    if self.unroll not in UNROLLS:
      raise ConfigError(f"unknown mtt unroll '{self.unroll}'; use one of {UNROLLS}")

  @property
  def snapshots(self) -> int:
    """Expert snapshots an iteration can touch: epochs 0 .. max_start_epoch - 1 + expert_epochs."""
    return self.max_start_epoch + self.expert_epochs


def scan_unroll(config: MTTConfig) -> bool | int:
  """The `unroll` argument of the student `lax.scan`: True (fully unrolled) or 1 (a rolled while loop)."""
  return True if config.unroll == "full" else 1


# -------------------------------------------------------------------------------------------- the unroll


class Plan(NamedTuple):
  """The minibatches and keys of one unroll.

  Attributes:
    idx: int32 (N, b) synthetic-set indices of each step (padding entries point at row 0).
    weight: float32 (N, b) 1 / (real entries of the chunk) at real entries, 0 at padding; rows sum to 1.
    keys: (N,) PRNG keys of the steps (DSA draw and MDT mask).
  """

  idx: jax.Array
  weight: jax.Array
  keys: jax.Array


def batch_plan(key: jax.Array, *, n: int, batch: int, steps: int) -> Plan:
  """Chunks of random permutations of range(n), `batch` at a time, re-permuted when exhausted (the reference).

  Args:
    key: PRNG key.
    n: synthetic images.
    batch: chunk size b <= n.
    steps: N.

  Returns:
    A `Plan`; each permutation spans ceil(n / b) consecutive rows, its short chunk (if b does not divide n)
    first.
  """
  chunks = -(-n // batch)
  pad = chunks * batch - n
  perms = -(-steps // chunks)
  perm_key, step_key = jax.random.split(key)
  order = jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(perm_key, perms))
  idx = jnp.concatenate([jnp.zeros((perms, pad), order.dtype), order], axis=1).reshape(perms * chunks, batch)
  valid = (jnp.arange(chunks * batch) >= pad).reshape(chunks, batch).astype(jnp.float32)
  weight = jnp.tile(valid / valid.sum(axis=1, keepdims=True), (perms, 1))
  return Plan(idx[:steps].astype(jnp.int32), weight[:steps], jax.random.split(step_key, steps))


def student_step(net: Network, config: MTTConfig, params: Any, images: jax.Array, labels: jax.Array,
                 log_lr: jax.Array, idx: jax.Array, weight: jax.Array, key: jax.Array,
                 ratio: jax.Array) -> Any:
  """One student SGD step on a synthetic minibatch: θ − exp(log_lr)·∇θ Σ_i w_i CE(net(Mask(DSA(x_i))), y_i).

  Args:
    net: a stateless network.
    config: DSA strategy and parameters (non-Siamese), MDT mode and granularity.
    params: θ_k.
    images: (n, H, W, ch) the whole synthetic set.
    labels: int32 (n,).
    log_lr: scalar log of the student lr.
    idx: int32 (b,) rows of this step.
    weight: float32 (b,) per-example loss weights (1 / real entries; 0 at padding).
    key: the step's key, split as (DSA draw, MDT mask).
    ratio: MDT ratio (ignored when `config.mdt == "off"`).

  Returns:
    θ_{k+1}, differentiable w.r.t. params, images and log_lr.
  """
  aug_key, mask_key = jax.random.split(key)
  x = dsa_augment(aug_key, images[idx], strategy=config.dsa_strategy, siamese=False, params=config.dsa_params)
  if config.mdt != "off":
    x = mask_inputs(mask_key, x, ratio, granularity=config.mdt_granularity)
  state = matching.require_stateless(net)

  def loss(p):
    logits, _ = net.apply(p, state, x, train=True)
    return jnp.sum(weight * optax.softmax_cross_entropy_with_integer_labels(logits, labels[idx]))

  lr = jnp.exp(log_lr)
  return jax.tree.map(lambda p, g: p - lr * g, params, jax.grad(loss)(params))


def unroll_student(net: Network, config: MTTConfig, params: Any, images: jax.Array, labels: jax.Array,
                   log_lr: jax.Array, plan: Plan, ratio: jax.Array) -> Any:
  """θ_N from θ₀ = `params`: `config.syn_steps` student steps as one `lax.scan` (with `jax.checkpoint` of the
  body when `config.memory == "remat"`)."""
  def body(p, xs):
    return student_step(net, config, p, images, labels, log_lr, *xs, ratio), None

  if config.memory == "remat":
    body = jax.checkpoint(body)
  return jax.lax.scan(body, params, plan, unroll=scan_unroll(config))[0]


def _sq_dist(a: Any, b: Any) -> jax.Array:
  return sum(jnp.sum(jnp.square(x - y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def trajectory_loss(params: Any, start: Any, target: Any) -> jax.Array:
  """‖θ_N − θ*‖² / ‖θ₀ − θ*‖² summed over all parameters (the reference's division by the parameter count
  cancels). 0 exactly when the student lands on the target."""
  return _sq_dist(params, target) / _sq_dist(start, target)


def objective(net: Network, config: MTTConfig, images: jax.Array, log_lr: jax.Array, labels: jax.Array,
              start: Any, target: Any, plan: Plan, ratio: jax.Array) -> jax.Array:
  """The MTT loss of one unroll as a function of the synthetic images and the log lr."""
  final = unroll_student(net, config, start, images, labels, log_lr, plan, ratio)
  return trajectory_loss(final, start, target)


def _tesla_value_and_grad(net, config, images, log_lr, labels, start, target, plan, ratio):
  # Sweep 1: θ_N without any derivative.
  final = unroll_student(net, config, start, images, labels, log_lr, plan, ratio)
  loss, v = jax.value_and_grad(trajectory_loss)(final, start, target)

  # Sweep 2: recompute θ_k and accumulate VJP(θ_{k+1} − θ_k w.r.t. (X, log_lr)) at the fixed cotangent v.
  def body(carry, xs):
    params, g_images, g_log_lr = carry
    delta = lambda x, log_lr: jax.tree.map(
        lambda a, b: a - b, student_step(net, config, params, x, labels, log_lr, *xs, ratio), params)
    step, vjp = jax.vjp(delta, images, log_lr)
    gx, gl = vjp(v)
    return (jax.tree.map(jnp.add, params, step), g_images + gx, g_log_lr + gl), None

  init = (start, jnp.zeros_like(images), jnp.zeros_like(log_lr))
  (_, g_images, g_log_lr), _ = jax.lax.scan(body, init, plan, unroll=scan_unroll(config))
  return loss, (g_images, g_log_lr)


def value_and_grad(net: Network, config: MTTConfig, images: jax.Array, log_lr: jax.Array, labels: jax.Array,
                   start: Any, target: Any, plan: Plan, ratio: jax.Array
                   ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """(loss, (∂L/∂images, ∂L/∂log_lr)) of one unroll, with the gradient `config.memory` selects.

  Args:
    net: a stateless network.
    config: MTT settings.
    images: (n, H, W, ch) synthetic images.
    log_lr: scalar.
    labels: int32 (n,).
    start: θ₀ = the expert's parameters at the start epoch.
    target: θ* = the expert's parameters M epochs later.
    plan: `batch_plan(...)` with `steps = config.syn_steps`.
    ratio: MDT ratio.
  """
  if config.memory == "tesla":
    return _tesla_value_and_grad(net, config, images, log_lr, labels, start, target, plan, ratio)
  fn = functools.partial(objective, net, config)
  return jax.value_and_grad(fn, argnums=(0, 1))(images, log_lr, labels, start, target, plan, ratio)


# ------------------------------------------------------------------------------------------- the distiller


def lr_optimizer(config: MTTConfig) -> optax.GradientTransformation:
  """SGD with momentum on the raw-lr gradient (lr_lr, the images' momentum); see `update_log_lr`."""
  return optax.sgd(config.lr_lr, momentum=config.momentum or None)


def update_log_lr(tx: optax.GradientTransformation, log_lr: jax.Array, grad_log_lr: jax.Array,
                  opt_state: Any) -> tuple[jax.Array, Any]:
  """The reference's raw-lr step lr ← lr + u, except that a decrease is applied as lr ← lr·exp(u / lr).

  u is the momentum-SGD update of the raw lr for g = ∂L/∂lr = (∂L/∂log_lr) / lr. An increase is the reference's
  step exactly (log_lr ← log_lr + log1p(u / lr)); a decrease agrees with it to first order and keeps the lr
  positive where the reference would drive it to or below zero. (A multiplicative increase would blow up:
  from an lr near zero, u / lr is huge.)
  """
  lr = jnp.exp(log_lr)
  update, opt_state = tx.update(grad_log_lr / lr, opt_state)
  relative = update / lr
  return log_lr + jnp.where(relative >= 0, jnp.log1p(jnp.maximum(relative, 0.0)), relative), opt_state


def make_iteration(net: Network, config: MTTConfig, labels: jax.Array, *, mesh: Mesh | None = None
                   ) -> Callable[..., tuple[dict, dict]]:
  """One MTT iteration `(carry, key, trajectories) -> (carry, metrics)`, not jitted.

  Args:
    net: a stateless network.
    config: MTT settings.
    labels: int32 (n,) class-major labels of the synthetic set.
    mesh: with several devices, every student step's minibatch is split over them (the plan's batch axis), so
      each device runs the forward / backward of its part and the partitioner all-reduces the student's
      gradient inside the unroll (and the image gradient it sends back); the synthetic set, the expert draw and
      the update are replicated. Same keys, same minibatches: the set equals a one-device run's up to the order
      of floating-point sums.

  Returns:
    The iteration. carry = {"synset": SyntheticSet, "img_opt": image optimiser state, "lr_opt": lr optimiser
    state}; trajectories = expert parameters with leaves (experts, snapshots >= config.snapshots, ...). Keys:
    `split(key, 4)` = (expert, start epoch, minibatches and step keys, MDT ratio). metrics = {"loss",
    "lr" (after the update), "expert", "start_epoch", "mdt_ratio"}.
  """
  matching.require_stateless(net)
  tx_img, tx_lr = matching.image_optimizer(config), lr_optimizer(config)
  n = labels.shape[0]
  batch = n if config.batch_syn is None else config.batch_syn
  if batch > n:
    raise ConfigError(f"batch_syn={batch} exceeds the {n} synthetic images; lower it or use 0 (whole set)")

  def iteration(carry, key, trajectories):
    expert_key, start_key, plan_key, ratio_key = jax.random.split(key, 4)
    experts = jax.tree.leaves(trajectories)[0].shape[0]
    e = jax.random.randint(expert_key, (), 0, experts)
    t = jax.random.randint(start_key, (), 0, config.max_start_epoch)
    start = jax.tree.map(lambda x: x[e, t], trajectories)
    target = jax.tree.map(lambda x: x[e, t + config.expert_epochs], trajectories)
    ratio = matching.mdt_ratio(ratio_key, config)
    plan = batch_plan(plan_key, n=n, batch=batch, steps=config.syn_steps)
    plan = plan._replace(idx=parallel.split_along(plan.idx, mesh, axis=1),
                         weight=parallel.split_along(plan.weight, mesh, axis=1))
    synset = carry["synset"]
    loss, (g_images, g_log_lr) = value_and_grad(net, config, synset.images, synset.log_lr, labels, start,
                                                target, plan, ratio)
    updates, img_opt = tx_img.update(g_images, carry["img_opt"], synset.images)
    log_lr, lr_opt = update_log_lr(tx_lr, synset.log_lr, g_log_lr, carry["lr_opt"])
    synset = synset._replace(images=optax.apply_updates(synset.images, updates), log_lr=log_lr)
    metrics = {"loss": loss, "lr": jnp.exp(log_lr), "expert": e, "start_epoch": t, "mdt_ratio": ratio}
    return {"synset": synset, "img_opt": img_opt, "lr_opt": lr_opt}, metrics

  return iteration


def make_distiller(net: Network, config: MTTConfig, splits: Splits, trajectories: Any, *,
                   init: str = "real", mesh: Mesh | None = None) -> Distiller:
  """The MTT `Distiller` over device-resident expert trajectories.

  Args:
    net: a stateless network of the buffer's architecture.
    config: MTT settings.
    splits: prepared data (real images initialise the synthetic set when `init="real"`).
    trajectories: expert parameters, leaves (experts, snapshots, ...) with snapshots >= `config.snapshots`
      (host or device arrays; moved to the device once here).
    init: synthetic-set initialisation, "real" or "noise" (`calibjax.distill.synthetic.init_synthetic`).
    mesh: the devices (default: all; `make_iteration` says what is split).

  Returns:
    A Distiller; `step` is jitted once, donates the carry, and takes the trajectories as an argument (a
    closed-over buffer would be embedded in the compiled program as a constant), replicated over the mesh.

  Raises:
    ConfigError: the trajectories are shorter than `config.snapshots`, or batch_syn exceeds the set.
  """
  snapshots = jax.tree.leaves(trajectories)[0].shape[1]
  if snapshots < config.snapshots:
    raise ConfigError(f"the buffer has {snapshots - 1} expert epochs, but max_start_epoch="
                      f"{config.max_start_epoch} and expert_epochs={config.expert_epochs} need "
                      f"{config.snapshots - 1}; lower them or build a longer buffer")
  mesh = parallel.make_mesh() if mesh is None else mesh
  repl = parallel.replicated(mesh)
  trajectories = jax.device_put(trajectories, repl)
  labels = jnp.asarray(class_major_labels(splits.num_classes, config.ipc))
  step = jax.jit(make_iteration(net, config, labels, mesh=mesh), in_shardings=repl, out_shardings=repl,
                 donate_argnums=(0,))
  tx_img, tx_lr = matching.image_optimizer(config), lr_optimizer(config)

  def init_carry(key):
    synset = init_synthetic(key, splits.train_images, splits.train_labels, ipc=config.ipc,
                            num_classes=splits.num_classes, init=init, lr=config.lr_teacher)
    return {"synset": synset, "img_opt": tx_img.init(synset.images), "lr_opt": tx_lr.init(synset.log_lr)}

  return Distiller(init=init_carry, step=lambda carry, key: step(carry, key, trajectories),
                   synset=lambda carry: carry["synset"])


def config_from(cfg: ml_collections.ConfigDict) -> MTTConfig:
  """`MTTConfig` from a run's `config.distill` block (shared fields + `cfg.mtt`)."""
  m = cfg.mtt
  return MTTConfig(ipc=cfg.ipc, lr_img=cfg.lr_img, momentum=cfg.momentum, dsa_strategy=cfg.dsa_strategy,
                   dsa_params=DSAParams(align_corners=cfg.dsa_align_corners), mdt=cfg.mdt,
                   mdt_ratio=cfg.mdt_ratio, mdt_granularity=cfg.mdt_granularity, syn_steps=m.syn_steps,
                   expert_epochs=m.expert_epochs, max_start_epoch=m.max_start_epoch,
                   batch_syn=m.batch_syn or None, lr_lr=m.lr_lr, lr_teacher=m.lr_teacher, memory=m.memory,
                   unroll=m.unroll)


def build_distiller(net: Network, cfg: ml_collections.ConfigDict, splits: Splits, mesh: Mesh | None = None
                    ) -> Distiller:
  """The `mtt` entry of `calibjax.distill.distillers.DISTILLERS`.

  Reads `cfg.ipc, init, lr_img, momentum, dsa_strategy, dsa_align_corners, mdt, mdt_ratio, mdt_granularity` and
  `cfg.mtt.*` (`default_config`); loads the buffer at `cfg.mtt.buffer_dir` once (only the snapshots an
  iteration can reach, and the first `max_experts` experts) and refuses one built for other data or another
  model.

  Raises:
    ConfigError: no buffer_dir, or settings the buffer cannot serve.
    CheckpointError: the buffer is missing, unreadable or does not match `net` / `splits`.
  """
  config = config_from(cfg)
  if not cfg.mtt.buffer_dir:
    raise ConfigError("MTT needs expert trajectories: run method 'buffer' (configs/buffer.py) and set "
                      "--config.distill.mtt.buffer_dir to its workdir")
  buffer = buffer_lib.load_buffer(cfg.mtt.buffer_dir, max_experts=cfg.mtt.max_experts or None,
                                  snapshots=config.snapshots)
  buffer_lib.check_compatible(buffer, net=net, splits=splits)
  return make_distiller(net, config, splits, buffer.params, init=cfg.init, mesh=mesh)
