"""Method `analyze`: the MTS paper's figure studies of networks trained on distilled data (DDNNs), each writing its
figure (plots/<study>.png) and the figure's data (results.json).

Studies (`analyze.study`; `analyze.source` is a finished `evaluate` run, `analyze.network` one of its networks,
except for svd_spectrum):
  * max_logit (Figs. 2a, 7, 2b): max-logit histograms of the DDNN's test inputs against a network trained on
    full data (`analyze.reference`, a finished `train` run on the same inputs; optional); of clean against
    masked calibration inputs at each of `analyze.mask_ratios`; and max softmax probabilities of the test split
    against shifted sets (Gaussian noise `analyze.ood_noise_sigmas`, optionally `analyze.ood_dataset`).
  * mts_ratio (Fig. 8): test ECE after MTS against the mask ratio (each of `calibration.mts_ratios`, T fitted on
    the calibration data of `calibration.fit_on`), with the raw and TS ECE for reference.
  * calibration_size (Fig. 9): test ECE after TS and MTS against the share N of the distilled set used to fit
    them (`analyze.split_fractions`, each a `distilled_split` of that fraction per class).
  * svd_spectrum (Fig. 3): the explained-variance curve (`calibjax.analysis.svd`) of each class's distilled
    images, of as many random real images of the class, and of the class's real training images (at most
    `analyze.full_class_images`), averaged over classes; `analyze.source` is a distill workdir or its .npz.
  * svd_truncation (Figs. 3, 5): the training set of an evaluate run (distilled, with or without MDT, or a random
    real baseline) with the top-k singular components of each class removed, for each k of
    `analyze.truncation_ks`, retrained with that run's own protocol and networks; test accuracy against k (each
    source and k in its own resumable sub-workdir). `analyze.source` may list several evaluate runs joined by
    '+', one curve each (the paper compares distilled data, with and without MDT, against real data).
  * corruption (robustness, paper 003's CIFAR-100-C study): a finished `train` or `kd` run (`analyze.source`)
    on its test split under each of `analyze.corruptions` at each of `analyze.severities`: accuracy, ECE and NLL
    raw and with the temperatures that run fitted (TS, MTS; on its own clean calibration data). The corrupted
    sets are generated from the clean test split (`calibjax.data.corruptions`, seeded by the run's seed;
    `analyze.corruption_data=generated`) or read from the official CIFAR-10-C / CIFAR-100-C arrays
    (`official`); the figure plots the mean over corruptions against the severity (0 = clean).
  * tsne (Figs. 4, 6): 2-D t-SNE (scikit-learn, PCA init, seeded) of every layer's features (each conv block,
    the logits) of `analyze.tsne_images` class-balanced test images, for the DDNN and the full-data network of
    `analyze.reference`, one panel per model and layer, coloured by class; the silhouette score of each layer's
    (high-dimensional) features by class is reported next to the figure.
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from calibjax import build, keys, parallel
from calibjax import data as data_lib
from calibjax.analysis import ood, svd
from calibjax.calibration import metrics, plots, posthoc
from calibjax.calibration.report import calibrate_and_report, reusing_logits
from calibjax.data import corruptions
from calibjax.data.sampling import class_balanced_indices
from calibjax.errors import ConfigError
from calibjax.masks import mask_inputs
from calibjax.runs import core, evaluate
from calibjax.train import step as step_lib


def _describe(values) -> dict:
  values = np.asarray(values, np.float64)
  return {"mean": float(values.mean()), "std": float(values.std()), "median": float(np.median(values))}


def _network(config):
  """The DDNN of the source evaluate run (`build.Restored`) and its logits function."""
  restored = build.restore_run(config.analyze.source, methods=("evaluate",), role="analyze.source",
                               network_index=config.analyze.network)
  logits_fn = build.logits_fn(restored.net, restored.state, parallel.make_mesh(), config.eval_batch_size)
  return restored, logits_fn


def _calibration_data(cal, restored):
  """The (images, labels, described) of `calibration.fit_on` (`cal`) for the DDNN `restored`."""
  images, labels, _, described = build.calibration_data(cal, splits=restored.splits,
                                                        training_set=restored.training_set,
                                                        seed=restored.config.seed)
  return images, labels, described


def _reference(config, restored):
  """The full-data network of `analyze.reference`, which must share the DDNN's input space."""
  reference = build.restore_run(config.analyze.reference, role="analyze.reference")
  build.check_input_space(restored.config.data, reference.config.data, role="the reference network")
  return reference


