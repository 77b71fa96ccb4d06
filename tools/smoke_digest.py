"""Runs the smoke preset of every method through the CLI and writes a digest of its numbers, to show that a
refactor changed no result.

  python tools/smoke_digest.py record DIGEST.json [--runs DIR]   # every smoke run, then the digest
  python tools/smoke_digest.py compare OLD.json NEW.json          # exit 1 and list the differences

The comparison fails when a number of the old digest changed or is missing; numbers only the new one has are
counted (a refactor may record more). The digest holds every number of every run's results.json (timings,
paths and the manifest left out: they differ between any two runs) and the SHA-256 of each synthetic set's
arrays (the config stored beside them is left out: its shape may change). Runs compile with the default XLA flags, so two digests of the same code are
bitwise equal.
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (name, config argument, extra flags); {name} in an argument is that earlier run's workdir.
RUNS = (
    ("train", "configs/train.py:smoke", ()),
    ("train_adafocal_cutmix", "configs/train.py:smoke,loss=adafocal,mixing=cutmix", ()),
    ("calibrate", "configs/calibrate.py:smoke", ("--config.calibrate.source={train}",)),
    ("distill_dsa", "configs/distill.py:method=dsa,ipc=2,mdt=dynamic,smoke", ()),
    ("distill_dc", "configs/distill.py:method=dc,ipc=1,mdt=fixed,smoke", ()),
    ("distill_dm", "configs/distill.py:method=dm,ipc=1,mdt=fixed,smoke", ()),
    ("evaluate_dsa", "configs/evaluate.py:smoke", ("--config.evaluate.source={distill_dsa}",)),
    ("evaluate_random", "configs/evaluate.py:smoke,baseline=random", ()),
    ("evaluate_herding", "configs/evaluate.py:smoke,baseline=herding", ("--config.evaluate.herding_model={train}",)),
    ("buffer", "configs/buffer.py:smoke", ()),
    ("distill_mtt", "configs/distill.py:method=mtt,ipc=1,mdt=fixed,smoke",
     ("--config.distill.mtt.buffer_dir={buffer}",)),
    ("evaluate_mtt", "configs/evaluate.py:smoke,learned_lr=True", ("--config.evaluate.source={distill_mtt}",)),
    ("kd", "configs/kd.py:smoke,teacher={train}", ()),
    ("kd_ts_self", "configs/kd.py:smoke,recipe=self,loss=kd,teacher_cal=ts,teacher={train}", ()),
    ("kd_mixup", "configs/kd.py:smoke,recipe=aug,mixing=mixup,teacher={train}", ()),
    ("kd_crd", "configs/kd.py:smoke,loss=crd,teacher={train}", ()),
)
SKIPPED_KEYS = ("seconds", "workdir", "source", "path", "manifest", "synthetic_set")


def numbers(tree, prefix=""):
  """{dotted path: number} of every int, float or bool leaf, skipping the keys that name a time or a place."""
  out = {}
  if isinstance(tree, dict):
    for key, value in tree.items():
      if not any(word in key for word in SKIPPED_KEYS):
        out.update(numbers(value, f"{prefix}{key}."))
  elif isinstance(tree, list):
    for i, value in enumerate(tree):
      out.update(numbers(value, f"{prefix}{i}."))
  elif isinstance(tree, (int, float, bool)) and tree is not None:
    out[prefix.rstrip(".")] = tree
  return out


def synthetic_hashes(path):
  with np.load(path) as archive:
    return {name: hashlib.sha256(np.ascontiguousarray(archive[name]).tobytes()).hexdigest()
            for name in sorted(archive.files) if name != "config_json"}


def record(digest_path, runs_dir):
  digest = {}
  workdirs = {}
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  for name, config, flags in RUNS:
    workdir = os.path.join(runs_dir, name)
    workdirs[name] = workdir
    args = [f"--config={config.format(**workdirs)}", *(flag.format(**workdirs) for flag in flags)]
    result = subprocess.run([sys.executable, "-m", "calibjax.main", *args, f"--workdir={workdir}"], cwd=ROOT,
                            env=env, capture_output=True, text=True)
    if result.returncode:
      sys.exit(f"{name} failed:\n{result.stderr[-3000:]}")
    with open(os.path.join(workdir, "results.json")) as f:
      entry = {"results": numbers(json.load(f))}
    synthetic = os.path.join(workdir, "synthetic.npz")
    if os.path.exists(synthetic):
      entry["synthetic"] = synthetic_hashes(synthetic)
    digest[name] = entry
    print(f"{name}: {len(entry['results'])} numbers", flush=True)
  with open(digest_path, "w") as f:
    json.dump(digest, f, indent=1, sort_keys=True)


def compare(old_path, new_path):
  with open(old_path) as f:
    old = json.load(f)
  with open(new_path) as f:
    new = json.load(f)
  differences, added = [], 0
  for name in sorted(set(old) | set(new)):
    a, b = old.get(name, {}), new.get(name, {})
    for part in ("results", "synthetic"):
      x, y = a.get(part, {}), b.get(part, {})
      added += len(set(y) - set(x))
      for key in sorted(x):
        if x[key] != y.get(key):
          differences.append(f"{name} {part} {key}: {x[key]} -> {y.get(key, 'missing')}")
  # Numbers only the new digest has (a new budget entry, say) are counted, not failed: no old number changed.
  print("\n".join(differences) if differences else f"identical: every number of {len(old)} runs")
  print(f"{added} numbers are new")
  return 1 if differences else 0


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  rec = sub.add_parser("record")
  rec.add_argument("digest")
  rec.add_argument("--runs", default=os.path.join(ROOT, "runs", "smoke_digest"))
  cmp = sub.add_parser("compare")
  cmp.add_argument("old")
  cmp.add_argument("new")
  args = parser.parse_args()
  if args.command == "record":
    record(args.digest, args.runs)
    return 0
  return compare(args.old, args.new)


if __name__ == "__main__":
  sys.exit(main())
