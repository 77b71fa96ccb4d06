"""CIFAR KD zoo: golden parameter counts of the RepDistiller zoo, shapes, batch norm, initialisation."""

import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calibjax import models
from calibjax.errors import ConfigError
from calibjax.models import layers

# CIFAR-100 (100 classes, 32x32x3) parameter counts of RepDistiller's models (HobbitLong/RepDistiller
# models/*.py; mdistiller's CIFAR zoo is the same), counted by hand from the PyTorch definitions: conv weights
# (no bias except VGG), BN scale + shift, head weight + bias. They agree with the commonly quoted sizes
# (resnet56 0.86M, resnet110 1.73M, resnet8x4 1.23M, resnet32x4 7.43M, wrn_40_2 2.26M, wrn_16_2 0.70M,
# wrn_40_1 0.57M, vgg8 3.96M, vgg13 9.46M, MobileNetV2 0.81M, ShuffleV1 0.95M, ShuffleV2 1.36M, ResNet50
# 23.71M); paper 003 quotes WRN-40-2 2.24M, WRN-40-1 0.56M and ResNet-50 23.5M, the 10-class sizes.
CIFAR100_PARAMS = {
    "resnet8": 83_892,
    "resnet14": 181_108,
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet44": 667_188,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "wrn_16_1": 180_916,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028,
    "vgg11": 9_277_284,
    "vgg13": 9_462_180,
    "mobilenetv2": 812_836,
    "shufflev1": 949_258,
    "shufflev2": 1_355_528,
    "resnet18": 11_220_132,
    "resnet34": 21_328_292,
    "resnet50": 23_705_252,
    # DenseNet-BC as seed 003's KD code (pytorch-cifar100's densenet.py): stem 9·3·2k; per bottleneck on c
    # channels 2c + 4k·c + 2·4k + 4k·9·k; per transition 2c + c·floor(c/2); head 2c + 100c + 100. The quoted
    # sizes: 7.0M, 12.6M, 18.3M, 26.7M.
    "densenet121": 7_048_548,
    "densenet169": 12_643_172,
    "densenet201": 18_277_220,
    "densenet161": 26_681_188,
}
FEATURE_DIMS = {"resnet8x4": 256, "resnet32x4": 256, "wrn_16_1": 64, "wrn_40_1": 64, "wrn_16_2": 128,
                "wrn_40_2": 128, "vgg8": 512, "vgg11": 512, "vgg13": 512, "mobilenetv2": 1280,
                "shufflev1": 960, "shufflev2": 1024, "resnet18": 512, "resnet34": 512, "resnet50": 2048,
                "densenet121": 1024, "densenet169": 1664, "densenet201": 1920, "densenet161": 2208}
# Stem conv weights per input channel (kh * kw * out): the only parameters that depend on the input channels.
STEM_PER_CHANNEL = {"vgg8": 9 * 64, "vgg11": 9 * 64, "vgg13": 9 * 64, "resnet18": 9 * 64, "resnet34": 9 * 64,
                    "resnet50": 9 * 64, "resnet8x4": 9 * 32, "resnet32x4": 9 * 32, "shufflev1": 24,
                    "shufflev2": 24, "densenet121": 9 * 64, "densenet169": 9 * 64, "densenet201": 9 * 64,
                    "densenet161": 9 * 96}
BATCH = 2


def _abstract(name, num_classes, input_shape):
  """The module with abstract parameters, its logits and features for a batch: shapes only (eval_shape).

  The registered constructor is traced once; `models.build` + `Network.init` would trace it twice, and tracing
  dominates the cost of these tests (Network's pure functions are exercised by the batch-norm test below).
  """
  model = nnx.eval_shape(lambda: models.MODELS.get(name)(num_classes, input_shape, rngs=nnx.Rngs(0)))
  x = jax.ShapeDtypeStruct((BATCH, *input_shape), jnp.float32)
  logits, features = nnx.eval_shape(lambda m, x: (m(x, train=False), m.embed(x, train=False)), model, x)
  return models.count_params(nnx.state(model, nnx.Param)), logits.shape, features.shape, model.feature_dim


def test_every_zoo_name_is_registered():
  assert set(CIFAR100_PARAMS) <= set(models.MODELS.names())