def max_logit(config, run_dir) -> dict:
  cfg = config.analyze
  restored, logits_fn = _network(config)
  splits = restored.splits
  test_logits = logits_fn(splits.test_images)
  by_model = {"trained on distilled data": test_logits}
  if cfg.reference:
    reference = _reference(config, restored)
    by_model["trained on full data"] = build.logits_fn(reference.net, reference.state, parallel.make_mesh(),
                                                       config.eval_batch_size)(splits.test_images)
  images, _, described = _calibration_data(config.calibration, restored)
  mask_key, noise_key = jax.random.split(keys.stream(config.seed, "analysis"))
  by_ratio = {"clean": logits_fn(images)}
  for ratio in cfg.mask_ratios:
    by_ratio[f"masked r={ratio:g}"] = logits_fn(np.asarray(mask_inputs(mask_key, images, ratio)))
  shifted = ood.shifted_sets(noise_sigmas=cfg.ood_noise_sigmas, dataset=cfg.ood_dataset, splits=splits,
                             data_dir=restored.config.data.data_dir or None, key=noise_key)
  confidence = {"test split": jax.nn.softmax(test_logits).max(-1)}
  confidence.update({name: jax.nn.softmax(logits_fn(x)).max(-1) for name, x in shifted.items()})
  plots.plot_max_logit_histograms(os.path.join(run_dir.plots, "max_logit_models.png"), by_model)
  plots.plot_max_logit_histograms(os.path.join(run_dir.plots, "max_logit_masked.png"), by_ratio)
  plots.plot_histograms(os.path.join(run_dir.plots, "max_probability_ood.png"), confidence,
                        xlabel="max softmax probability")
  max_of = lambda logits: np.asarray(logits).max(-1)
  return {"max_logit_models": {name: _describe(max_of(v)) for name, v in by_model.items()},
          "max_logit_masked": {name: _describe(max_of(v)) for name, v in by_ratio.items()},
          "max_probability_ood": {name: _describe(v) for name, v in confidence.items()},
          "calibration_data": described}


def mts_ratio(config, run_dir) -> dict:
  cal = config.calibration
  restored, logits_fn = _network(config)
  splits = restored.splits
  images, labels, described = _calibration_data(cal, restored)
  test_logits = jnp.asarray(logits_fn(splits.test_images))
  ece = lambda t: float(metrics.ece(probs=jax.nn.softmax(test_logits / t), labels=splits.test_labels,
                                    n_bins=cal.n_bins))
  key = keys.stream(config.seed, "calibration")
  temperatures = [float(posthoc.fit_masked_temperature(
      logits_fn=logits_fn, inputs=images, labels=labels, ratio=ratio, key=key, method=cal.ts_method,
      mask_target=cal.mts_target, granularity=cal.mts_granularity)) for ratio in cal.mts_ratios]
  ts = float(posthoc.fit_temperature(logits=logits_fn(images), labels=labels, method=cal.ts_method))
  ratios = list(cal.mts_ratios)
  sweep = [{"ratio": r, "temperature": t, "ece": ece(t)} for r, t in zip(ratios, temperatures)]
  plots.plot_curves(os.path.join(run_dir.plots, "mts_ratio.png"), {
      "MTS": (ratios, [100 * row["ece"] for row in sweep]), "TS": (ratios, [100 * ece(ts)] * len(ratios)),
      "uncalibrated": (ratios, [100 * ece(1.0)] * len(ratios))}, xlabel="mask ratio r", ylabel="test ECE %")
  return {"sweep": sweep, "ts": {"temperature": ts, "ece": ece(ts)}, "raw": {"ece": ece(1.0)},
          "calibration_data": described}


