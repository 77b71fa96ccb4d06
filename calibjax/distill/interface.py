"""The interface every distillation method implements, so one driver runs, checkpoints and resumes any of them.

A `Distiller` is three functions over one checkpointable `carry` pytree (arrays only; it holds the synthetic
set and every optimiser state, so saving the carry saves the whole run):

- `init(key) -> carry`: the initial synthetic set and optimiser states;
- `step(carry, key) -> (carry, metrics)`: ONE distillation iteration (the references' outer loop body), metrics
  a dict of scalars (and small arrays) for the log;
- `synset(carry) -> SyntheticSet`: the current synthetic set (what `evaluate` trains on).

The driver derives iteration i's key as `fold_in(root, i)`, so a resumed run repeats exactly the iterations an
uninterrupted run would.
"""

from typing import Any, Callable, NamedTuple

import jax

from calibjax.distill.synthetic import SyntheticSet


class Distiller(NamedTuple):
  """One distillation method as pure functions over a checkpointable carry (see the module docstring)."""

  init: Callable[[jax.Array], Any]
  step: Callable[[Any, jax.Array], tuple[Any, dict]]
  synset: Callable[[Any], SyntheticSet]