@pytest.mark.parametrize("name", sorted(CIFAR100_PARAMS))
def test_cifar100_parameter_count_and_shapes(name):
  count, logits_shape, feature_shape, feature_dim = _abstract(name, 100, (32, 32, 3))
  assert count == CIFAR100_PARAMS[name]
  assert logits_shape == (BATCH, 100)
  assert feature_shape == (BATCH, FEATURE_DIMS.get(name, 64)) == (BATCH, feature_dim)


# DenseNet-169 / 201 / 161 differ from DenseNet-121 only in their block counts and growth, and their constructors
# are the slowest to trace (up to 9 s each): DenseNet-121 stands for them here.
@pytest.mark.parametrize("name", sorted(set(CIFAR100_PARAMS) - {"densenet169", "densenet201", "densenet161"}))
def test_fashion_mnist_input_shapes(name):
  """1-channel 28-px inputs: the stem reads 1 channel and the global pool absorbs the odd feature sizes."""
  count, logits_shape, _, feature_dim = _abstract(name, 10, (28, 28, 1))
  assert logits_shape == (BATCH, 10)
  # Only the stem's input channels (3 -> 1) and the head's classes (100 -> 10) change.
  assert count == CIFAR100_PARAMS[name] - 2 * STEM_PER_CHANNEL.get(name, 9 * 16) - 90 * (feature_dim + 1)


# One model per module (basic and bottleneck residual blocks, pre-activation WRN, VGG, inverted residuals,
# ShuffleNetV1 and V2 units), stages shortened where the constructor allows it: compiling the forward pass
# dominates the cost. Parameters are drawn with numpy: compiling the random initialisers would cost more.
@pytest.mark.parametrize("name,options", [
    ("resnet8", {}), ("resnet50", dict(blocks=(1, 1, 1, 1))), ("wrn_16_1", {}), ("vgg8", {}),
    ("mobilenetv2", dict(blocks=(1, 1, 1, 1, 1, 1, 1))), ("shufflev1", dict(blocks=(1, 2, 1))),
    ("shufflev2", dict(blocks=(1, 1, 1))), ("densenet121", dict(blocks=(1, 1), growth=4))])
def test_batch_norm_state_updates_only_in_train_mode(name, options):
  net = models.build(name, num_classes=10, input_shape=(28, 28, 1), **options)
  rng = np.random.default_rng(0)
  params, state = jax.eval_shape(net.init, jax.random.key(0))
  # Host arrays: jnp.ones & co. would compile one broadcast per shape.
  params = jax.tree.map(lambda a: (0.1 * rng.standard_normal(a.shape)).astype(a.dtype), params)
  # A DenseNet's state also holds its dropout stream (a key and a count), which is left as initialised.
  state = jax.tree.map(lambda a: jax.random.key(0) if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key) else
                       np.ones(a.shape, a.dtype), state)
  x = (2.0 + rng.standard_normal((4, 28, 28, 1))).astype(np.float32)
  forward = jax.jit(lambda p, s, x: (net.apply(p, s, x, train=False), net.apply(p, s, x, train=True)))
  (eval_logits, eval_state), (train_logits, train_state) = forward(params, state, x)
  old, evaluated, trained = ([(jax.tree_util.keystr(path), leaf) for path, leaf in
                               jax.tree_util.tree_leaves_with_path(s) if "mean" in jax.tree_util.keystr(path) or
                               "var" in jax.tree_util.keystr(path)] for s in (state, eval_state, train_state))
  assert len(old) > 0 and all(np.array_equal(a, b) for (_, a), (_, b) in zip(old, evaluated))
  # Every BN layer saw the batch: its running variance moved (a mean can stay ~0 when a BN output feeds
  # a linear conv, so the means are not checked).
  variances = [(a, b) for (path, a), (_, b) in zip(old, trained) if "var" in path]
  assert len(variances) == len(old) // 2 and all(not np.allclose(a, b) for a, b in variances)
  assert eval_logits.shape == train_logits.shape == (4, 10)
  assert np.isfinite(eval_logits).all() and np.isfinite(train_logits).all()