def calibration_size(config, run_dir) -> dict:
  restored, logits_fn = _network(config)
  splits = restored.splits
  logits_fn = reusing_logits(logits_fn, splits.test_images)
  rows = []
  for fraction in config.analyze.split_fractions:
    cal = ml_collections.ConfigDict(dict(config.calibration, fit_on="distilled_split", split_fraction=fraction))
    images, labels, described = _calibration_data(cal, restored)
    report = calibrate_and_report(logits_fn=logits_fn, val_images=images, val_labels=labels,
                                  test_images=splits.test_images, test_labels=splits.test_labels, cfg=cal,
                                  key=keys.stream(config.seed, "calibration"))
    rows.append({"fraction": fraction, "images": described["images"], "ece_ts": report["ts"]["ece"],
                 "ece_mts": report["mts"]["ece"], "mts_ratio": report["mts"]["ratio"]})
  fractions = [100 * row["fraction"] for row in rows]
  plots.plot_curves(os.path.join(run_dir.plots, "calibration_size.png"), {
      "MTS": (fractions, [100 * row["ece_mts"] for row in rows]),
      "TS": (fractions, [100 * row["ece_ts"] for row in rows])},
      xlabel="share of the distilled set fitting T (%)", ylabel="test ECE %")
  return {"sizes": rows}


def svd_spectrum(config, run_dir) -> dict:
  synset, splits, _, _ = build.synthetic_set(config.analyze.source)
  labels, num_classes = np.asarray(synset.labels), splits.num_classes
  per_class = int(np.bincount(labels, minlength=num_classes).min())
  random = class_balanced_indices(splits.train_labels, per_class, seed=config.seed, num_classes=num_classes)
  full = class_balanced_indices(splits.train_labels, min(config.analyze.full_class_images,
                                                         int(np.bincount(splits.train_labels).min())),
                                seed=config.seed, num_classes=num_classes)
  sets = {"distilled": (np.asarray(synset.images), labels),
          f"random real ({per_class} per class)": (splits.train_images[random], splits.train_labels[random]),
          f"real ({len(full) // num_classes} per class)": (splits.train_images[full], splits.train_labels[full])}
  curves = {}
  for name, (images, set_labels) in sets.items():
    spectra = svd.class_spectra(images, set_labels, num_classes=num_classes)
    length = min(len(s) for s in spectra)
    curves[name] = np.mean([svd.explained_variance(s)[:length] for s in spectra], axis=0)
  plots.plot_curves(os.path.join(run_dir.plots, "svd_spectrum.png"),
                    {name: (np.arange(1, len(c) + 1), c) for name, c in curves.items()},
                    xlabel="singular components", ylabel="explained variance (class mean)")
  return {"explained_variance": {name: c.tolist() for name, c in curves.items()}, "images_per_class": per_class}


def svd_truncation(config, run_dir) -> dict:
  sources, curves = [], {}
  for index, source_dir in enumerate(config.analyze.source.split("+")):
    source = build.run_config(source_dir, methods=("evaluate",), role="analyze.source")
    synset, splits, described = build.training_set(source)
    labels = np.asarray(synset.labels)
    net = build.network(source.model, splits)
    objective = evaluate.ensemble_objective(source)
    targets = jnp.asarray(synset.soft_labels if synset.soft_labels is not None else labels)
    predict_fn = step_lib.make_predict_fn(net, parallel.make_mesh())
    rows = []
    for k in config.analyze.truncation_ks:
      images = svd.drop_top_components(np.asarray(synset.images), labels, k, num_classes=splits.num_classes)
      # One resumable workdir per source and k: a killed study retrains only what it had not finished.
      states = evaluate.train_networks(
          core.Workdir(os.path.join(run_dir.path, f"truncated_{index}_k{k}"), config), source, net=net,
          objective=objective, images=jnp.asarray(images), targets=targets,
          lr=evaluate.learning_rate(source, synset), splits=splits,
          mesh=parallel.mesh_dividing(source.evaluate.num_nets, what="evaluate.num_nets"))
      accuracies = [float(np.mean(build.logits_fn(
          net, jax.tree.map(lambda leaf: leaf[n], states), parallel.make_mesh(), config.eval_batch_size,
          predict_fn=predict_fn)(splits.test_images).argmax(-1) == splits.test_labels))
          for n in range(source.evaluate.num_nets)]
      rows.append({"k": k, "accuracy": _describe(accuracies), "per_network": accuracies})
    mdt = {"fixed": " MDT", "dynamic": " MDT^ds"}.get(described.get("mdt"), "")
    curves[f"{described['method']}{mdt} ipc {described['ipc']}"] = (
        [row["k"] for row in rows], [100 * row["accuracy"]["mean"] for row in rows])
    sources.append({"source": os.path.abspath(source_dir), "training_set": described, "truncation": rows,
                    "networks": source.evaluate.num_nets, "epochs": source.train.epochs})
  plots.plot_curves(os.path.join(run_dir.plots, "svd_truncation.png"), curves,
                    xlabel="top singular components removed per class (k)", ylabel="test accuracy %")
  return {"sources": sources}


