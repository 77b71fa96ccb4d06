"""The result table each method prints at the end of a run, from the dict it writes to results.json.

`format_results(method, results, workdir=...)` dispatches on the method to a formatter that knows that method's
results.json structure and returns plain text with fixed-width columns (no dependencies, so it reads the same
in a terminal, a log file and CI output). Results of older runs may lack a metric: it prints as "—" instead of
raising, so any finished workdir can be summarised. A blank cell means "does not apply" (e.g. the MTS ratio of
the raw network). Accuracy, ECE and mean confidence are printed in percent.
"""

import os
from typing import Any, Callable

MISSING = "—"
# results.json stage keys of `calibrate_and_report` and how the tables name them.
STAGES = (("raw", "raw"), ("ts", "TS"), ("mts", "MTS"))
CALIBRATION_HEADER = ("", "accuracy %", "NLL", "ECE %", "confidence %", "AURC %", "set size", "temperature",
                      "MTS ratio")
# Keys of a calibrate run's results that are not calibrators (the run core adds "budget" and "manifest").
CALIBRATE_EXTRAS = ("ood", "source", "budget", "manifest")
# The figures each study of `calibjax.runs.analyze` writes into plots/.
ANALYZE_PLOTS = {"max_logit": ("max_logit_models.png", "max_logit_masked.png", "max_probability_ood.png"),
                 "mts_ratio": ("mts_ratio.png",), "calibration_size": ("calibration_size.png",),
                 "svd_spectrum": ("svd_spectrum.png",), "svd_truncation": ("svd_truncation.png",),
                 "tsne": ("tsne.png",)}


def format_results(method: str, results: dict, *, workdir: str) -> str:
  """The end-of-run table of `method` ("train", "kd", "evaluate", "calibrate", "distill", "buffer").

  Args:
    method: the run's `config.method`; an unknown one gets a single line pointing at its results.json.
    results: the dict the method wrote to results.json.
    workdir: the run's workdir, for the paths of results.json, plots and exported files.

  Returns:
    Lines of text, without a trailing newline.
  """
  formatter = FORMATTERS.get(method)
  if formatter is None:
    return f"{method}: results in {_results_path(workdir)}"
  return formatter(results, workdir=workdir)


def _format_train(results: dict, *, workdir: str) -> str:
  """Test metrics raw / TS / MTS (`calibjax.calibration.report.calibrate_and_report`: results["raw"|"ts"|"mts"]
  with accuracy, nll, ece, mean_confidence; "temperature" for ts and mts; "ratio" for mts)."""
  rows = _calibration_rows(results)
  return "\n".join(["train: test split, raw and after TS / MTS", _table(CALIBRATION_HEADER, rows),
                    *_where(workdir, "reliability.png", "risk_coverage.png")])


def _format_kd(results: dict, *, workdir: str) -> str:
  """The student's raw / TS / MTS rows (as for train), the teacher's own raw / TS / MTS rows when
  results["teacher"]["results"] holds them, and results["best_epoch"] (`calibjax.runs.kd.best_epoch`)."""
  teacher = _get(results, "teacher") or {}
  rows = _calibration_rows(results, label="student ")
  if isinstance(teacher.get("results"), dict):
    rows += _calibration_rows(teacher["results"], label="teacher ")
  title = (f"kd: teacher {_text(teacher.get('model'))} ({_text(teacher.get('method'))}, calibration "
           f"{_text(teacher.get('calibration'))}) -> student; test split")
  best = _get(results, "best_epoch") or {}

  def val_accuracy(key):
    return MISSING if best.get(key) is None else f"{_percent(best[key])}%"

  best_line = (f"best epoch: {_text(best.get('epoch'))} (val accuracy {val_accuracy('val_accuracy')}); "
               f"reported above: last epoch {_text(best.get('last_epoch'))} "
               f"(val accuracy {val_accuracy('last_val_accuracy')})")
  return "\n".join([title, _table(CALIBRATION_HEADER, rows), best_line,
                    *_where(workdir, "reliability.png", "risk_coverage.png")])


