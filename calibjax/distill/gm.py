"""Gradient matching: Dataset Condensation (DC, Zhao et al. ICLR 2021) and its Siamese-augmentation variant
(DSA, Zhao & Bilen ICML 2021), with optional Masked Distillation Training (MDT). docs/protocols.md §3.3.

One distillation ITERATION (the reference's main.py loop body), `make_gm_iteration(net, config)(images,
opt_state, key, real)`:

1. a freshly initialised network (key);
2. `outer_loop` outer steps; each step
   a. draws the per-class real batches (C, batch_real, ...) from the device-resident `RealPool`,
   b. computes Σ_c distance(∇θ CE(real_c), ∇θ CE(Mask(syn_c))) with the per-class gradients mapped over
      classes by `jax.vmap` (DSA: Siamese augmentation with the step's shared key; MDT mask on the synthetic
      views only, after the augmentation -- see `calibjax.distill.matching`),
   c. takes one SGD-with-momentum step on the synthetic images (lr_img 0.1, momentum 0.5),
   d. unless it is the last outer step, trains the network for `inner_loop` epochs on the updated, detached
      synthetic set: SGD lr_net 0.01 without momentum, shuffled batches of `batch_train` (256; the whole set
      when smaller), DSA non-Siamese per-sample augmentation under DSA.

Two drivers run the same steps with the same keys (`loop_driver`):

- "scan": the whole iteration is ONE jitted function; outer steps are a `lax.scan`, the inner training a
  `lax.scan` over epochs and batches, the last-step skip a `lax.cond`. The natural form on GPU/TPU.
- "python": Python loops over a jitted outer step (steps a-c) and a jitted inner SGD step. XLA:CPU leaves a
  convolution whose operands are not in its canonical layout (every weight-gradient convolution is one)
  un-rewritten when it sits inside a while loop, and runs it through a naive loop nest instead of its
  optimised kernels: jax-ml/jax#12868 (open). Measured here (2-core CPU, 32 x 16 x 16 x 128 input, 3x3x128x128
  kernel): 0.064 s for the kernel gradient at top level, 6.8 s per trip inside a `fori_loop`; a "scan" DC
  iteration at IPC 1 (Fashion-MNIST, width 128) had not finished after 25 minutes. "auto" (default) picks
  "python" on the CPU backend and "scan" elsewhere. The Python driver adds one dispatch per step (~ms),
  negligible next to the steps.

Inner training is NOT masked by default (the paper masks the synthetic data inside the criterion C, Eq. 6; the
network update of Algorithm 1 line 8 uses no mask); `mdt_inner=True` masks it too, with the step's ratio.

Keys: `k_net, k_steps = split(key)`; outer step t uses `split(fold_in(k_steps, t), 4)` as (real batch,
matching, MDT ratio, inner training). The reference seeds DSA from the wall clock, so no run is reproducible
there; here a key reproduces an iteration exactly on one backend and driver.

Memory: the real batch of a step is C x 256 images; vmapped over all classes the whole (C*256)-image
forward/backward is one batched computation (Fashion-MNIST, width 128: 134 MB per first-layer activation and
class, 1.3 GB for 10 classes): a DC iteration at IPC 1 peaks at 9.1 GB resident on CPU. `class_chunk=k` bounds
it to k classes at a time (`lax.map(batch_size=k)`); the default is one class at a time on the CPU backend
(2.2 GB, and no slower: on the CPU every convolution is a patch product, so the while loop does not meet the
convolution issue above) and all classes elsewhere (`matching.default_class_chunk`).

Data parallelism: on a mesh of D devices (`parallel`), each step's real batches (C, batch_real, ...) are split
along the real-batch axis, so every device computes the real-image forward / backward of batch_real / D images
per class (the bulk of an iteration), and the partitioner all-reduces the real gradients; the synthetic set, the
network and the image update stay replicated, computed once per device. The real-batch axis rather than the
class axis, because it splits evenly for any number of classes (256 over 1, 2, 4, 8, 16 devices; 10 classes over
none of 4 or 8) and keeps the class chunking's memory bound; the synthetic half of the matching (ipc images per
class) is repeated on every device. The same keys draw the same batches, so the set equals a one-device run's up
to the order of floating-point sums.

Batch norm is rejected (`require_stateless`): the reference's freeze-after-16-images-per-class protocol is not
implemented, and differentiating through batch statistics would change the criterion.
"""

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import optax