CORRUPTION_DATA = ("generated", "official")
OFFICIAL_CORRUPTED = {"cifar10": "cifar10_c", "cifar100": "cifar100_c"}


def _check_corruption_settings(cfg, data) -> None:
  """Refuses, before any work, corruption settings the source run's dataset (`data`, its config block) lacks."""
  if cfg.corruption_data not in CORRUPTION_DATA:
    raise ConfigError(f"analyze.corruption_data must be one of {', '.join(CORRUPTION_DATA)}; got "
                      f"'{cfg.corruption_data}'")
  if cfg.corruption_data == "official" and data.name not in OFFICIAL_CORRUPTED:
    raise ConfigError(f"official corrupted arrays exist for cifar10 and cifar100, not {data.name}; use "
                      "--config.analyze.corruption_data=generated")
  known = data_lib.sources.CORRUPTIONS if cfg.corruption_data == "official" else corruptions.GENERATED
  unknown = [c for c in cfg.corruptions if c not in known]
  if unknown:
    raise ConfigError(f"analyze.corruptions has {', '.join(unknown)}, which the {cfg.corruption_data} data lack; "
                      f"choose from {', '.join(known)}")


def _corrupted_sets(config, restored, pick):
  """(corruption, severity, images in the run's input space, labels) for each setting of `config.analyze`, of the
  test images `pick` indexes (the official arrays hold the test split in its order, once per severity)."""
  cfg, data = config.analyze, restored.config.data
  data_dir = data.data_dir or None
  clean = data_lib.load(data.name, "test", data_dir=data_dir) if cfg.corruption_data == "generated" else None
  for name in cfg.corruptions:
    for severity in cfg.severities:
      if clean is None:
        shifted = data_lib.load(f"{OFFICIAL_CORRUPTED[data.name]}:{name}:{severity}", "test", data_dir=data_dir)
        images, labels = shifted.images[pick], shifted.labels[pick]
      else:
        images = corruptions.corrupt(clean.images[pick], corruption=name, severity=severity,
                                     seed=restored.config.seed)
        labels = clean.labels[pick]
      yield name, severity, data_lib.apply_transforms(images, restored.splits.transforms), labels


