"""The MTS paper's Tables 1 / 5 and 2 / 3 from the `evaluate` runs under a directory (experiments/fmnist_table1.sh):
`python experiments/make_calibration_table.py runs/fmnist_table1`.

Each run is one set (method, MDT mode, IPC) trained with one loss (CE, mixup, label smoothing, focal), 5 networks,
TS / MTS fitted on the distilled split (calibration.fit_on; T fitted to convergence, the MTS ratio chosen on the
split); there with the ratio chosen on the test split; there with the MTS reference code's protocol ("reference
protocol": its LBFGS port of T, which stops near its start T = 1.5, and the ratio chosen on test, which flatters
MTS); and on held-out real images (the entries of evaluate.also_fit_on).
Cells are the test ECE in percent, mean ± std over the networks, and (o/n): how many of the n networks the method
over-calibrated: TS and MTS turned an over-confident network (mean confidence above accuracy) under-confident;
mixup, label smoothing and focal loss trained an under-confident network where the CE networks of the same set
are over-confident on average. The last row counts, per column, the settings where most networks were
over-calibrated (the paper's last row of Table 1).
"""

import glob
import json
import os
import sys

import numpy as np

TRAIN_VARIANTS = (("ce", "none"), ("ce", "mixup"), ("label_smoothing", "none"), ("focal", "none"))
# (column, where the calibrators were fitted (an entry of evaluate.also_fit_on or the primary fit_on), stage)
POSTHOC_COLUMNS = (("TS (distilled split)", "distilled_split", "ts"),
                   ("MTS (distilled split)", "distilled_split", "mts"),
                   ("MTS (distilled split, r chosen on test)", "distilled_split@test_reference", "mts"),
                   ("TS (reference protocol)", "distilled_split@test_reference@lbfgs_reference", "ts"),
                   ("MTS (reference protocol)", "distilled_split@test_reference@lbfgs_reference", "mts"),
                   ("TS (held-out real)", "held_out_real", "ts"), ("MTS (held-out real)", "held_out_real", "mts"))


def load(root: str) -> dict:
  """{(method, mdt, ipc, distillation iterations (0: a random / herding baseline)): {(loss, mixing): results.json}}
  of every `*_eval` run under `root`."""
  runs = {}
  for path in sorted(glob.glob(os.path.join(root, "*_eval", "results.json"))):
    with open(path) as f:
      results = json.load(f)
    described, budget = results["training_set"], results["budget"]
    key = (described["method"], described.get("mdt", "off"), described["ipc"],
           described.get("distill_iterations", 0))
    runs.setdefault(key, {})[budget["loss"], budget["mixing"]] = results
  return runs


def fitted(results: dict, fit: str) -> dict | None:
  """The {"summary", "per_network", "calibration_data"} of the calibrators fitted as `fit` says (a fit_on option,
  optionally @ an MTS selection), if the run has them."""
  calibration = results["calibration_data"]
  if fit in (calibration["fit_on"], f"{calibration['fit_on']}@{calibration.get('mts_selection')}"):
    return results
  return results.get("also_fitted_on", {}).get(fit)


def cell(values, over=None) -> str:
  text = f"{100 * np.mean(values):.1f} ± {100 * np.std(values):.1f}"
  return text if over is None else f"{text} ({sum(over)}/{len(over)})"


def posthoc_cell(results, fit_on, stage, metric, counts, column):
  fit = results and fitted(results, fit_on)
  if not fit:
    return "—"
  over = [net[stage]["over_calibrated"] for net in fit["per_network"]]
  counts.setdefault(column, []).append(sum(over) > len(over) / 2)
  return cell([net[stage][metric] for net in fit["per_network"]], over)


def train_time_cell(results, ce_over_confident, metric, counts, column):
  if not results:
    return "—"
  networks = [net["raw"] for net in results["per_network"]]
  over = [ce_over_confident and net["confidence_gap"] < 0 for net in networks]
  counts.setdefault(column, []).append(sum(over) > len(over) / 2)
  return cell([net[metric] for net in networks], over)


