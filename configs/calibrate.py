"""Fit every post-hoc calibrator on a trained network's held-out split and report test metrics before/after.

  python -m calibjax.main --config configs/calibrate.py --config.calibrate.source=runs/quickstart \
      --workdir runs/quickstart_calibrate

`calibrate.source` is the workdir of a finished `train` run. `calibrate.calibrators` is a '+'-separated list of
names from `calibjax.calibration.posthoc.CALIBRATORS` plus "mts" (binary-only calibrators, platt and beta, need
a 2-class network). OOD separation is measured against Gaussian-noise corrupted copies of the test split
(`calibrate.ood_noise_sigmas`, in normalised units) and, if `calibrate.ood_dataset` names one (e.g. mnist or
digits for a Fashion-MNIST network), another dataset's test split. Presets: smoke (only two MTS ratios, for
tests), seed.
"""

import ml_collections

from calibjax import config_lib

DEFAULT_CALIBRATORS = "temperature+temperature_reference+mts+ets+vector+matrix+dirichlet+histogram+isotonic"


def get_config(arg=None):
  preset = config_lib.parse_arg(arg, smoke=False, seed=0)
  c = config_lib.base_config("calibrate")
  c.seed = preset.seed
  c.calibrate = ml_collections.ConfigDict()
  c.calibrate.source = ""
  c.calibrate.calibrators = DEFAULT_CALIBRATORS
  c.calibrate.ood_noise_sigmas = (0.5, 1.0)
  c.calibrate.ood_dataset = ""
  if preset.smoke:
    config_lib.smoke(c)
  return c
