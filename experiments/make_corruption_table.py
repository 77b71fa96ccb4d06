"""Markdown table of the `analyze study=corruption` runs under a directory (experiments/fmnist_kd.sh
CORRUPTION_ROWS): `python experiments/make_corruption_table.py runs/fmnist_kd`.

Workdirs are named `corruption_<row>_s<seed>`; one line per <row> and severity (0 = the clean test split), mean ±
std over its seeds (population std) of the accuracy, and of the ECE (15 bins) and NLL raw, after TS and after MTS
with the temperatures the source run fitted on its clean validation split; corrupted cells average the
corruptions of that severity.
"""

import collections
import glob
import json
import os
import re
import sys

import numpy as np

CALIBRATIONS = ("raw", "ts", "mts")


def cell(values, scale=100.0, digits=1) -> str:
  values = np.asarray(values, np.float64) * scale
  return f"{values.mean():.{digits}f} ± {values.std():.{digits}f}"


def main(root: str) -> None:
  runs = collections.defaultdict(list)
  for path in glob.glob(os.path.join(root, "corruption_*_s[0-9]*", "results.json")):
    row = re.sub(r"^corruption_|_s[0-9]+$", "", os.path.basename(os.path.dirname(path)))
    with open(path) as f:
      runs[row].append(json.load(f))
  header = ["row", "seeds", "severity", "acc %", *(f"ECE15 {c.upper() if c != 'raw' else c} %" for c in CALIBRATIONS),
            *(f"NLL {c.upper() if c != 'raw' else c}" for c in CALIBRATIONS)]
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for row in sorted(runs):
    results = runs[row]
    levels = [(0, [r["clean"] for r in results])]
    for severity in sorted({s["severity"] for s in results[0]["mean_by_severity"]}):
      levels.append((severity, [next(s for s in r["mean_by_severity"] if s["severity"] == severity)
                                for r in results]))
    for severity, cells in levels:
      print("| " + " | ".join([row, str(len(results)), str(severity) if severity else "clean",
                               cell([c["raw"]["accuracy"] for c in cells]),
                               *(cell([c[cal]["ece"] for c in cells]) for cal in CALIBRATIONS),
                               *(cell([c[cal]["nll"] for c in cells], 1, 3) for cal in CALIBRATIONS)]) + " |")


if __name__ == "__main__":
  main(sys.argv[1])