def corruption(config, run_dir) -> dict:
  cfg, n_bins = config.analyze, config.calibration.n_bins
  _check_corruption_settings(cfg, build.run_config(cfg.source, methods=("train", "kd"), role="analyze.source").data)
  restored = build.restore_run(cfg.source, methods=("train", "kd"), role="analyze.source")
  fitted = build.results_of(cfg.source)
  temperatures = {"raw": 1.0, "ts": fitted["ts"]["temperature"], "mts": fitted["mts"]["temperature"]}
  logits_fn = build.logits_fn(restored.net, restored.state, parallel.make_mesh(), config.eval_batch_size)

  def scores(logits, labels):
    return {name: {"accuracy": float(metrics.accuracy(probs=jax.nn.softmax(logits), labels=labels)),
                   "ece": float(metrics.ece(probs=jax.nn.softmax(logits / t), labels=labels, n_bins=n_bins)),
                   "nll": float(metrics.nll_from_logits(logits=logits / t, labels=labels))}
            for name, t in temperatures.items()}

  splits = restored.splits
  pick = np.arange(len(splits.test_labels))
  if cfg.corruption_test_images:
    pick = np.sort(class_balanced_indices(splits.test_labels, max(1, cfg.corruption_test_images // splits.num_classes),
                                          seed=config.seed, num_classes=splits.num_classes))
  clean = scores(jnp.asarray(logits_fn(splits.test_images[pick])), splits.test_labels[pick])
  rows = [{"corruption": name, "severity": severity, **scores(jnp.asarray(logits_fn(images)), labels)}
          for name, severity, images, labels in _corrupted_sets(config, restored, pick)]
  severities = sorted({row["severity"] for row in rows})
  mean = lambda severity, cal, key: float(np.mean([r[cal][key] for r in rows if r["severity"] == severity]))
  by_severity = [{"severity": s, **{cal: {key: mean(s, cal, key) for key in ("accuracy", "ece", "nll")}
                                    for cal in temperatures}} for s in severities]
  xs = [0] + severities
  plots.plot_curves(os.path.join(run_dir.plots, "corruption.png"), {
      **{f"ECE {cal}": (xs, [100 * clean[cal]["ece"]] + [100 * row[cal]["ece"] for row in by_severity])
         for cal in temperatures},
      "error (1 - accuracy)": (xs, [100 * (1 - clean["raw"]["accuracy"])]
                               + [100 * (1 - row["raw"]["accuracy"]) for row in by_severity])},
      xlabel="severity (0 = clean; mean over corruptions)", ylabel="%")
  return {"clean": clean, "corrupted": rows, "mean_by_severity": by_severity, "temperatures": temperatures,
          "corruption_data": cfg.corruption_data, "test_images": len(pick)}


def tsne(config, run_dir) -> dict:
  from sklearn.manifold import TSNE  # Imported here: only this study needs it.
  from sklearn.metrics import silhouette_score

  cfg = config.analyze
  restored, _ = _network(config)
  splits = restored.splits
  pick = class_balanced_indices(splits.test_labels, max(1, cfg.tsne_images // splits.num_classes),
                                seed=config.seed, num_classes=splits.num_classes)
  images, labels = splits.test_images[pick], splits.test_labels[pick]
  models = {"trained on distilled data": restored}
  if cfg.reference:
    models["trained on full data"] = _reference(config, restored)
  panels, scores = {}, {}
  for name, model in models.items():
    layers = model.net.layer_features(model.state["params"], model.state["model_state"], jnp.asarray(images))
    for layer, features in enumerate(layers):
      title = f"{name}, {'logits' if layer == len(layers) - 1 else f'block {layer + 1}'}"
      points = TSNE(n_components=2, perplexity=min(30.0, (len(images) - 1) / 3), init="pca",
                    random_state=config.seed).fit_transform(np.asarray(features, np.float64))
      panels[title] = points
      # How well the classes separate in that layer's features (the figure's visual claim, as a number).
      scores[title] = float(silhouette_score(np.asarray(features), labels))
  plots.plot_embeddings(os.path.join(run_dir.plots, "tsne.png"), panels, labels=labels, columns=len(layers))
  return {"silhouette": scores, "images": len(labels),
          "embeddings": {title: points.round(4).tolist() for title, points in panels.items()},
          "labels": labels.tolist()}


STUDIES = {"max_logit": max_logit, "tsne": tsne, "mts_ratio": mts_ratio, "calibration_size": calibration_size,
           "svd_spectrum": svd_spectrum, "svd_truncation": svd_truncation, "corruption": corruption}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  cfg = config.analyze
  if cfg.study not in STUDIES:
    raise ConfigError(f"unknown analyze.study '{cfg.study}'; choose one of: {', '.join(STUDIES)}")
  if not cfg.source:
    raise ConfigError("analyze needs --config.analyze.source: a finished evaluate run (svd_spectrum: a distill "
                      "workdir or its synthetic.npz; corruption: a finished train or kd run)")
  run_dir = core.Workdir(workdir, config)
  results = {"study": cfg.study, **STUDIES[cfg.study](config, run_dir)}
  protocol = {"study": cfg.study, "source": [os.path.abspath(path) for path in cfg.source.split("+")],
              "network": cfg.network,
              "fit_on": config.calibration.fit_on, "mts_ratios": list(config.calibration.mts_ratios)}
  return core.finish(run_dir, results, config=config, budget={"seed": config.seed}, protocol=protocol)

