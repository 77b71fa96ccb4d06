"""Post-hoc calibrators as pure fit/apply pairs on logits, and Masked Temperature Scaling.

Every calibrator in `CALIBRATORS` is a `Calibrator(fit, apply, output)` with the uniform calls

    params = calibrator.fit(logits=val_logits, labels=val_labels, **options)   # a pytree
    probs = calibrator.apply(params, test_logits)                               # (N, C) probabilities

Logits are (N, C) (binary calibrators also take (N,) log-odds and return (N, 2)); labels are (N,) integers
(most calibrators also accept (N, C) soft targets). `output` says what the module-level `apply_*` function
returns: `"logits"` (calibrated logits exist, e.g. for a calibrated KD teacher; `apply` is their softmax) or
`"probs"`. MTS needs network inputs rather than logits, so it is not in the registry: use
`fit_masked_temperature` and `select_mts_ratio`.
"""

import functools
from typing import Any, Callable, NamedTuple

import jax

from calibjax.calibration.posthoc.binary import apply_beta, apply_platt, fit_beta, fit_platt
from calibjax.calibration.posthoc.binning import (apply_histogram_binning, apply_isotonic,
                                                  fit_histogram_binning, fit_isotonic)
from calibjax.calibration.posthoc.scaling import (apply_dirichlet, apply_matrix_scaling, apply_vector_scaling,
                                                  fit_dirichlet, fit_matrix_scaling, fit_vector_scaling)
from calibjax.calibration.posthoc.temperature import (FitInfo, apply_ets, apply_temperature, fit_ets,
                                                      fit_masked_temperature, fit_temperature,
                                                      select_mts_ratio)
from calibjax.registry import Registry


class Calibrator(NamedTuple):
  """A post-hoc calibrator: `fit(*, logits, labels, **options) -> params`; `apply(params, logits) -> probs`;
  `output`: what the module-level `apply_*` returns, "logits" or "probs"."""
  fit: Callable[..., Any]
  apply: Callable[[Any, jax.Array], jax.Array]
  output: str


def _softmax_of(apply_logits: Callable[[Any, jax.Array], jax.Array]) -> Callable[[Any, jax.Array], jax.Array]:
  @functools.wraps(apply_logits)
  def apply(params, logits):
    return jax.nn.softmax(apply_logits(params, logits), axis=-1)
  return apply


def _probs_of_temperature(temperature, logits):
  return jax.nn.softmax(apply_temperature(logits, temperature), axis=-1)


CALIBRATORS: Registry[Calibrator] = Registry("calibrator")
for _name, _calibrator in {
    "temperature": Calibrator(fit_temperature, _probs_of_temperature, "logits"),
    "temperature_reference": Calibrator(functools.partial(fit_temperature, method="lbfgs_reference"),
                                        _probs_of_temperature, "logits"),
    "vector": Calibrator(fit_vector_scaling, _softmax_of(apply_vector_scaling), "logits"),
    "matrix": Calibrator(fit_matrix_scaling, _softmax_of(apply_matrix_scaling), "logits"),
    "dirichlet": Calibrator(fit_dirichlet, _softmax_of(apply_dirichlet), "logits"),
    "histogram": Calibrator(fit_histogram_binning, apply_histogram_binning, "probs"),
    "isotonic": Calibrator(fit_isotonic, apply_isotonic, "probs"),
    "ets": Calibrator(fit_ets, apply_ets, "probs"),
    "platt": Calibrator(fit_platt, apply_platt, "probs"),
    "beta": Calibrator(fit_beta, apply_beta, "probs"),
}.items():
  CALIBRATORS.register(_name)(_calibrator)
del _name, _calibrator

__all__ = [
    "CALIBRATORS", "Calibrator", "FitInfo", "apply_temperature", "fit_masked_temperature", "fit_temperature",
    "select_mts_ratio",
]
