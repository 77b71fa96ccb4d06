"""Markdown table of the `train` and `kd` runs under a directory: `python experiments/make_kd_table.py runs/fmnist_kd`.

Workdirs are named `<row>_s<seed>`; one row per <row> with mean ± std over its seeds (population std, as numpy;
0 with one seed) of the test metrics of the last epoch's network (the headline): accuracy, NLL, ECE (15 bins),
SCE, ACE, OE, and ECE after TS. `kd` runs also log validation accuracy each epoch: "val acc best / last" is the
best epoch's and the last epoch's (validation split, not test; "—" for `train` runs).
Rows are listed in the order of the ROW_ORDER prefixes, then alphabetically.
"""

import collections
import glob
import json
import os
import re
import sys

import numpy as np

# Row groups in reading order: teachers, directly calibrated students, KD(UC) / KD(C), paper 004, the rest.
ROW_ORDER = ("teacher_", "student_", "kd_uc", "kd_c_", "aug_", "reverse", "self_")


def mean_std(values, scale=100.0, digits=1):
  values = np.asarray(values, np.float64) * scale
  return f"{values.mean():.{digits}f} ± {values.std():.{digits}f}"


def describe(config: dict) -> str:
  """What trained the network: the train loss (+ mixing), or the KD loss, recipe and teacher."""
  mixing = config.get("augment", {}).get("mixing", "none")
  if config["method"] == "kd":
    kd = config["kd"]
    teacher = os.path.basename(kd["teacher"].rstrip("/"))
    calibration = f", teacher ×1/T ({kd['teacher_calibration']})" if kd["teacher_calibration"] != "none" else ""
    return f"{kd['loss']} from {re.sub(r'_s[0-9]+$', '', teacher)}{calibration}" + (
        f" + {mixing}" if mixing != "none" else "")
  return config["loss"]["name"] + (f" + {mixing}" if mixing != "none" else "")


def order(name: str) -> tuple:
  prefix = next((i for i, p in enumerate(ROW_ORDER) if name.startswith(p)), len(ROW_ORDER))
  return prefix, name


def main(root: str) -> None:
  runs = collections.defaultdict(list)
  for path in glob.glob(os.path.join(root, "*_s[0-9]*", "results.json")):
    workdir = os.path.dirname(path)
    if os.path.basename(workdir).startswith("corruption_"):  # analyze runs: experiments/make_corruption_table.py
      continue
    with open(path) as f, open(os.path.join(workdir, "config.json")) as g:
      runs[re.sub(r"_s[0-9]+$", "", os.path.basename(workdir))].append((json.load(f), json.load(g)))
  header = ["run", "model", "trained with", "seeds", "epochs", "acc %", "val acc best / last %", "NLL", "ECE15 %",
            "SCE %", "ACE %", "OE %", "ECE15 after TS %"]
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for name in sorted(runs, key=order):
    results = [r for r, _ in runs[name]]
    config = runs[name][0][1]
    raw = [r["raw"] for r in results]
    epochs = [r["best_epoch"] for r in results if "best_epoch" in r]
    val = (f"{mean_std([e['val_accuracy'] for e in epochs])} / {mean_std([e['last_val_accuracy'] for e in epochs])}"
           if epochs else "—")
    row = [name, config["model"]["name"], describe(config), str(len(results)), str(results[0]["budget"]["epochs"]),
           mean_std([m["accuracy"] for m in raw]), val,
           mean_std([m["nll"] for m in raw], scale=1.0, digits=3), mean_std([m["ece"] for m in raw]),
           mean_std([m["sce"] for m in raw], digits=2), mean_std([m["ace"] for m in raw]),
           mean_std([m["oe"] for m in raw]), mean_std([r["ts"]["ece"] for r in results])]
    print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
  main(sys.argv[1])