def _format_evaluate(results: dict, *, workdir: str) -> str:
  """Mean ± std over the networks of raw / TS / MTS (`calibjax.calibration.report.summarize_networks`:
  results["summary"][stage][metric]["mean"|"std"], "over_calibrated_fraction" for ts and mts), the training set
  (results["training_set"]: method, ipc, mdt), results["budget"]["networks"] and where the calibrators were
  fitted (results["calibration_data"]); then TS / MTS of each entry of results["also_fitted_on"] (the same
  networks, calibrators fitted elsewhere), labelled with its name (fit_on[@mts_selection])."""
  training_set = _get(results, "training_set") or {}
  networks = _get(results, "budget", "networks")
  fits = [("", results), *(_get(results, "also_fitted_on") or {}).items()]
  rows, fitted = [], []
  for name, fit in fits:
    calibration = _get(fit, "calibration_data") or {}
    suffix = f" [{name}]" if name else ""
    for stage, label in STAGES:
      if stage == "raw" and fit is not results:
        continue
      summary = _get(fit, "summary", stage) or {}
      share = "" if stage == "raw" else _share(summary.get("over_calibrated_fraction"), networks)
      rows.append((label + suffix, _mean_std(summary.get("accuracy"), percent=True), _mean_std(summary.get("nll")),
                   _mean_std(summary.get("ece"), percent=True), _mean_std(summary.get("aurc"), percent=True),
                   _mean_std(summary.get("set_size")), share))
    fitted.append(f"TS / MTS{suffix} fitted on: {_text(calibration.get('fit_on'))} "
                  f"({_text(calibration.get('images'))} images"
                  f"{', also training images' if calibration.get('in_training') else ''}); MTS ratio chosen on "
                  f"{_text(calibration.get('mts_ratio_selected_on'))}")
  title = (f"evaluate: {_text(training_set.get('method'))}, ipc {_text(training_set.get('ipc'))}, "
           f"mdt {_text(training_set.get('mdt'))}; {_text(networks)} networks, mean ± std on the test split")
  header = ("", "accuracy %", "NLL", "ECE %", "AURC %", "set size", "over-calibrated")
  return "\n".join([title, _table(header, rows), *fitted,
                    *_where(workdir, "reliability_net0.png", "risk_coverage_net0.png")])


def _format_calibrate(results: dict, *, workdir: str) -> str:
  """One row per calibrator (every key of `calibjax.runs.calibrate.run`'s results but `CALIBRATE_EXTRAS`:
  a calibration report with "over_calibrated", which "uncalibrated" has no use for), then the AUROC of
  max_logit, msp_raw and msp_ts for each OOD set (results["ood"][set][score]["auroc"])."""
  rows = []
  for name, report in results.items():
    if name in CALIBRATE_EXTRAS:
      continue
    flag = "" if name == "uncalibrated" else _yes_no(_get(report, "over_calibrated"))
    rows.append((name, _percent(_get(report, "accuracy")), _decimal(_get(report, "nll")),
                 _percent(_get(report, "ece")), _percent(_get(report, "aurc")),
                 _decimal(_get(report, "set_size"), digits=2), flag))
  source = _get(results, "source") or {}
  title = f"calibrate: {_text(source.get('model'))} on {_text(source.get('dataset'))}; test split"
  lines = [title, _table(("", "accuracy %", "NLL", "ECE %", "AURC %", "set size", "over-calibrated"), rows)]
  ood_rows = [(name, *(_decimal(_get(scores, score, "auroc")) for score in ("max_logit", "msp_raw", "msp_ts")))
              for name, scores in (_get(results, "ood") or {}).items()]
  if ood_rows:
    lines += ["out-of-distribution AUROC (test split as in-distribution)",
              _table(("OOD set", "max logit", "MSP raw", "MSP TS"), ood_rows)]
  return "\n".join(lines + _where(workdir, "reliability.png", "max_logit.png"))


def _format_distill(results: dict, *, workdir: str) -> str:
  """The distillation settings and speed (`calibjax.runs.distill.run`: method, ipc, mdt, mdt_ratio, iterations,
  learned_lr, seconds_per_iteration_median, synthetic_set) and where the set and its picture are."""
  mdt = _text(results.get("mdt"))
  if results.get("mdt") not in (None, "off"):
    mdt += f", ratio {_text(results.get('mdt_ratio'))}"
  synthetic = results.get("synthetic_set")
  rows = [("method", _text(results.get("method"))), ("ipc", _text(results.get("ipc"))), ("mdt", mdt),
          ("iterations", _text(results.get("iterations"))),
          ("learned lr", _decimal(results.get("learned_lr"), digits=6)),
          ("median s / iteration", _decimal(results.get("seconds_per_iteration_median"), digits=3)),
          ("synthetic set", os.path.join(workdir, synthetic) if synthetic else MISSING),
          ("plot", os.path.join(workdir, "plots", "synthetic.png")),
          ("results", _results_path(workdir))]
  return "\n".join(["distill", _table(None, rows)])


def _format_buffer(results: dict, *, workdir: str) -> str:
  """The experts, their epochs and their test accuracy (`calibjax.runs.buffer.run`: experts, epochs,
  test_accuracy {"mean", "std"})."""
  rows = [("experts", _text(results.get("experts"))), ("epochs", _text(results.get("epochs"))),
          ("test accuracy %", _mean_std(results.get("test_accuracy"), percent=True)),
          ("results", _results_path(workdir))]
  return "\n".join(["buffer", _table(None, rows)])