from calibjax import parallel
from calibjax.data.augment.dsa import dsa_augment
from calibjax.distill import matching
from calibjax.distill.synthetic import class_major_labels
from calibjax.errors import ConfigError
from calibjax.masks import mask_inputs
from calibjax.models import Network

# (outer_loop, inner_loop) per IPC: the reference's get_loops (utils.py).
LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}
METHODS = ("dc", "dsa")
LOOP_DRIVERS = ("auto", "scan", "python")


def outer_inner_loops(ipc: int, *, outer_loop: int | None = None, inner_loop: int | None = None
                      ) -> tuple[int, int]:
  """(outer_loop, inner_loop) for `ipc` from the reference table, each overridable.

  Args:
    ipc: images per class.
    outer_loop: overrides the table's outer loop (image updates per iteration).
    inner_loop: overrides the table's inner loop (network epochs on the synthetic set between updates).

  Raises:
    ConfigError: `ipc` is not in the table and not both loops are given, or a loop is below 1.
  """
  if outer_loop is None or inner_loop is None:
    if ipc not in LOOPS:
      table = ", ".join(f"{k}->{v}" for k, v in LOOPS.items())
      raise ConfigError(f"no reference (outer_loop, inner_loop) for ipc={ipc} (table: {table}); set both "
                        "outer_loop and inner_loop, e.g. (50, 10) or (100, 2) for larger IPC")
    table_outer, table_inner = LOOPS[ipc]
    outer_loop = table_outer if outer_loop is None else outer_loop
    inner_loop = table_inner if inner_loop is None else inner_loop
  if outer_loop < 1 or inner_loop < 1:
    raise ConfigError(f"outer_loop and inner_loop must be at least 1, got ({outer_loop}, {inner_loop})")
  return outer_loop, inner_loop


@dataclasses.dataclass(frozen=True, kw_only=True)
class GMConfig(matching.MatchingConfig):
  """DC/DSA settings; defaults are the reference's (main.py). See `matching.MatchingConfig` for the rest.

  Attributes:
    method: "dc" (no augmentation) or "dsa" (Siamese DSA in matching, per-sample DSA in inner training).
    lr_img: image learning rate (0.1).
    lr_net: SGD learning rate of the inner network training (0.01, no momentum).
    batch_train: batch of the inner network training (256).
    outer_loop: overrides the IPC table's outer loop.
    inner_loop: overrides the IPC table's inner loop.
    metric: gradient distance, "ours" | "mse" | "cos" (`matching.match_distance`).
    mdt_inner: also mask the synthetic images in the inner network training (default False).
    loop_driver: "scan" (one jitted function, loops as `lax.scan`), "python" (Python loops over jitted outer
      and inner steps) or "auto" (default: "python" on the CPU backend, "scan" elsewhere; see the module
      docstring for why).
  """

  method: str = "dc"
  lr_img: float = 0.1
  lr_net: float = 0.01
  batch_train: int = 256
  outer_loop: int | None = None
  inner_loop: int | None = None
  metric: str = "ours"
  mdt_inner: bool = False
  loop_driver: str = "auto"

  def __post_init__(self):
    super().__post_init__()
    if self.method not in METHODS:
      raise ConfigError(f"unknown gradient-matching method '{self.method}'; use one of {METHODS}")
    if self.metric not in matching.METRICS:
      raise ConfigError(f"unknown matching metric '{self.metric}'; use one of {matching.METRICS}")
    if self.loop_driver not in LOOP_DRIVERS:
      raise ConfigError(f"unknown loop_driver '{self.loop_driver}'; use one of {LOOP_DRIVERS}")
    if self.lr_net <= 0 or self.batch_train < 1:
      raise ConfigError(f"need lr_net > 0 and batch_train >= 1, got {self.lr_net} and {self.batch_train}")
    # Validates the IPC table / overrides now rather than at the first trace.
    outer_inner_loops(self.ipc, outer_loop=self.outer_loop, inner_loop=self.inner_loop)

  @property
  def loops(self) -> tuple[int, int]:
    return outer_inner_loops(self.ipc, outer_loop=self.outer_loop, inner_loop=self.inner_loop)

  @property
  def strategy(self) -> str:
    return self.dsa_strategy if self.method == "dsa" else "none"


def resolve_loop_driver(config: GMConfig) -> str:
  """"scan" or "python": `config.loop_driver`, with "auto" resolved for the default JAX backend."""
  if config.loop_driver != "auto":
    return config.loop_driver
  return "python" if jax.default_backend() == "cpu" else "scan"


