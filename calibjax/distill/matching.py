"""What gradient matching (DC/DSA) and distribution matching (DM) share: the gradient distance, the real-data
pool, the per-class Siamese views with the MDT mask, and the map over classes.

Per-class work is one function of one class's real batch and synthetic images, mapped over classes either by
`jax.vmap` (`class_map="vmap"`, the default: vmap over `class_chunk` classes at a time inside `lax.map`, by
default one on the CPU backend and all of them elsewhere) or by a Python loop unrolled inside the same jitted function (`class_map="loop"`,
the reference's loop, kept for benchmarks and for testing that both agree).

Randomness of one matching step comes from one key, split as `aug_key, mask_key = jax.random.split(key)`:

- DSA (Siamese): by default ONE augmentation key per step is shared by every class, and the real and the
  synthetic batch of a class are augmented with it, so all classes see the same family with the same
  parameters. The reference draws a new seed per class instead; with `dsa_per_class_keys=True` class c uses
  `jax.random.split(aug_key, C)[c]`, which is the reference's distribution but makes the family index a
  batched value under `vmap`, so `lax.switch` runs every family of the strategy and selects (see
  `calibjax.data.augment.dsa`); the shared key avoids that cost.
- MDT mask: class c uses `jax.random.split(mask_key, C)[c]` (independent masks per class) and the step's
  ratio.

MDT (Masked Distillation Training; paper 000 Sec. 4.2, Eq. 6): a Bernoulli input mask
(`calibjax.masks.mask_inputs`) on the SYNTHETIC images right before they enter the network inside the
matching criterion; the real batch is never masked (Eq. 6 and Sec. 5.6; Algorithm 1 line 6 writes the mask on
the real sample, the equations are the majority reading). The mask is applied AFTER the DSA augmentation: the
network then sees exact zeros at a fraction r of its inputs, which is what Eq. 6 writes (Mask(B', r) is the
network input). Masking before the augmentation would let brightness/contrast shift the zeros and scale/rotate
interpolate them away, so the effective ratio would depend on the drawn family. Modes: "off"; "fixed" (ratio
`mdt_ratio`, 0.1 in the paper); "dynamic" (MDT^ds: r ~ U[0, mdt_ratio] drawn once per matching step and shared
by all classes; the paper does not say how often r is redrawn).
"""

import dataclasses
import sys
from typing import Any, Callable, NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from calibjax.data.augment.dsa import DEFAULT_STRATEGY, DSAParams, dsa_augment, strategy_families
from calibjax.data.sampling import class_indices
from calibjax.errors import ConfigError
from calibjax.masks import GRANULARITIES, mask_inputs, sample_ratio
from calibjax.models import Network

METRICS = ("ours", "mse", "cos")
MDT_MODES = ("off", "fixed", "dynamic")
CLASS_MAPS = ("vmap", "loop")
# The references' denominator guard in every cosine.
_EPS = 1e-6


# ------------------------------------------------------------------------------------------------ distance


def _safe_norm(x: jax.Array, axis: int | None = None) -> jax.Array:
  # jnp.linalg.norm has a NaN gradient at 0 (d sqrt at 0); an all-zero gradient row occurs (a dead unit, a
  # fully masked input), and PyTorch's norm has gradient 0 there, which this reproduces.
  sq = jnp.sum(x * x, axis=axis)
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def _output_rows(g: jax.Array) -> jax.Array:
  """(..., out) -> (out, prod(...)): one row per output unit.

  Flax kernels keep the output axis last (conv (kh, kw, in, out), dense (in, out)); the reference's PyTorch
  weights keep it first ((out, in, kh, kw), (out, in)). The order of entries within a row differs from the
  reference's, which no cosine can see.
  """
  return jnp.moveaxis(g, -1, 0).reshape(g.shape[-1], -1)


