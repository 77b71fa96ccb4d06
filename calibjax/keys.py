"""The named PRNG streams every method derives its randomness from.

A run has one root key, `jax.random.key(config.seed)`; each purpose below folds in its own number, so a stream
means the same thing in every method and two purposes never share randomness. Streams that need one key per
network of a vmapped group (`evaluate`'s K networks) split the stream's key into K. Steps and iterations fold
their counter into the `steps` stream (`fold_in(steps_key, t)`), so a resumed run draws what an uninterrupted one
draws.
"""

import jax

STREAMS = {
    "init": 0,  # network parameters, the initial synthetic set
    "steps": 1,  # per-step randomness of training and distillation (augmentation, masks, sampling)
    "order": 2,  # the order of the training examples (evaluate's per-network shuffles)
    "calibration": 3,  # the masks of Masked Temperature Scaling and its ratio selection
    "objective": 4,  # the initial parameters and buffers of a training objective (CRD heads, memory banks)
    "analysis": 5,  # post-hoc studies: masked-input logit histograms, noise of out-of-distribution sets
}


def stream(seed: int, purpose: str) -> jax.Array:
  """The key of `purpose` (a name of `STREAMS`) for the run seeded with `seed`."""
  return jax.random.fold_in(jax.random.key(seed), STREAMS[purpose])


def streams(seed: int, purpose: str, count: int) -> jax.Array:
  """`count` independent keys of `purpose`, one per member of a vmapped group (shape (count,))."""
  return jax.random.split(stream(seed, purpose), count)