def _cross_entropy(net: Network, state: Any, params: Any, images: jax.Array, labels: jax.Array) -> jax.Array:
  logits, _ = net.apply(params, state, images, train=True)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def matching_loss(net: Network, config: GMConfig, images: jax.Array, params: Any, real: jax.Array,
                  key: jax.Array, ratio: jax.typing.ArrayLike = 0.0) -> tuple[jax.Array, jax.Array]:
  """The gradient-matching objective at fixed network parameters.

  Args:
    net: a stateless network (`matching.require_stateless`).
    config: GM settings (method, metric, DSA, MDT, class map).
    images: (C * ipc, H, W, ch) synthetic images, class-major.
    params: network parameters.
    real: (C, B, H, W, ch) real batches.
    key: the step's matching key (DSA draw and MDT masks).
    ratio: MDT ratio (used unless `config.mdt == "off"`).

  Returns:
    (Σ_c distance_c, per-class distances (C,)); differentiable w.r.t. `images`. Each class's loss is the mean
    cross-entropy of its batch against label c; real gradients are constants (stop_gradient).
  """
  state = matching.require_stateless(net)
  grad_fn = jax.grad(lambda p, x, y: _cross_entropy(net, state, p, x, y))

  def criterion(real_c, syn_c, label):
    g_real = grad_fn(params, real_c, jnp.full(real_c.shape[:1], label))
    g_syn = grad_fn(params, syn_c, jnp.full(syn_c.shape[:1], label))
    return matching.match_distance(jax.lax.stop_gradient(g_real), g_syn, metric=config.metric)

  return matching.classwise_loss(criterion, config, images, real, key, jnp.asarray(ratio, jnp.float32))