def _format_analyze(results: dict, *, workdir: str) -> str:
  """The numbers behind the study's figure (`calibjax.runs.analyze`): per histogram its mean ± std (max_logit),
  test ECE per mask ratio (mts_ratio) or per calibration share (calibration_size), the explained variance of the
  first components (svd_spectrum)."""
  study = results.get("study")
  if study == "max_logit":
    rows = [(f"{group}: {name}", f"{stats['mean']:.3f} ± {stats['std']:.3f}")
            for group in ("max_logit_models", "max_logit_masked", "max_probability_ood")
            for name, stats in (results.get(group) or {}).items()]
    header = ("histogram", "mean ± std")
  elif study == "mts_ratio":
    rows = [(f"MTS r={row['ratio']:g}", _percent(row["ece"])) for row in results.get("sweep", [])]
    rows += [("TS", _percent(_get(results, "ts", "ece"))), ("uncalibrated", _percent(_get(results, "raw", "ece")))]
    header = ("", "test ECE %")
  elif study == "tsne":
    rows = [(title, f"{score:.3f}") for title, score in (results.get("silhouette") or {}).items()]
    header = ("features", "silhouette by class")
  elif study == "svd_truncation":
    rows = [(f"k={row['k']}", _mean_std(row["accuracy"], percent=True)) for row in results.get("truncation", [])]
    header = ("", "test accuracy %")
  elif study == "calibration_size":
    rows = [(f"{100 * row['fraction']:g} %", _text(row["images"]), _percent(row["ece_ts"]),
             _percent(row["ece_mts"])) for row in results.get("sizes", [])]
    header = ("share of the set", "images", "ECE after TS %", "ECE after MTS %")
  else:
    rows = [(name, *(f"{100 * v:.1f}" for v in curve[:3]), *[MISSING] * (3 - len(curve[:3])))
            for name, curve in (results.get("explained_variance") or {}).items()]
    header = ("set", "1 component %", "2 %", "3 %")
  return "\n".join([f"analyze: {_text(study)}", _table(header, rows),
                    *_where(workdir, *ANALYZE_PLOTS.get(study, ()))])


FORMATTERS: dict[str, Callable[..., str]] = {
    "train": _format_train, "kd": _format_kd, "evaluate": _format_evaluate, "calibrate": _format_calibrate,
    "distill": _format_distill, "buffer": _format_buffer, "analyze": _format_analyze,
}


def _calibration_rows(results: dict, *, label: str = "") -> list[tuple[str, ...]]:
  """raw / TS / MTS rows of a `calibrate_and_report` dict; `label` prefixes the stage names."""
  rows = []
  for stage, name in STAGES:
    report = _get(results, stage) or {}
    temperature = "" if stage == "raw" else _decimal(report.get("temperature"), digits=3)
    ratio = _text(report.get("ratio")) if stage == "mts" else ""
    rows.append((label + name, _percent(report.get("accuracy")), _decimal(report.get("nll")),
                 _percent(report.get("ece")), _percent(report.get("mean_confidence")), _percent(report.get("aurc")),
                 _decimal(report.get("set_size"), digits=2), temperature, ratio))
  return rows


def _table(header: tuple[str, ...] | None, rows: list[tuple[str, ...]]) -> str:
  """Fixed-width columns two spaces apart. With a header, the first column (row names) is left-aligned and the
  others right-aligned, so decimals line up; without one (a list of name, value pairs) all are left-aligned."""
  lines = ([header] if header else []) + rows
  widths = [max(len(line[column]) for line in lines) for column in range(len(lines[0]))]

  def render(cells):
    padded = [cell.ljust(width) if column == 0 or not header else cell.rjust(width)
              for column, (cell, width) in enumerate(zip(cells, widths))]
    return "  ".join(padded).rstrip()

  return "\n".join(render(line) for line in lines)


def _get(mapping: Any, *keys: str) -> Any:
  """mapping[k1][k2]...; None where a key is missing (results of older runs) or a level is not a dict."""
  for key in keys:
    if not isinstance(mapping, dict):
      return None
    mapping = mapping.get(key)
  return mapping


def _text(value: Any) -> str:
  if value is None:
    return MISSING
  return f"{value:g}" if isinstance(value, float) else str(value)


def _percent(fraction: float | None) -> str:
  return MISSING if fraction is None else f"{100 * fraction:.2f}"


def _decimal(value: float | None, *, digits: int = 4) -> str:
  return MISSING if value is None else f"{value:.{digits}f}"


def _mean_std(statistic: Any, *, percent: bool = False) -> str:
  """A {"mean", "std"} dict as "mean ± std", in percent or with 4 decimals."""
  if not isinstance(statistic, dict):
    return MISSING
  number = _percent if percent else _decimal
  return f"{number(statistic.get('mean'))} ± {number(statistic.get('std'))}"


def _share(fraction: float | None, networks: int | None) -> str:
  """The over-calibrated share as a count of networks ("2/5 networks"), in percent when the count is unknown."""
  if fraction is None:
    return MISSING
  if networks is None:
    return f"{100 * fraction:.0f}% of networks"
  return f"{round(fraction * networks)}/{networks} networks"


def _yes_no(flag: bool | None) -> str:
  return MISSING if flag is None else ("yes" if flag else "no")


def _results_path(workdir: str) -> str:
  return os.path.join(workdir, "results.json")


def _where(workdir: str, *plots: str) -> list[str]:
  """The closing lines of a table: the run's plots (files in workdir/plots) and its results.json."""
  return [f"plots: {', '.join(os.path.join(workdir, 'plots', name) for name in plots)}",
          f"results: {_results_path(workdir)}"]
