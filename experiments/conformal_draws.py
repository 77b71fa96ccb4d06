"""How far a conformal set's test coverage moves with the draw of its calibration images, for one network of an
`evaluate` run: `python experiments/conformal_draws.py runs/leaderboard/dc_ipc1_ce_eval [draws]`.

The leaderboard calibrates APS (alpha 0.1) of every set on one seeded draw of 100 held-out real training images per
class, the same images for every set; its coverages sit 0.2-1.5 points under 90 %. This script calibrates network 0
of the run, raw, on `draws` fresh draws of 100 images per class from 6000 training images (as held_out_real: the
training split) and, as an exchangeable control, from one half of the test split (covered on the other half), and
prints the mean, standard deviation and range of the coverage over the draws.
"""

import sys

import jax
import numpy as np

from calibjax import build, parallel
from calibjax.calibration import conformal

PER_CLASS, ALPHA, POOL = 100, 0.1, 6000


def class_balanced_draw(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  classes = np.unique(labels)
  return np.concatenate([rng.choice(np.flatnonzero(labels == c), PER_CLASS, replace=False) for c in classes])


def coverage(cal_probs, cal_labels, test_probs, test_labels, key) -> float:
  _, sets = conformal.calibrate_and_predict(cal_probs=cal_probs, cal_labels=cal_labels, test_probs=test_probs,
                                            method="aps", alpha=ALPHA, key=key)
  return conformal.set_report(sets=sets, labels=test_labels)["coverage"]


def main(run: str, draws: int) -> None:
  restored = build.restore_run(run, methods=("evaluate",), network_index=0)
  logits_fn = build.logits_fn(restored.net, restored.state, parallel.make_mesh(), 1000)
  splits, rng = restored.splits, np.random.default_rng(0)
  pool = rng.choice(len(splits.train_labels), POOL, replace=False)
  pool_probs = np.asarray(jax.nn.softmax(logits_fn(splits.train_images[pool])))
  pool_labels = splits.train_labels[pool]
  test_probs = np.asarray(jax.nn.softmax(logits_fn(splits.test_images)))
  test_labels = splits.test_labels
  print(f"accuracy: training-split pool {np.mean(pool_probs.argmax(1) == pool_labels):.3f}, "
        f"test split {np.mean(test_probs.argmax(1) == test_labels):.3f}")
  found = {"calibrated on the training split": [], "calibrated on one half of the test split": []}
  for draw in range(draws):
    key = jax.random.key(draw)
    picked = class_balanced_draw(pool_labels, rng)
    found["calibrated on the training split"].append(
        coverage(pool_probs[picked], pool_labels[picked], test_probs, test_labels, key))
    order = rng.permutation(len(test_labels))
    held, scored = order[:len(order) // 2], order[len(order) // 2:]
    picked = held[class_balanced_draw(test_labels[held], rng)]
    found["calibrated on one half of the test split"].append(
        coverage(test_probs[picked], test_labels[picked], test_probs[scored], test_labels[scored], key))
  for name, values in found.items():
    values = 100 * np.asarray(values)
    print(f"{name}: coverage {values.mean():.2f} % (sd {values.std():.2f}, {values.min():.1f} ... "
          f"{values.max():.1f}) over {draws} draws")


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 100)
