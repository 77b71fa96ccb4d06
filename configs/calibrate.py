"""Fit every post-hoc calibrator on a trained network's calibration data and report test metrics before/after.

  python -m calibjax.main --config configs/calibrate.py --config.calibrate.source=runs/quickstart \
      --workdir runs/quickstart_calibrate

`calibrate.source` is the workdir of a finished `train` or `kd` run, or of an `evaluate` run (networks trained on
a distilled set; `calibrate.network` picks one of its K networks, preset network=k). Calibrators are fitted on
`calibration.fit_on` (preset fit_on): held_out_real (the source's held-out validation split; the default), or for
an evaluate source distilled_split (the MTS paper's 10 % per class of the distilled set) or distilled_full.
`calibrate.calibrators` is a '+'-separated list of
names from `calibjax.calibration.posthoc.CALIBRATORS` plus "mts" (binary-only calibrators, platt and beta, need
a 2-class network). OOD separation is measured against Gaussian-noise corrupted copies of the test split
(`calibrate.ood_noise_sigmas`, in normalised units) and, if `calibrate.ood_dataset` names one (e.g. mnist or
digits for a Fashion-MNIST network), another dataset's test split. Presets: fit_on, network, smoke (only two
MTS ratios, for tests), seed.
"""

import ml_collections

from calibjax import config_lib

DEFAULT_CALIBRATORS = "temperature+temperature_reference+mts+ets+vector+matrix+dirichlet+histogram+isotonic"


def get_config(arg=None):
  preset = config_lib.parse_arg(arg, fit_on="held_out_real", network=0, smoke=False, seed=0)
  c = config_lib.base_config("calibrate")
  c.seed = preset.seed
  c.calibrate = ml_collections.ConfigDict()
  c.calibrate.source = ""
  c.calibrate.network = preset.network  # which of the K networks of an evaluate source
  c.calibration.fit_on = preset.fit_on
  c.calibrate.calibrators = DEFAULT_CALIBRATORS
  c.calibrate.ood_noise_sigmas = (0.5, 1.0)
  c.calibrate.ood_dataset = ""
  if preset.smoke:
    config_lib.smoke(c)
  return c