def match_distance(g_real: Any, g_syn: Any, *, metric: str = "ours") -> jax.Array:
  """Distance between two gradient pytrees of the same network (the reference's `match_loss`).

  Args:
    g_real: gradients of the loss on the real batch, a pytree (e.g. the ConvNet's params structure).
    g_syn: gradients on the synthetic batch, same structure and shapes.
    metric: "ours" (DC's `distance_wb` summed over layers): for every parameter with ndim >= 2, the gradient
      is viewed as one row per OUTPUT unit -- conv kernels (kh, kw, in, out) -> (out, kh*kw*in), dense
      kernels (in, out) -> (out, in) -- and the distance is sum over rows of 1 - <r, s> / (|r| |s| + 1e-6).
      Parameters with ndim 1 (biases, norm scale and bias) contribute 0, as in the reference. An all-zero
      row contributes 1 (its cosine is 0).
      "mse": sum of squared differences of ALL gradients flattened into one vector (biases included).
      "cos": 1 - cosine of the two flattened vectors (biases included), eps 1e-6 in the denominator.

  Returns:
    float32 scalar. Gradients are finite everywhere, also where a row is all zero.
  """
  real, syn = jax.tree.leaves(g_real), jax.tree.leaves(g_syn)
  if [r.shape for r in real] != [s.shape for s in syn]:
    raise ValueError(f"gradient trees differ: {[r.shape for r in real]} vs {[s.shape for s in syn]}")
  if metric == "ours":
    total = jnp.zeros((), jnp.float32)
    for r, s in zip(real, syn):
      if r.ndim < 2:
        continue
      r, s = _output_rows(r), _output_rows(s)
      cosine = jnp.sum(r * s, axis=-1) / (_safe_norm(r, axis=-1) * _safe_norm(s, axis=-1) + _EPS)
      total = total + jnp.sum(1.0 - cosine)
    return total
  if metric not in METRICS:
    raise ConfigError(f"unknown matching metric '{metric}'; use one of {METRICS}")
  r = jnp.concatenate([x.reshape(-1) for x in real])
  s = jnp.concatenate([x.reshape(-1) for x in syn])
  if metric == "mse":
    return jnp.sum((s - r) ** 2)
  return 1.0 - jnp.sum(r * s) / (_safe_norm(r) * _safe_norm(s) + _EPS)


# ---------------------------------------------------------------------------------------------- real data


class RealPool(NamedTuple):
  """The real training set, class-major and padded, so per-class batches are drawn inside jitted code.

  Attributes:
    images: float32 (C, n_max, H, W, ch); rows >= counts[c] of class c are zero padding.
    counts: int32 (C,), examples of each class.

  Memory: the whole training set lives on the device (Fashion-MNIST: 60000 x 28 x 28 x 4 B = 188 MB; CIFAR-10:
  614 MB), and a matching step gathers its (C, batch_real, ...) batch from it, so no per-step host transfer
  and no (outer_loop, C, batch_real, ...) tensor is ever built (400 MB at IPC 50 on Fashion-MNIST).
  """

  images: jax.Array
  counts: jax.Array


def make_real_pool(images: np.ndarray, labels: np.ndarray, *, num_classes: int, batch_real: int) -> RealPool:
  """Builds a `RealPool` (host numpy arrays; `jax.device_put` it once) from the normalised training set.

  Args:
    images: float32 (N, H, W, ch), in the network's input space.
    labels: int (N,) in [0, num_classes).
    num_classes: C.
    batch_real: the per-class batch the pool must supply (256 in the references).

  Raises:
    ConfigError: a class has fewer than `batch_real` examples (the references would silently use fewer).
  """
  per_class = class_indices(np.asarray(labels), num_classes)
  counts = np.array([len(idx) for idx in per_class], np.int32)
  if counts.min() < batch_real:
    raise ConfigError(f"class {int(counts.argmin())} has {counts.min()} training images, fewer than "
                      f"batch_real={batch_real}; lower batch_real")
  images = np.asarray(images, np.float32)
  pool = np.zeros((num_classes, counts.max()) + images.shape[1:], np.float32)
  for c, idx in enumerate(per_class):
    pool[c, :len(idx)] = images[idx]
  return RealPool(images=pool, counts=counts)


def sample_real(key: jax.Array, pool: RealPool, batch: int) -> jax.Array:
  """`batch` distinct random images of every class (the reference's `get_images(c, batch)`).

  Class c takes the `batch` largest of iid uniforms over its valid rows (padding gets -1), i.e. a uniformly
  random subset in random order, with key `jax.random.split(key, C)[c]`.

  Args:
    key: PRNG key.
    pool: the real data; `pool.counts >= batch` (checked by `make_real_pool`).
    batch: images per class (static).

  Returns:
    float32 (C, batch, H, W, ch).
  """
  num_classes, n_max = pool.images.shape[:2]

  def one(k, images, count):
    scores = jnp.where(jnp.arange(n_max) < count, jax.random.uniform(k, (n_max,)), -1.0)
    return images[jax.lax.top_k(scores, batch)[1]]

  return jax.vmap(one)(jax.random.split(key, num_classes), pool.images, pool.counts)