def _inner_sgd(net: Network, config: GMConfig, params: Any, images: jax.Array, idx: jax.Array, key: jax.Array,
               ratio: jax.Array) -> Any:
  """One plain-SGD step (lr_net) of the inner loop on the synthetic images `images[idx]` (detached)."""
  state = matching.require_stateless(net)
  labels = jnp.asarray(class_major_labels(images.shape[0] // config.ipc, config.ipc))[idx]
  aug_key, mask_key = jax.random.split(key)
  x = dsa_augment(aug_key, jax.lax.stop_gradient(images)[idx], strategy=config.strategy, siamese=False,
                  params=config.dsa_params)
  if config.mdt_inner and config.mdt != "off":
    x = mask_inputs(mask_key, x, ratio, granularity=config.mdt_granularity)
  grads = jax.grad(lambda p: _cross_entropy(net, state, p, x, labels))(params)
  return jax.tree.map(lambda p, g: p - config.lr_net * g, params, grads)


def _epoch_plan(config: GMConfig, n: int, key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One inner epoch as a shuffled PyTorch DataLoader: (full batches (F, b), remainder (n - F b,), step keys).

  b = min(batch_train, n); the remainder batch (if any) uses the last of the F + 1 step keys.
  """
  batch = min(config.batch_train, n)
  full, remainder = divmod(n, batch)
  perm_key, step_key = jax.random.split(key)
  perm = jax.random.permutation(perm_key, n)
  keys = jax.random.split(step_key, full + (remainder > 0))
  return perm[:full * batch].reshape(full, batch), perm[full * batch:], keys


def _metrics(losses: jax.Array, ratios: jax.Array, num_classes: int) -> dict:
  losses = losses / num_classes
  return {"loss": jnp.mean(losses), "loss_per_step": losses, "mdt_ratio": jnp.mean(ratios)}


def make_gm_iteration(net: Network, config: GMConfig, *, mesh: Mesh | None = None
                      ) -> Callable[..., tuple[jax.Array, Any, dict]]:
  """Builds the DC/DSA iteration (see the module docstring for the steps, the drivers and the key schedule).

  Args:
    net: a stateless network, e.g. `models.build("convnet", ...)` with norm "instance" or "none".
    config: GM settings; `config.class_map="loop"` gives `per_class_loop_reference`; `config.loop_driver`
      picks one jitted function with `lax.scan` loops ("scan") or Python loops over jitted steps ("python").
    mesh: the devices (default: all, `parallel.make_mesh`); see "Data parallelism" in the module docstring.

  Returns:
    `iteration(images, opt_state, key, real) -> (images, opt_state, metrics)` where images are (C * ipc, H, W,
    ch) class-major, opt_state is `matching.image_optimizer(config).init(images)` (carried across iterations),
    real is a `matching.RealPool` on the device, and metrics = {"loss": mean per-class distance over the outer
    steps (the reference's loss_avg), "loss_per_step": (outer_loop,) per-class mean at each step,
    "mdt_ratio": mean ratio}. `images` and `opt_state` are donated. Both drivers draw the same keys.

  Raises:
    ConfigError: the network has batch statistics.
  """
  matching.require_stateless(net)
  outer, epochs = config.loops
  tx = matching.image_optimizer(config)
  mesh = parallel.make_mesh() if mesh is None else mesh
  repl = parallel.replicated(mesh)

  def start(key):
    net_key, steps_key = jax.random.split(key)
    return net.init(net_key)[0], steps_key

  def match_update(images, opt_state, params, real, steps_key, t):
    real_key, match_key, ratio_key, train_key = jax.random.split(jax.random.fold_in(steps_key, t), 4)
    ratio = matching.mdt_ratio(ratio_key, config)
    batch = parallel.split_along(matching.sample_real(real_key, real, config.batch_real), mesh, axis=1)
    images, opt_state, loss = matching.image_step(
        lambda x: matching_loss(net, config, x, params, batch, match_key, ratio), tx, images, opt_state)
    return images, opt_state, loss, ratio, train_key

  sgd = functools.partial(_inner_sgd, net, config)

  if resolve_loop_driver(config) == "scan":
    def train(params, images, key, ratio):
      def epoch(params, k):
        full_idx, rest_idx, keys = _epoch_plan(config, images.shape[0], k)
        params, _ = jax.lax.scan(lambda p, xs: (sgd(p, images, *xs, ratio), None), params,
                                 (full_idx, keys[:len(full_idx)]))
        if rest_idx.size:
          params = sgd(params, images, rest_idx, keys[-1], ratio)
        return params, None

      return jax.lax.scan(epoch, params, jax.random.split(key, epochs))[0]

    def iteration(images, opt_state, key, real: matching.RealPool):
      params, steps_key = start(key)

      def outer_step(carry, t):
        images, opt_state, params = carry
        images, opt_state, loss, ratio, train_key = match_update(
            images, opt_state, params, real, steps_key, t)
        params = jax.lax.cond(t < outer - 1, lambda p: train(p, images, train_key, ratio), lambda p: p,
                              params)
        return (images, opt_state, params), (loss, ratio)

      (images, opt_state, _), (losses, ratios) = jax.lax.scan(
          outer_step, (images, opt_state, params), jnp.arange(outer))
      return images, opt_state, _metrics(losses, ratios, real.images.shape[0])

    return jax.jit(iteration, in_shardings=repl, out_shardings=repl, donate_argnums=(0, 1))

  start_jit = jax.jit(start, in_shardings=repl, out_shardings=repl)
  match_jit = jax.jit(match_update, in_shardings=repl, out_shardings=repl, donate_argnums=(0, 1))
  sgd_jit = jax.jit(sgd, in_shardings=repl, out_shardings=repl, donate_argnums=(0,))
  plan_jit = jax.jit(functools.partial(_epoch_plan, config), static_argnums=(0,), in_shardings=repl,
                     out_shardings=repl)

  def iteration(images, opt_state, key, real: matching.RealPool):
    params, steps_key = start_jit(key)
    losses, ratios = [], []
    for t in range(outer):
      images, opt_state, loss, ratio, train_key = match_jit(images, opt_state, params, real, steps_key, t)
      losses.append(loss)
      ratios.append(ratio)
      if t == outer - 1:
        break
      for epoch_key in jax.random.split(train_key, epochs):
        full_idx, rest_idx, keys = plan_jit(images.shape[0], epoch_key)
        for b in range(len(full_idx)):
          params = sgd_jit(params, images, full_idx[b], keys[b], ratio)
        if rest_idx.size:
          params = sgd_jit(params, images, rest_idx, keys[-1], ratio)
    return images, opt_state, _metrics(jnp.stack(losses), jnp.stack(ratios), real.images.shape[0])

  return iteration


def per_class_loop_reference(net: Network, config: GMConfig) -> Callable[..., tuple[jax.Array, Any, dict]]:
  """`make_gm_iteration` with a Python loop over classes instead of vmap (same keys, same maths)."""
  return make_gm_iteration(net, dataclasses.replace(config, class_map="loop"))
