"""Markdown table of every `evaluate` run under a directory: `python experiments/make_table.py runs/fmnist_dd`.

One row per `<name>_eval` workdir: mean ± std over its networks (percent) of accuracy, ECE (15 and 10 bins),
SCE, ACE, OE, NLL; ECE after TS and after MTS with the fraction of networks each calibrator over-calibrated
(turned over-confident networks under-confident); the distillation budget and its time per iteration.
"""

import glob
import json
import os
import sys


def read(path):
  with open(path) as f:
    return json.load(f)


def cell(stats, scale=100.0, digits=1):
  return f"{stats['mean'] * scale:.{digits}f} ± {stats['std'] * scale:.{digits}f}"


def main(root: str) -> None:
  rows = []
  for path in sorted(glob.glob(os.path.join(root, "*_eval", "results.json"))):
    results = read(path)
    name = os.path.basename(os.path.dirname(path))[:-len("_eval")]
    summary, budget, described = results["summary"], results["budget"], results["training_set"]
    distill_budget = "—"
    distill_results = os.path.join(os.path.dirname(described["source"]), "results.json")
    if described.get("distill_iterations") and os.path.exists(distill_results):
      d = read(distill_results)
      distill_budget = f"{d['iterations']} it, {d['seconds_per_iteration_median']:.1f} s/it"
    train = budget["loss"] + ("+" + budget["mixing"] if budget["mixing"] != "none" else "")
    rows.append((described["ipc"], name, [
        name, str(described["ipc"]), train, cell(summary["raw"]["accuracy"]), cell(summary["raw"]["ece"]),
        cell(summary["raw"]["ece_10"]), cell(summary["raw"]["sce"], digits=2), cell(summary["raw"]["ace"]),
        cell(summary["raw"]["oe"]), cell(summary["raw"]["nll"], scale=1.0, digits=3),
        f"{cell(summary['ts']['ece'])} ({summary['ts']['over_calibrated_fraction']:.0%})",
        f"{cell(summary['mts']['ece'])} ({summary['mts']['over_calibrated_fraction']:.0%})",
        f"{budget['networks']} × {budget['epochs']} ep", distill_budget]))
  header = ["set", "IPC", "train loss", "acc %", "ECE15 %", "ECE10 %", "SCE %", "ACE %", "OE %", "NLL",
            "ECE15 after TS % (over-cal.)", "ECE15 after MTS % (over-cal.)", "evaluation", "distillation"]
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for _, _, row in sorted(rows, key=lambda r: (r[0], r[1])):
    print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
  main(sys.argv[1])
