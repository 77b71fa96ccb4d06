"""The MTS paper's figure studies of networks trained on distilled data (method `analyze`, calibjax.runs.analyze).

  python -m calibjax.main --config configs/analyze.py:study=max_logit --config.analyze.source=runs/dsa10_eval \
      --config.analyze.reference=runs/quickstart --workdir runs/dsa10_max_logit
  python -m calibjax.main --config configs/analyze.py:study=svd_spectrum --config.analyze.source=runs/dsa10 \
      --workdir runs/dsa10_svd
  python -m calibjax.main --config configs/analyze.py:study=corruption --config.analyze.source=runs/kd_c_mdca \
      --workdir runs/kd_c_mdca_corruption

Presets (`:key=value,...`): study (max_logit: Figs. 2a, 7, 2b; mts_ratio: Fig. 8; calibration_size: Fig. 9;
svd_spectrum: Fig. 3; svd_truncation: Fig. 5; tsne: Figs. 4, 6; corruption: robustness of a train / kd run
under common corruptions, Fashion-MNIST-C generated here), network (which network of the evaluate source),
fit_on (where TS / MTS are fitted: distilled_split, the paper's, by default; distilled_full; held_out_real), seed,
smoke (two MTS ratios, small evaluation batches; corruption: 2 corruptions x severities 1, 5). `analyze.source`
is a finished evaluate run (svd_spectrum: a distill workdir or its .npz; corruption: a train or kd run),
`analyze.reference` an optional finished train run on full data (max_logit's Fig. 2a). corruption's settings:
`analyze.corruption_data` (generated | official: the CIFAR-10-C / CIFAR-100-C arrays), `analyze.corruptions`,
`analyze.severities`, `analyze.corruption_test_images` (a class-balanced subset of the test split per setting, for
CPU budgets; 0: all of it, the benchmark's protocol).
"""

import ml_collections

from calibjax import config_lib


def get_config(arg=None):
  preset = config_lib.parse_arg(arg, study="max_logit", network=0, fit_on="distilled_split", seed=0, smoke=False)
  c = config_lib.base_config("analyze")
  c.seed = preset.seed
  c.calibration.fit_on = preset.fit_on
  c.analyze = ml_collections.ConfigDict()
  a = c.analyze
  a.study = preset.study
  a.source = ""
  a.network = preset.network
  a.reference = ""
  a.mask_ratios = (0.1, 0.2, 0.3)  # Fig. 7
  a.ood_noise_sigmas = (0.5, 1.0)  # Fig. 2b, in normalised units
  a.ood_dataset = ""
  a.split_fractions = (0.1, 0.2, 0.3, 0.4, 0.5)  # Fig. 9: N = 10 ... 50 % of the distilled set
  a.full_class_images = 500  # svd_spectrum: real images per class in the full-class curve
  a.truncation_ks = (0, 1, 2, 3, 4, 5)  # svd_truncation (Fig. 5): top components removed per class
  a.tsne_images = 1000  # tsne (Figs. 4, 6): class-balanced test images embedded
  from calibjax.data.corruptions import GENERATED  # Imported here: the other studies need no corruptions.
  a.corruption_data = "generated"  # corruption: generated from the clean test split, or "official" CIFAR-C arrays
  a.corruptions = GENERATED
  a.severities = (1, 2, 3, 4, 5)
  a.corruption_test_images = 0  # corruption: class-balanced test images scored per setting; 0: the whole split
  if preset.smoke:
    config_lib.smoke(c)
    a.tsne_images = 100
    a.corruptions = ("gaussian_noise", "contrast")
    a.severities = (1, 5)
  return c
