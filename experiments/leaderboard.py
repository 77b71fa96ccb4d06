"""The calibration-aware distillation leaderboard from the `evaluate` runs under a directory
(experiments/leaderboard.sh): `python experiments/leaderboard.py runs/leaderboard experiments/results/leaderboard.md`
writes that table and, beside it, leaderboard.png.

One row per (training set, calibrator): the set is a distilled set (DC, DSA, DM, MTT, each with and without MDT)
or a fair-evaluation control at the same IPC (random real images, herding); the calibrator is none (raw), TS or
MTS fitted on the distilled split (the MTS paper's protocol: 10 % per class of the set, no real data), TS or MTS
fitted on held-out real images, or the train-time baseline (label smoothing; its networks are trained apart,
raw). Cells are the mean over the evaluation networks and the percentile-bootstrap 95 % interval of that mean
(`calibjax.calibration.report.bootstrap_interval`, stored in every results.json summary). Conformal sets (APS,
alpha 0.1) are calibrated on the same data as the row's calibrator (raw and label-smoothing rows: the distilled
split); their coverage shows whether that data is exchangeable with the test split. Rows are ranked by ECE.
"""

import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from make_calibration_table import fitted, load  # noqa: E402  (experiments/ is the script's directory)

# (row label, train loss, where the calibrators were fitted, stage of that fit)
CALIBRATORS = (("none", "ce", None, "raw"),
               ("TS (distilled split)", "ce", "distilled_split", "ts"),
               ("MTS (distilled split)", "ce", "distilled_split", "mts"),
               ("TS (held-out real)", "ce", "held_out_real", "ts"),
               ("MTS (held-out real)", "ce", "held_out_real", "mts"),
               ("label smoothing", "label_smoothing", None, "raw"))
# (column, metric, scale, decimals)
COLUMNS = (("acc %", "accuracy", 100, 1), ("ECE %", "ece", 100, 1), ("NLL", "nll", 1, 3),
           ("AURC %", "aurc", 100, 2), ("set size", "set_size", 1, 2), ("coverage %", "set_coverage", 100, 1))
SET_ORDER = ("random", "herding", "dc", "dsa", "dm", "mtt")


def set_label(method: str, mdt: str) -> str:
  name = {"random": "random real", "herding": "herding"}.get(method, method.upper())
  return name + {"off": "", "fixed": " + MDT", "dynamic": " + MDT^ds"}[mdt]


def rows(runs: dict, ipc: int) -> list[dict]:
  """The leaderboard rows at `ipc`: {"set", "calibrator", metric: {"mean", "ci95"}} for every run present; a set
  distilled for several iteration counts has one set of rows per count, labelled with it."""
  found = []
  keys = sorted((key for key in runs if key[2] == ipc), key=lambda k: (SET_ORDER.index(k[0]), k[1], k[3]))
  for method, mdt, _, iterations in keys:
    variants = runs[method, mdt, ipc, iterations]
    label = set_label(method, mdt)
    if sum(key[:3] == (method, mdt, ipc) for key in keys) > 1:
      label += f" ({iterations} it.)"
    for calibrator, loss, fit_on, stage in CALIBRATORS:
      results = variants.get((loss, "none"))
      fit = results and (fitted(results, fit_on) if fit_on else results)
      if fit:
        found.append({"set": label, "calibrator": calibrator,
                      **{metric: fit["summary"][stage][metric] for _, metric, _, _ in COLUMNS}})
  return sorted(found, key=lambda row: row["ece"]["mean"])


def cell(value: dict, scale: float, decimals: int) -> str:
  low, high = (scale * v for v in value["ci95"])
  return f"{scale * value['mean']:.{decimals}f} [{low:.{decimals}f}, {high:.{decimals}f}]"


def table(found: list[dict]) -> list[str]:
  header = ["rank", "set", "calibrator", *(column for column, _, _, _ in COLUMNS)]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for rank, row in enumerate(found, 1):
    lines.append("| " + " | ".join([str(rank), row["set"], row["calibrator"],
                                    *(cell(row[m], s, d) for _, m, s, d in COLUMNS)]) + " |")
  return lines


def figure(by_ipc: dict, path: str) -> None:
  """Accuracy against ECE, one marker per set, one colour per calibrator, 95 % intervals as error bars."""
  fig, axes = plt.subplots(1, len(by_ipc), figsize=(6 * len(by_ipc) + 2.5, 5.5), squeeze=False)
  sets = sorted({row["set"] for found in by_ipc.values() for row in found})
  markers = dict(zip(sets, "osD^vP*Xph<>"))
  colours = {label: f"C{i}" for i, (label, _, _, _) in enumerate(CALIBRATORS)}
  for ax, (ipc, found) in zip(axes[0], sorted(by_ipc.items())):
    for row in found:
      ece, acc = (100 * row["ece"]["mean"], 100 * row["accuracy"]["mean"])
      xerr = [[ece - 100 * row["ece"]["ci95"][0]], [100 * row["ece"]["ci95"][1] - ece]]
      yerr = [[acc - 100 * row["accuracy"]["ci95"][0]], [100 * row["accuracy"]["ci95"][1] - acc]]
      ax.errorbar(ece, acc, xerr=xerr, yerr=yerr, marker=markers[row["set"]], color=colours[row["calibrator"]],
                  markersize=6, capsize=2, linestyle="none", alpha=0.85)
    ax.set(title=f"Fashion-MNIST, IPC {ipc}", xlabel="test ECE % (15 bins)", ylabel="test accuracy %")
    ax.grid(alpha=0.3)
  handles = ([plt.Line2D([], [], marker=markers[s], color="grey", linestyle="none", label=s) for s in sets]
             + [plt.Line2D([], [], marker="s", color=c, linestyle="none", label=label)
                for label, c in colours.items()])
  fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
  fig.tight_layout(rect=(0, 0, 1 - 2.3 / fig.get_figwidth(), 1))
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(root: str, out: str) -> None:
  runs = load(root)
  by_ipc = {ipc: rows(runs, ipc) for ipc in sorted({key[2] for key in runs})}
  budgets = {(len(r["per_network"]), r["budget"]["epochs"]) for variants in runs.values() for r in variants.values()}
  budget = ", ".join(f"{n} networks × {epochs} passes" for n, epochs in sorted(budgets))
  lines = [f"# Calibration-aware distillation leaderboard: Fashion-MNIST, ConvNet-3, {budget}", "",
           "Mean over the evaluation networks [percentile-bootstrap 95 % interval of the mean]; ranked by ECE "
           "(15 bins). Conformal sets: APS at alpha 0.1, calibrated where the row's calibrator is fitted (none and "
           "label smoothing: the distilled split). Rebuilt by `bash experiments/leaderboard.sh`.", ""]
  for ipc, found in by_ipc.items():
    lines += [f"## IPC {ipc}", "", *table(found), ""]
  with open(out + ".md", "w") as f:
    f.write("\n".join(lines))
  figure(by_ipc, out + ".png")


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2].removesuffix(".md"))
