"""ConvNet: golden parameter counts of the references, PyTorch-default initialisation, pure functional use."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calibjax import models
from calibjax.errors import ConfigError, UnknownNameError


@pytest.mark.parametrize("input_shape,num_classes,expected", [
    ((32, 32, 3), 10, 320_010),   # DC/DSA/DM/MTT ConvNet on CIFAR-10 (docs/protocols.md §3.1)
    ((32, 32, 3), 100, 504_420),  # ... on CIFAR-100
    ((28, 28, 1), 10, 317_706),   # 1-channel inputs are padded by 3: 28 px behaves as 32 px
])
def test_convnet_parameter_counts(input_shape, num_classes, expected):
  net = models.build("convnet", num_classes=num_classes, input_shape=input_shape)
  params, _ = net.init(jax.random.key(0))
  assert models.count_params(params) == expected


def test_feature_size_matches_reference():
  net = models.build("convnet", num_classes=10, input_shape=(28, 28, 1))
  params, state = net.init(jax.random.key(0))
  assert net.embed(params, state, jnp.zeros((2, 28, 28, 1))).shape == (2, 128 * 4 * 4)


def test_torch_init_bounds():
  net = models.build("convnet", num_classes=10, input_shape=(32, 32, 3))
  params, _ = net.init(jax.random.key(1))
  kernel = np.asarray(params["convs"][1]["kernel"].value)
  bias = np.asarray(params["convs"][1]["bias"].value)
  bound = 1 / math.sqrt(128 * 9)
  assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.95 * bound
  assert np.abs(bias).max() <= bound and np.abs(bias).std() > 0  # not Flax's zero bias
  # Kaiming-uniform(a=sqrt(5)) is U(-b, b): its std is b / sqrt(3).
  assert kernel.std() == pytest.approx(bound / math.sqrt(3), rel=0.02)


def test_init_is_pure_and_vmappable():
  net = models.build("convnet", num_classes=10, input_shape=(28, 28, 1), width=8)
  batch = jax.vmap(net.init)(jax.random.split(jax.random.key(0), 3))[0]
  single = net.init(jax.random.split(jax.random.key(0), 3)[1])[0]
  for a, b in zip(jax.tree.leaves(batch), jax.tree.leaves(single)):
    np.testing.assert_allclose(a[1], b, rtol=1e-6)
  assert not np.allclose(jax.tree.leaves(batch)[0][0], jax.tree.leaves(batch)[0][1])


def test_batch_norm_state_updates_only_in_train_mode():
  net = models.build("convnet", num_classes=10, input_shape=(28, 28, 1), width=8, norm="batch")
  params, state = net.init(jax.random.key(0))
  x = 3.0 + jax.random.normal(jax.random.key(1), (8, 28, 28, 1))
  _, eval_state = net.apply(params, state, x, train=False)
  _, train_state = net.apply(params, state, x, train=True)
  same = lambda a, b: all(np.allclose(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert same(eval_state, state) and not same(train_state, state)


def test_unknown_model_and_bad_option():
  with pytest.raises(UnknownNameError, match="unknown model 'resnet9000'"):
    models.build("resnet9000", num_classes=10, input_shape=(28, 28, 1))
  with pytest.raises(ValueError, match="norm must be one of"):
    models.build("convnet", num_classes=10, input_shape=(28, 28, 1), norm="weird")


def test_convnet_layer_features_are_its_blocks_then_its_logits():
  net = models.build("convnet", num_classes=3, input_shape=(8, 8, 1), width=4, depth=2)
  params, state = net.init(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (5, 8, 8, 1))
  layers = net.layer_features(params, state, x)
  assert [f.shape for f in layers] == [(5, 6 * 6 * 4), (5, 3 * 3 * 4), (5, 3)]
  np.testing.assert_array_equal(layers[-2], net.embed(params, state, x))
  np.testing.assert_array_equal(layers[-1], net.apply(params, state, x)[0])
  resnet = models.build("resnet8", num_classes=3, input_shape=(8, 8, 3))
  with pytest.raises(ConfigError, match="ConvNet only"):
    resnet.layer_features(*resnet.init(jax.random.key(0)), jnp.zeros((1, 8, 8, 3)))