def table_1(runs: dict, metric: str) -> list[str]:
  header = ["set", "IPC", "iterations", "acc % (CE)", "conf − acc % (CE)", "Raw", "MX", "LS", "FL",
            *(column for column, _, _ in POSTHOC_COLUMNS)]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  counts = {}
  for (method, mdt, ipc, iterations), variants in sorted(runs.items(), key=lambda item: (item[0][2], item[0][0],
                                                                                        item[0][3])):
    ce = variants.get(("ce", "none"))
    if mdt != "off" or ce is None:
      continue
    raw = [net["raw"] for net in ce["per_network"]]
    over_confident = float(np.mean([net["confidence_gap"] for net in raw])) > 0
    row = [method.upper(), str(ipc), str(iterations or "—"), cell([net["accuracy"] for net in raw]),
           cell([net["confidence_gap"] for net in raw]), cell([net[metric] for net in raw])]
    for column, variant in zip(("MX", "LS", "FL"), TRAIN_VARIANTS[1:]):
      row.append(train_time_cell(variants.get(variant), over_confident, metric, counts, column))
    for column, fit, stage in POSTHOC_COLUMNS:
      row.append(posthoc_cell(ce, fit, stage, metric, counts, column))
    lines.append("| " + " | ".join(row) + " |")
  columns = ["MX", "LS", "FL"] + [column for column, _, _ in POSTHOC_COLUMNS]
  lines.append("| over-calibrated settings | | | | | | " + " | ".join(
      f"{sum(counts.get(c, []))}/{len(counts.get(c, []))}" for c in columns) + " |")
  return lines


def table_2(runs: dict, fit_on: str) -> list[str]:
  """Per backbone, IPC and distillation iterations: raw and MTS ECE of the plain set, of its MDT set and of its
  dynamic-MDT set."""
  header = ["backbone", "IPC", "iterations", "acc % (plain / MDT / MDT^ds)", "Raw", "MTS", "MDT", "MDT + MTS",
            "MDT^ds", "MDT^ds + MTS"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for method, ipc, iterations in sorted({(m, i, n) for (m, mdt, i, n) in runs if mdt != "off"},
                                       key=lambda k: (k[1], k[0], k[2])):
    row, accuracies, counts = [method.upper(), str(ipc), str(iterations)], [], {}
    for mdt in ("off", "fixed", "dynamic"):
      ce = runs.get((method, mdt, ipc, iterations), {}).get(("ce", "none"))
      if ce is None:
        row += ["—", "—"]
        accuracies.append("—")
        continue
      accuracies.append(f"{100 * ce['summary']['raw']['accuracy']['mean']:.1f}")
      row.append(cell([net["raw"]["ece"] for net in ce["per_network"]]))
      row.append(posthoc_cell(ce, fit_on, "mts", "ece", counts, mdt))
    row.insert(3, " / ".join(accuracies))
    lines.append("| " + " | ".join(row) + " |")
  return lines


def main(root: str) -> None:
  runs = load(root)
  networks = {len(r["per_network"]) for variants in runs.values() for r in variants.values()}
  epochs = {r["budget"]["epochs"] for variants in runs.values() for r in variants.values()}
  budget = f"{'/'.join(map(str, sorted(networks)))} networks × {'/'.join(map(str, sorted(epochs)))} passes"
  print(f"## Tables 1 / 5: test ECE (15 bins) %, {budget}\n")
  print("\n".join(table_1(runs, "ece")))
  print("\n## The same with the reference's 10-bin ECE %\n")
  print("\n".join(table_1(runs, "ece_10")))
  for fit in ("distilled_split", "distilled_split@test_reference@lbfgs_reference", "held_out_real"):
    where = {"distilled_split": "the distilled split (ratio chosen on it)",
             "distilled_split@test_reference@lbfgs_reference": "the distilled split with the reference protocol",
             "held_out_real": "held-out real images"}[fit]
    print(f"\n## Tables 2 / 3: ECE (15 bins) % with MDT; MTS fitted on {where}\n")
    print("\n".join(table_2(runs, fit)))


if __name__ == "__main__":
  main(sys.argv[1])
