"""experiments/make_calibration_table.py on real (smoke) evaluate results: one row per set and distillation
iteration count, each filled from its own runs."""

import copy
import json
import os
import subprocess
import sys

import pytest

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")


@pytest.mark.slow
def test_sets_distilled_for_different_iterations_get_their_own_rows(tmp_path, smoke_evaluation):
  with open(os.path.join(smoke_evaluation, "results.json")) as f:
    results = json.load(f)
  ipc = results["training_set"]["ipc"]
  # The same networks stand in for DSA sets with and without MDT at 60 and 1000 iterations; each run's raw test
  # accuracy is set to a value naming it, so a row filled from the wrong run shows.
  accuracy = {("off", 60): 0.11, ("fixed", 60): 0.22, ("off", 1000): 0.33, ("fixed", 1000): 0.44}
  runs = tmp_path / "runs"
  for (mdt, iterations), value in accuracy.items():
    run = copy.deepcopy(results)
    run["training_set"] = {"method": "dsa", "mdt": mdt, "ipc": ipc, "distill_iterations": iterations}
    for network in run["per_network"]:
      network["raw"]["accuracy"] = value
    run["summary"]["raw"]["accuracy"]["mean"] = value
    os.makedirs(runs / f"dsa_{mdt}_it{iterations}_eval")
    with open(runs / f"dsa_{mdt}_it{iterations}_eval" / "results.json", "w") as f:
      json.dump(run, f)
  text = subprocess.run([sys.executable, os.path.join(EXPERIMENTS, "make_calibration_table.py"), str(runs)],
                        check=True, capture_output=True, text=True).stdout
  table_1 = [line.split(" | ") for line in text.split("\n\n")[1].splitlines()[2:-1]]
  assert [row[:4] for row in table_1] == [["| DSA", str(ipc), "60", "11.0 ± 0.0"],
                                          ["| DSA", str(ipc), "1000", "33.0 ± 0.0"]]
  tables_2 = text.split("## Tables 2 / 3")[1:]
  assert len(tables_2) == 3
  for block in tables_2:
    rows = [line.split(" | ") for line in block.splitlines() if line.startswith("| DSA")]
    assert [row[:4] for row in rows] == [["| DSA", str(ipc), "60", "11.0 / 22.0 / —"],
                                         ["| DSA", str(ipc), "1000", "33.0 / 44.0 / —"]]