# ------------------------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True, kw_only=True)
class MatchingConfig:
  """Settings shared by gradient and distribution matching (plain Python values; hashable, so static).

  Attributes:
    ipc: synthetic images per class.
    lr_img: SGD learning rate of the synthetic images.
    momentum: SGD momentum of the synthetic images (0.5 in DC/DSA/DM).
    batch_real: real images per class per matching step (256).
    dsa_strategy: DSA families, '_'-separated; 'none' disables augmentation.
    dsa_params: DSA strengths (`align_corners=False` as DC/DSA/DM).
    dsa_per_class_keys: one Siamese augmentation draw per class (the reference) instead of one per step
      shared by all classes (default; see the module docstring for the cost).
    mdt: MDT mode, "off" | "fixed" | "dynamic".
    mdt_ratio: the fixed ratio r, or r_max of the dynamic mode (0.1 in the paper).
    mdt_granularity: "element" (the MTS code's mask) or "pixel" (shared across channels).
    class_map: "vmap" (default) or "loop" (Python loop over classes in the same jitted function).
    class_chunk: with "vmap", vmap over chunks of this many classes, one chunk after another
      (`jax.lax.map(batch_size=...)`) to bound memory; None (default): one class at a time on the CPU
      backend, all at once elsewhere (`default_class_chunk`).
  """

  ipc: int
  lr_img: float
  momentum: float = 0.5
  batch_real: int = 256
  dsa_strategy: str = DEFAULT_STRATEGY
  dsa_params: DSAParams = DSAParams()
  dsa_per_class_keys: bool = False
  mdt: str = "off"
  mdt_ratio: float = 0.1
  mdt_granularity: str = "element"
  class_map: str = "vmap"
  class_chunk: int | None = None

  def __post_init__(self):
    if self.ipc < 1:
      raise ConfigError(f"ipc must be at least 1, got {self.ipc}")
    if self.lr_img <= 0:
      raise ConfigError(f"lr_img must be positive, got {self.lr_img}")
    if not 0.0 <= self.momentum < 1.0:
      raise ConfigError(f"momentum must lie in [0, 1), got {self.momentum}")
    if self.batch_real < 1:
      raise ConfigError(f"batch_real must be at least 1, got {self.batch_real}")
    if self.mdt not in MDT_MODES:
      raise ConfigError(f"unknown mdt mode '{self.mdt}'; use one of {MDT_MODES}")
    if not 0.0 <= self.mdt_ratio <= 1.0:
      raise ConfigError(f"mdt_ratio must lie in [0, 1], got {self.mdt_ratio}")
    if self.mdt_granularity not in GRANULARITIES:
      raise ConfigError(f"unknown mdt_granularity '{self.mdt_granularity}'; use one of {GRANULARITIES}")
    if self.class_chunk is not None and self.class_chunk < 1:
      raise ConfigError(f"class_chunk must be None or at least 1, got {self.class_chunk}")
    if self.class_map not in CLASS_MAPS:
      raise ConfigError(f"unknown class_map '{self.class_map}'; use one of {CLASS_MAPS}")
    strategy_families(self.dsa_strategy)

  @property
  def strategy(self) -> str:
    """The DSA strategy actually applied ('none' when augmentation is off)."""
    return self.dsa_strategy


def image_optimizer(config: MatchingConfig) -> optax.GradientTransformation:
  """SGD with momentum on the synthetic images (PyTorch's SGD: buf = m * buf + g, x -= lr * buf).

  Its state is carried across iterations (the references create the image optimiser once per experiment).
  """
  return optax.sgd(config.lr_img, momentum=config.momentum or None)


def mdt_ratio(key: jax.Array, config: MatchingConfig) -> jax.Array:
  """The mask ratio of one matching step: 0 ("off"), `mdt_ratio` ("fixed") or U[0, mdt_ratio] ("dynamic")."""
  if config.mdt == "dynamic":
    return sample_ratio(key, config.mdt_ratio)
  return jnp.float32(config.mdt_ratio if config.mdt == "fixed" else 0.0)


def require_stateless(net: Network) -> Any:
  """The (empty) model state of `net`; raises for models with state such as batch norm.

  The matching methods here differentiate `apply` as a pure function of the parameters. Batch norm would need
  the reference's extra steps (GM: a forward of 16 real images per class, then frozen statistics; DM: one
  forward of all classes concatenated), which are not implemented.

  Raises:
    ConfigError: the model carries state (batch statistics).
  """
  _, state = jax.eval_shape(net.init, jax.random.key(0))
  if jax.tree.leaves(state):
    raise ConfigError(f"model '{net.name}' has batch statistics; gradient and distribution matching here "
                      "support norm=instance, group or none")
  return nnx.State({})


# ----------------------------------------------------------------------------------------- per-class map


