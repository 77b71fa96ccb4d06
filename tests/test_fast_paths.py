"""The CPU fast paths (calibjax.models.fast_paths) against the plain layers: values, first and second derivatives,
also vmapped over weights as the evaluation ensembles run them."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calibjax import models
from calibjax.models import fast_paths

CONVS = ((1, 3, 1, 3), (3, 1, 1, 3), (3, 1, 2, 3), (4, 0, 2, 1), (2, 1, 3, 3), (8, 1, 1, 3))  # C_in, pad, stride, k


def _plain_conv(x, kernel, padding, stride):
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), [(padding, padding)] * 2,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _plain_instance_norm(x, scale, bias, epsilon):
  norm = nnx.GroupNorm(x.shape[-1], num_groups=x.shape[-1], epsilon=epsilon, rngs=nnx.Rngs(0))
  norm.scale[...], norm.bias[...] = scale, bias
  return norm(x)


def assert_close(got, want, rel=1e-5):
  """Equal within `rel` of the largest magnitude in `want` (float32 sums in a different order)."""
  want = np.asarray(want)
  np.testing.assert_allclose(got, want, rtol=0, atol=rel * max(np.abs(want).max(), 1.0))


def _inputs(channels, kernel, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(keys[0], (16, 9, 11, channels))  # 16 samples: the kernel gradient is chunked
  w = jax.random.normal(keys[1], (kernel, kernel, channels, 5)) / kernel
  return x, w


@pytest.mark.parametrize("channels,padding,stride,kernel", CONVS)
def test_patch_conv_values_and_gradients_equal_lax_conv(channels, padding, stride, kernel):
  x, w = _inputs(channels, kernel)
  fast = lambda x, w: fast_paths.patch_conv(x, w, padding, stride)
  plain = lambda x, w: _plain_conv(x, w, padding, stride)
  assert_close(fast(x, w), plain(x, w))
  probe = jax.random.normal(jax.random.key(7), plain(x, w).shape)
  grads = lambda f: jax.grad(lambda x, w: jnp.sum(jnp.tanh(f(x, w)) * probe), argnums=(0, 1))(x, w)
  for got, want in zip(grads(fast), grads(plain)):
    assert_close(got, want)


def _matching_loss(conv, x, w, target):
  """Gradient matching in miniature: the squared distance of a kernel gradient to a target, a function of x."""
  kernel_grad = jax.grad(lambda w: jnp.sum(jnp.sin(conv(x, w))))(w)
  return jnp.sum(jnp.square(kernel_grad - target))


@pytest.mark.parametrize("channels,padding,stride,kernel", CONVS[:3])
def test_patch_conv_second_derivatives_equal_lax_conv(channels, padding, stride, kernel):
  x, w = _inputs(channels, kernel, seed=1)
  target = jax.random.normal(jax.random.key(3), w.shape)
  fast = lambda x, w: fast_paths.patch_conv(x, w, padding, stride)
  plain = lambda x, w: _plain_conv(x, w, padding, stride)
  got = jax.grad(_matching_loss, argnums=(1, 2))(fast, x, w, target)
  want = jax.grad(_matching_loss, argnums=(1, 2))(plain, x, w, target)
  for g, v in zip(got, want):
    assert_close(g, v, rel=1e-4)
    assert np.abs(np.asarray(v)).max() > 1e-2  # the check has something to compare


def test_patch_conv_vmapped_over_weights_equals_lax_conv():
  """Evaluation ensembles vmap networks, weights included: values and both gradients per member."""
  xs = jax.random.normal(jax.random.key(0), (4, 2, 8, 8, 3))
  ws = jax.random.normal(jax.random.key(1), (4, 3, 3, 3, 6))
  def grads(conv):
    return jax.vmap(jax.grad(lambda x, w: jnp.sum(jnp.cos(conv(x, w))), argnums=(0, 1)))(xs, ws)
  fast = lambda x, w: fast_paths.patch_conv(x, w, 1, 1)
  plain = lambda x, w: _plain_conv(x, w, 1, 1)
  assert_close(jax.vmap(fast)(xs, ws), jax.vmap(plain)(xs, ws))
  for got, want in zip(grads(fast), grads(plain)):
    assert_close(got, want)


def test_instance_norm_values_and_derivatives_equal_group_norm():
  keys = jax.random.split(jax.random.key(0), 4)
  x = 2.0 + 3.0 * jax.random.normal(keys[0], (3, 6, 5, 4))
  scale, bias = 1.0 + jax.random.normal(keys[1], (4,)), jax.random.normal(keys[2], (4,))
  probe = jax.random.normal(keys[3], x.shape)
  fast = lambda x, s, b: fast_paths.instance_norm(x, s, b, 1e-5)
  plain = lambda x, s, b: _plain_instance_norm(x, s, b, 1e-5)
  assert_close(fast(x, scale, bias), plain(x, scale, bias))
  loss = lambda f: lambda x, s, b: jnp.sum(jnp.tanh(f(x, s, b)) * probe)
  for got, want in zip(jax.grad(loss(fast), argnums=(0, 1, 2))(x, scale, bias),
                       jax.grad(loss(plain), argnums=(0, 1, 2))(x, scale, bias)):
    assert_close(got, want)
  # Second order: the squared gradient norm w.r.t. the scale, differentiated w.r.t. x.
  second = lambda f: jax.grad(lambda x: jnp.sum(jnp.square(jax.grad(loss(f), argnums=1)(x, scale, bias))))(x)
  assert_close(second(fast), second(plain), rel=1e-4)


def test_convnet_step_and_matching_gradient_equal_the_plain_layers(monkeypatch):
  """A whole ConvNet: logits, parameter gradients and a gradient-matching image gradient with and without the
  fast paths (the plain network: nnx.Conv's lax conv and nnx.GroupNorm)."""
  net = models.build("convnet", num_classes=4, input_shape=(12, 12, 1), width=8, depth=2)
  params, state = net.init(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (6, 12, 12, 1))
  labels = jnp.arange(6) % 4
  def results():
    def loss(params, x):
      logits, _ = net.apply(params, state, x, train=True)
      return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(6), labels])
    target = jax.tree.map(jnp.ones_like, params)
    matching = lambda x: sum(jnp.sum(jnp.square(g - t)) for g, t in
                             zip(jax.tree.leaves(jax.grad(loss)(params, x)), jax.tree.leaves(target)))
    return net.apply(params, state, x)[0], jax.grad(loss)(params, x), jax.grad(matching)(x)
  fast = results()
  monkeypatch.setattr(fast_paths, "use_matmul", lambda conv: False)
  from calibjax.models import convnet
  monkeypatch.setattr(convnet, "use_matmul", lambda conv: False)
  monkeypatch.setattr(convnet, "instance_norm", _plain_instance_norm)
  plain = results()
  for got, want in zip(jax.tree.leaves(fast), jax.tree.leaves(plain)):
    assert_close(got, want, rel=1e-4)


def test_pool2x2_equals_flax_pooling():
  x = jax.random.normal(jax.random.key(0), (2, 7, 9, 3))
  np.testing.assert_allclose(fast_paths.pool2x2(x, "avg"), nnx.avg_pool(x, (2, 2), strides=(2, 2)), atol=1e-6)
  np.testing.assert_array_equal(fast_paths.pool2x2(x, "max"), nnx.max_pool(x, (2, 2), strides=(2, 2)))
