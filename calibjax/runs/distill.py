"""Method `distill`: distil a synthetic set with DC, DSA, DM or MTT (optionally with MDT) and export it.

The workdir holds config.json, metrics.jsonl (one record every `distill.log_every_iterations`), orbax checkpoints
of the whole carry (synthetic set and optimiser states) every `distill.checkpoint_every_iterations`, and at the
end `synthetic.npz` (the set, the run's config and the input transforms; `calibjax.distill.synthetic.load_npz`),
plots/synthetic.png and results.json. Iteration i always uses `fold_in(steps key, i)`, so a killed run resumes
to exactly the set an uninterrupted run produces.
"""

import json
import os
import time

import jax
import ml_collections
import numpy as np

from calibjax import build, keys, parallel
from calibjax.data.prepare import prepare
from calibjax.distill.distillers import DISTILLERS
from calibjax.distill.synthetic import export_npz, save_image_grid
from calibjax.errors import ConfigError
from calibjax.runs import core


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  cfg = config.distill
  splits = prepare(config.data, seed=config.seed)
  mesh = parallel.make_mesh()
  distiller = DISTILLERS.get(cfg.method)(build.network(config.model, splits), cfg, splits, mesh)
  run_dir = core.Workdir(workdir, config)
  steps_key = keys.stream(config.seed, "steps")
  seconds = []

  def iteration(carry, index, tick):
    start = time.perf_counter()
    carry, metrics = distiller.step(carry, jax.random.fold_in(steps_key, index))
    metrics = jax.device_get(metrics)
    seconds.append(time.perf_counter() - start)
    return carry, lambda: {"seconds": seconds[-1], **core.scalars(metrics)}

  # Replicated over the mesh from the start: checkpoints of a multi-process run take only global arrays.
  initial = parallel.replicate(distiller.init(keys.stream(config.seed, "init")), mesh)
  carry = core.loop(run_dir, initial, iteration, total=cfg.iterations,
                    cadence=core.Cadence.from_config(cfg, "iteration"),
                    description=f"distill {cfg.method} ipc={cfg.ipc}")
  synset = jax.device_get(distiller.synset(carry))
  if not np.all(np.isfinite(synset.images)):
    raise ConfigError(f"the synthetic images of {workdir} are not finite; lower distill.lr_img")
  export_npz(os.path.join(run_dir.path, build.SYNTHETIC_FILE), synset, config_json=json.dumps(config.to_dict()),
             transforms=splits.transforms)
  save_image_grid(os.path.join(run_dir.plots, "synthetic.png"), synset.images, num_classes=splits.num_classes,
                  class_names=splits.class_names)
  # The first iteration of this process includes compilation; report it apart from the steady state.
  results = {"method": cfg.method, "ipc": cfg.ipc, "mdt": cfg.mdt, "mdt_ratio": cfg.mdt_ratio,
             "iterations": cfg.iterations, "synthetic_set": build.SYNTHETIC_FILE,
             "learned_lr": float(np.exp(synset.log_lr)),
             "seconds_first_iteration_this_process": seconds[0] if seconds else None,
             "seconds_per_iteration_median": float(np.median(seconds[1:])) if len(seconds) > 1 else None}
  budget = {"iterations": cfg.iterations, "train_examples": len(splits.train_images), "seed": config.seed,
            "devices": mesh.size}
  protocol = {"method": cfg.method, "ipc": cfg.ipc, "init": cfg.init, "mdt": cfg.mdt, "mdt_ratio": cfg.mdt_ratio,
              "model": config.model.name, "dsa_strategy": cfg.dsa_strategy, "zca": config.data.zca}
  return core.finish(run_dir, results, config=config, budget=budget, protocol=protocol)
