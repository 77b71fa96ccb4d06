"""Method `distill`: distil a synthetic set with DC, DSA, DM or MTT (optionally with MDT) and export it.

The run's workdir holds config.json, metrics.jsonl (one record every `log_every` iterations), orbax checkpoints
of the whole carry (synthetic set and optimiser states) every `checkpoint_every` iterations, and at the end
`synthetic.npz` (the set, the run's config and the input transforms; `calibjax.distill.synthetic.load_npz`),
plots/synthetic.png and results.json. A killed run resumes from its latest checkpoint and, because iteration i
always uses `fold_in(iteration_key, i)`, ends with exactly the set an uninterrupted run produces.
"""

import json
import os
import time

import jax
import matplotlib

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from calibjax.data.prepare import prepare  # noqa: E402
from calibjax.distill.distillers import DISTILLERS  # noqa: E402
from calibjax.distill.synthetic import export_npz  # noqa: E402
from calibjax.errors import ConfigError  # noqa: E402
from calibjax.train.run import build_network  # noqa: E402
from calibjax.train.workdir import Workdir  # noqa: E402

SYNTHETIC_FILE = "synthetic.npz"


def save_image_grid(path: str, images: np.ndarray, *, num_classes: int, class_names=()) -> None:
  """One row per class, one column per image; each image min-max scaled on its own (the network's input space
  has no fixed pixel range after normalisation or ZCA)."""
  images = np.asarray(images, np.float32)
  ipc = len(images) // num_classes
  shown = min(ipc, 10)
  fig, axes = plt.subplots(num_classes, shown, figsize=(shown * 0.9 + 1.2, num_classes * 0.9), squeeze=False)
  for c in range(num_classes):
    for j in range(shown):
      image = images[c * ipc + j]
      image = (image - image.min()) / max(float(image.max() - image.min()), 1e-12)
      ax = axes[c, j]
      ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray" if image.shape[-1] == 1 else None)
      ax.set_xticks([])
      ax.set_yticks([])
    if class_names:
      axes[c, 0].set_ylabel(str(class_names[c]), rotation=0, ha="right", va="center", fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  cfg = config.distill
  splits = prepare(config.data, seed=config.seed)
  net = build_network(config.model, splits)
  distiller = DISTILLERS.get(cfg.method)(net, cfg, splits)
  run_dir = Workdir(workdir, config)
  root = jax.random.key(config.seed)
  init_key, iteration_key = jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)
  carry = distiller.init(init_key)
  first = 0
  if (saved := run_dir.checkpoints.latest_step()) is not None:
    carry, _ = run_dir.checkpoints.restore(saved, carry)
    first = saved
    run_dir.truncate_log(key="iteration", last=saved)
  seconds = []
  with tqdm(total=cfg.iterations, initial=first, desc=f"distill {cfg.method} ipc={cfg.ipc}", unit="it",
            disable=None, dynamic_ncols=True) as progress:
    for iteration in range(first, cfg.iterations):
      start = time.perf_counter()
      carry, metrics = distiller.step(carry, jax.random.fold_in(iteration_key, iteration))
      metrics = jax.device_get(metrics)
      seconds.append(time.perf_counter() - start)
      done = iteration + 1
      if done % cfg.log_every == 0 or done == cfg.iterations:
        record = {"iteration": done, "seconds": seconds[-1],
                  **{k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}}
        run_dir.log(record)
        progress.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}", refresh=False)
      if done % cfg.checkpoint_every == 0 or done == cfg.iterations:
        run_dir.checkpoints.save(done, carry, {"iteration": done})
      progress.update()
  run_dir.checkpoints.wait()
  synset = jax.device_get(distiller.synset(carry))
  if not np.all(np.isfinite(synset.images)):
    raise ConfigError(f"the synthetic images of {workdir} are not finite; lower distill.lr_img")
  export_npz(os.path.join(run_dir.path, SYNTHETIC_FILE), synset, config_json=json.dumps(config.to_dict()),
             transforms=splits.transforms)
  save_image_grid(os.path.join(run_dir.plots, "synthetic.png"), synset.images, num_classes=splits.num_classes,
                  class_names=splits.class_names)
  # The first iteration of this process includes compilation; report it apart from the steady state.
  results = {"method": cfg.method, "ipc": cfg.ipc, "mdt": cfg.mdt, "mdt_ratio": cfg.mdt_ratio,
             "iterations": cfg.iterations, "synthetic_set": SYNTHETIC_FILE,
             "learned_lr": float(np.exp(synset.log_lr)),
             "seconds_first_iteration_this_process": seconds[0] if seconds else None,
             "seconds_per_iteration_median": float(np.median(seconds[1:])) if len(seconds) > 1 else None,
             "budget": {"iterations": cfg.iterations, "train_examples": len(splits.train_images),
                        "seed": config.seed}}
  run_dir.write_results(results)
  run_dir.close()
  return results