def test_initialisers_follow_the_reference_models():
  rngs = nnx.Rngs(0)
  # Kaiming-normal fan_out (RepDistiller ResNets, WRN, VGG, MobileNetV2): std sqrt(2 / (kh kw out)), zero
  # bias.
  conv = layers.conv(128, 256, 3, bias=True, rngs=rngs)
  assert float(conv.kernel[...].std()) == pytest.approx(math.sqrt(2 / (9 * 256)), rel=0.02)
  assert not np.asarray(conv.bias[...]).any()
  # PyTorch default (ShuffleNets): U(-b, b), b = 1 / sqrt(fan_in); a depthwise conv has fan_in 9.
  depthwise = np.asarray(layers.conv(64, 64, 3, groups=64, init="torch", rngs=rngs).kernel[...])
  assert depthwise.shape == (3, 3, 1, 64)
  assert np.abs(depthwise).max() <= 1 / 3 and depthwise.std() == pytest.approx(1 / 3 / math.sqrt(3), rel=0.1)
  # Heads: PyTorch default (ResNets, ShuffleNets), N(0, 0.01) with zero bias (VGG, MobileNetV2).
  head = layers.linear(256, 100, rngs=rngs)
  bound = 1 / math.sqrt(256)
  for values in (np.abs(np.asarray(head.kernel[...])), np.abs(np.asarray(head.bias[...]))):
    assert values.max() <= bound and values.max() > 0.9 * bound
  head = layers.linear(512, 100, weight="normal", bias="zeros", rngs=rngs)
  assert float(head.kernel[...].std()) == pytest.approx(0.01, rel=0.05)
  assert not np.asarray(head.bias[...]).any()
  with pytest.raises(ConfigError, match="conv init"):
    layers.conv(3, 8, 3, init="lecun", rngs=rngs)


def test_channel_shuffle_matches_the_pytorch_view_permute():
  x = np.arange(6.0).reshape(1, 1, 1, 6)
  # PyTorch: view(N, g, C/g) -> permute -> channels [0, 3, 1, 4, 2, 5] for g = 2.
  np.testing.assert_array_equal(layers.channel_shuffle(jnp.asarray(x), 2)[0, 0, 0], [0, 3, 1, 4, 2, 5])
  np.testing.assert_array_equal(layers.channel_shuffle(jnp.asarray(x), 3)[0, 0, 0], [0, 2, 4, 1, 3, 5])


def test_shortcut_average_pool_counts_the_padding():
  """ShuffleNetV1's AvgPool2d(3, 2, padding=1) divides by 9 also at the border (count_include_pad=True)."""
  out = layers.avg_pool3x3_stride2(jnp.ones((1, 5, 5, 1)))
  assert out.shape == (1, 3, 3, 1)
  corner, edge = 4 / 9, 6 / 9
  expected = [[corner, edge, corner], [edge, 1, edge], [corner, edge, corner]]
  np.testing.assert_allclose(out[0, :, :, 0], expected, rtol=1e-6)


def test_invalid_depth_is_a_config_error():
  with pytest.raises(ConfigError, match="6n \\+ 2"):
    models.build("resnet8", num_classes=10, input_shape=(32, 32, 3), depth=9)
  with pytest.raises(ConfigError, match="6n \\+ 4"):
    models.build("wrn_16_1", num_classes=10, input_shape=(32, 32, 3), depth=17)


def test_densenet_dropout_is_on_in_train_mode_only_and_follows_the_state():
  """Dropout 0.2 in every bottleneck: masks drawn from the stream kept in the model state, so the same state gives
  the same masks (a resumed run draws what an uninterrupted one does) and the next state new ones."""
  net = models.build("densenet121", num_classes=3, input_shape=(8, 8, 1), blocks=(2, 1), growth=4)
  params, state = net.init(jax.random.key(0))
  x = np.random.default_rng(1).standard_normal((4, 8, 8, 1)).astype(np.float32)
  train = jax.jit(lambda p, s: net.apply(p, s, x, train=True))
  first, next_state = train(params, state)
  np.testing.assert_array_equal(first, train(params, state)[0])
  assert not np.allclose(first, train(params, next_state)[0])
  # Another dropout seed changes the train-mode output, not the test-mode one.
  reseeded = jax.tree.map(lambda a: jax.random.key(7) if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key) else a,
                          state)
  assert not np.allclose(first, train(params, reseeded)[0])
  evaluate = jax.jit(lambda p, s: net.apply(p, s, x, train=False)[0])
  np.testing.assert_array_equal(evaluate(params, state), evaluate(params, reseeded))
