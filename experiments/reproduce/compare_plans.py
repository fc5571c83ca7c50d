"""Compares the plans of two checkouts of kdseg: for every run of a profile, the ``kdseg fit``
arguments of each stage, its resolved config and its key (the run-folder name). Identical resolved
configs mean identical fits: a refactoring of the runner or of the configs that passes this check
changes no number of the table.

    python experiments/reproduce/compare_plans.py --base ../base --profiles smoke cpu paper

Each checkout plans with its own code and its own matrix / profile files, in its own folder (paths
under a checkout are written ``<repo>`` before comparing); both write data (the smoke phantom) to
one shared ``--out``, so data paths agree. Exit status 0 when everything is identical.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

DUMP = r"""
import json, sys
from pathlib import Path
from kdseg.reproduce.spec import load_matrix, load_profile, profile_path
from kdseg.reproduce.plan import parse_selection, plan_runs
profile_name, out = sys.argv[1], Path(sys.argv[2])
matrix = load_matrix("experiments/reproduce/matrix.yaml")
profile = load_profile(profile_path(profile_name), matrix)
runs = plan_runs(matrix, profile, out, parse_selection([], matrix))
print(json.dumps([{"run": r.label, "error": r.error, "stages": [
    {"args": list(s.args), "key": s.key, "resolved": s.resolved_text, "folder": s.folder_name if s.key else None}
    for s in r.stages]} for r in runs]))
"""


def plan(repo: Path, profile: str, out: Path) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", DUMP, profile, str(out)], cwd=repo, env=env, capture_output=True,
                          text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{repo}: planning {profile} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.replace(str(repo.resolve()), "<repo>"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, type=Path, help="the other checkout (e.g. the commit before)")
    parser.add_argument("--new", default=Path.cwd(), type=Path, help="this checkout (default: the working directory)")
    parser.add_argument("--profiles", nargs="+", default=["smoke", "cpu", "paper"])
    parser.add_argument("--out", type=Path, default=None, help="shared data folder (default: a temporary one)")
    parser.add_argument("--folders", action="store_true", help="also require identical run-folder names")
    args = parser.parse_args()
    out = (args.out or Path(tempfile.mkdtemp(prefix="compare_plans-"))).resolve()
    differences = 0
    for profile in args.profiles:
        old, new = plan(args.base.resolve(), profile, out), plan(args.new.resolve(), profile, out)
        if [r["run"] for r in old] != [r["run"] for r in new]:
            print(f"{profile}: different runs: {[r['run'] for r in old]} vs {[r['run'] for r in new]}")
            differences += 1
            continue
        stages = 0
        for a, b in zip(old, new):
            for i, (sa, sb) in enumerate(zip(a["stages"], b["stages"]), start=1):
                stages += 1
                fields = ["args", "key", "resolved", *(["folder"] if args.folders else [])]
                for field in (f for f in fields if sa[f] != sb[f]):
                    differences += 1
                    print(f"{profile}: {a['run']} stage {i}: {field} differs")
                    if field in ("args", "resolved"):
                        left = sa[field] if field == "resolved" else "\n".join(sa[field])
                        right = sb[field] if field == "resolved" else "\n".join(sb[field])
                        print("".join(difflib.unified_diff(left.splitlines(True), right.splitlines(True), n=1)))
            if len(a["stages"]) != len(b["stages"]) or a["error"] != b["error"]:
                differences += 1
                print(f"{profile}: {a['run']}: stages or planning error differ ({a['error']} / {b['error']})")
        print(f"{profile}: {len(old)} runs, {stages} stages compared (args, resolved config, key)")
    print("identical" if not differences else f"{differences} difference(s)")
    return 1 if differences else 0


if __name__ == "__main__":
    raise SystemExit(main())
