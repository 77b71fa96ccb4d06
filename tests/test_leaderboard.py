"""experiments/leaderboard.py on a real (smoke) evaluate run: rows, ranking, interval cells and the figure."""

import json
import os
import re
import subprocess
import sys

import pytest

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")


@pytest.mark.slow
def test_leaderboard_ranks_every_calibrator_with_its_interval(tmp_path, smoke_evaluation):
  with open(os.path.join(smoke_evaluation, "results.json")) as f:
    results = json.load(f)
  runs = tmp_path / "runs"
  for name, loss in (("random_ce_eval", "ce"), ("random_label_smoothing_eval", "label_smoothing")):
    os.makedirs(runs / name)
    # The same networks stand in for a label-smoothing run: only the row they make is checked.
    with open(runs / name / "results.json", "w") as f:
      json.dump({**results, "budget": {**results["budget"], "loss": loss}}, f)
  out = str(tmp_path / "board")
  subprocess.run([sys.executable, os.path.join(EXPERIMENTS, "leaderboard.py"), str(runs), out + ".md"],
                 check=True)
  assert os.path.getsize(out + ".png") > 10_000
  text = open(out + ".md").read()
  ipc = results["training_set"]["ipc"]
  assert f"## IPC {ipc}" in text
  rows = [line.split(" | ") for line in text.splitlines() if re.match(r"\| \d+ \|", line)]
  calibrators = [row[2] for row in rows]
  assert sorted(calibrators) == sorted(["none", "TS (distilled split)", "MTS (distilled split)",
                                        "TS (held-out real)", "MTS (held-out real)", "label smoothing"])
  assert [int(row[0].strip("| ")) for row in rows] == list(range(1, 7))
  assert {row[1] for row in rows} == {"random real"}
  real = results["also_fitted_on"]["held_out_real"]["summary"]
  expected = {"none": results["summary"]["raw"], "TS (distilled split)": results["summary"]["ts"],
              "MTS (distilled split)": results["summary"]["mts"], "TS (held-out real)": real["ts"],
              "MTS (held-out real)": real["mts"], "label smoothing": results["summary"]["raw"]}
  eces = []
  for row in rows:
    ece = expected[row[2]]["ece"]
    low, high = ece["ci95"]
    assert row[4] == f"{100 * ece['mean']:.1f} [{100 * low:.1f}, {100 * high:.1f}]"  # the ECE % column
    assert low <= ece["mean"] <= high
    eces.append(ece["mean"])
  assert eces == sorted(eces)


@pytest.mark.slow
def test_a_set_distilled_for_two_iteration_counts_gets_rows_labelled_with_each(tmp_path, smoke_evaluation):
  with open(os.path.join(smoke_evaluation, "results.json")) as f:
    results = json.load(f)
  runs = tmp_path / "runs"
  for iterations in (60, 1000):
    os.makedirs(runs / f"dsa_it{iterations}_eval")
    with open(runs / f"dsa_it{iterations}_eval" / "results.json", "w") as f:
      json.dump({**results, "training_set": {"method": "dsa", "mdt": "off", "ipc": 1,
                                             "distill_iterations": iterations}}, f)
  out = str(tmp_path / "board")
  subprocess.run([sys.executable, os.path.join(EXPERIMENTS, "leaderboard.py"), str(runs), out + ".md"],
                 check=True)
  rows = [line.split(" | ") for line in open(out + ".md").read().splitlines() if re.match(r"\| \d+ \|", line)]
  assert sorted({row[1] for row in rows}) == ["DSA (1000 it.)", "DSA (60 it.)"]
  assert len(rows) == 10  # 5 calibrators of the CE networks per set (no label-smoothing run)