def map_classes(fn: Callable[..., Any], in_axes: tuple[int | None, ...], *, class_map: str,
                class_chunk: int | None = None) -> Callable[..., Any]:
  """Maps `fn` over the leading (class) axis of the arguments whose `in_axes` entry is 0.

  Args:
    fn: the per-class function.
    in_axes: 0 (mapped over the leading axis) or None (shared) per positional argument.
    class_map: "vmap": `jax.lax.map(..., batch_size=class_chunk)`, i.e. vmap over chunks of `class_chunk`
      classes run one chunk after another (the peak memory of one chunk), plain `jax.vmap` when the chunk
      holds every class; "loop": a Python loop whose outputs are stacked along axis 0.
    class_chunk: classes per vmapped chunk; None: `default_class_chunk()`.
  """
  if class_map == "loop":
    def looped(*args):
      num = next(jax.tree.leaves(a)[0].shape[0] for a, ax in zip(args, in_axes) if ax == 0)
      outs = [fn(*(a if ax is None else jax.tree.map(lambda x: x[c], a) for a, ax in zip(args, in_axes)))
              for c in range(num)]
      return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

    return looped
  chunk = default_class_chunk() if class_chunk is None else class_chunk

  def chunked(*args):
    mapped = tuple(a for a, ax in zip(args, in_axes) if ax == 0)
    if chunk >= jax.tree.leaves(mapped)[0].shape[0]:
      return jax.vmap(fn, in_axes=in_axes)(*args)

    def call(mapped_slice):
      it = iter(mapped_slice)
      return fn(*(a if ax is None else next(it) for a, ax in zip(args, in_axes)))

    return jax.lax.map(call, mapped, batch_size=chunk)

  return chunked


def default_class_chunk() -> int:
  """Classes per vmapped chunk when none is configured: one at a time on the CPU backend, all at once elsewhere.

  On two CPU cores a DC iteration at IPC 1 (Fashion-MNIST, width 128) peaks at 2.2 GB resident one class at a
  time against 9.1 GB with all ten classes vmapped, and is no slower (there is no idle parallel hardware for the
  batched form to fill); accelerators have it, and the memory.
  """
  return 1 if jax.default_backend() == "cpu" else sys.maxsize


def classwise_loss(criterion: Callable[[jax.Array, jax.Array, jax.Array], jax.Array], config: MatchingConfig,
                   images: jax.Array, real: jax.Array, key: jax.Array, ratio: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
  """Σ_c criterion(real view of c, synthetic view of c, c) with Siamese DSA and the MDT mask.

  Args:
    criterion: (real_c (B, H, W, ch), syn_c (ipc, H, W, ch), label int32 scalar) -> scalar.
    config: supplies ipc, the DSA settings, the MDT mode and granularity, and the class map.
    images: (C * ipc, H, W, ch) synthetic images, class-major.
    real: (C, B, H, W, ch) real batches, unmasked.
    key: the step's key (split as described in the module docstring).
    ratio: the MDT ratio (ignored when `config.mdt == "off"`).

  Returns:
    (total, per_class (C,)).
  """
  num_classes = real.shape[0]
  if images.shape[0] != num_classes * config.ipc:
    raise ConfigError(f"{images.shape[0]} synthetic images do not make {config.ipc} per class for "
                      f"{num_classes} classes")
  syn = images.reshape((num_classes, config.ipc) + images.shape[1:])
  aug_key, mask_key = jax.random.split(key)
  aug_keys = jax.random.split(aug_key, num_classes) if config.dsa_per_class_keys else aug_key

  def one(syn_c, real_c, label, aug_k, mask_k):
    real_c = dsa_augment(aug_k, real_c, strategy=config.strategy, siamese=True, params=config.dsa_params)
    syn_c = dsa_augment(aug_k, syn_c, strategy=config.strategy, siamese=True, params=config.dsa_params)
    if config.mdt != "off":
      syn_c = mask_inputs(mask_k, syn_c, ratio, granularity=config.mdt_granularity)
    return criterion(real_c, syn_c, label)

  in_axes = (0, 0, 0, 0 if config.dsa_per_class_keys else None, 0)
  per_class = map_classes(one, in_axes, class_map=config.class_map, class_chunk=config.class_chunk)(
      syn, real, jnp.arange(num_classes, dtype=jnp.int32), aug_keys, jax.random.split(mask_key, num_classes))
  return jnp.sum(per_class), per_class


def image_step(loss_fn: Callable[[jax.Array], tuple[jax.Array, Any]], tx: optax.GradientTransformation,
               images: jax.Array, opt_state: Any) -> tuple[jax.Array, Any, jax.Array]:
  """One optimiser step on the synthetic images; returns (images, opt_state, loss)."""
  (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(images)
  updates, opt_state = tx.update(grads, opt_state, images)
  return optax.apply_updates(images, updates), opt_state, loss
