"""Per-module mutant counts (killed / survived / timeout / ...) of a mutmut 3 run.

Run from the project root after ``mutmut run`` (it reads ``mutants/**/*.meta``)::

    python experiments/results/mutation/summarize.py [GLOB ...] [--survivors]

GLOBs (fnmatch on mutant names, as ``mutmut run`` takes them) restrict the count; ``--survivors``
also lists the surviving mutants' names.
"""

from __future__ import annotations

import fnmatch
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

from mutmut.stats import status_by_exit_code


def main(argv: list[str]) -> None:
    show_survivors = "--survivors" in argv
    patterns = [a for a in argv if a != "--survivors"]
    counts: dict[str, Counter] = defaultdict(Counter)
    survivors: list[str] = []
    for meta in sorted(Path("mutants").rglob("*.py.meta")):
        results = json.loads(meta.read_text()).get("exit_code_by_key", {})
        for name, exit_code in results.items():
            if patterns and not any(fnmatch.fnmatch(name, p) for p in patterns):
                continue
            status = status_by_exit_code[exit_code]
            counts[str(meta.relative_to("mutants"))[: -len(".meta")]][status] += 1
            if status == "survived":
                survivors.append(name)
    columns = ["killed", "survived", "timeout", "no tests", "not checked", "suspicious", "segfault"]
    print(f"{'module':<45}" + "".join(f"{c:>12}" for c in columns))
    total: Counter = Counter()
    for module, c in counts.items():
        total.update(c)
        print(f"{module:<45}" + "".join(f"{c[k]:>12}" for k in columns))
    print(f"{'total':<45}" + "".join(f"{total[k]:>12}" for k in columns))
    if show_survivors:
        print("\n".join(["", "survivors:", *survivors]))


if __name__ == "__main__":
    main(sys.argv[1:])
