"""Count mutmut's verdicts (after `make mutate`) per file and write results/mutation/summary.json + .md.

mutmut keeps one ``mutants/<file>.meta`` per mutated file with each mutant's pytest exit code; the
verdict of each code is mutmut's own (``mutmut.stats.status_by_exit_code``): killed, survived, no tests
(no selected test reaches the mutant), timeout, ...
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from collections import Counter
from pathlib import Path

import torch
from mutmut.stats import status_by_exit_code

# functions that run only while factorlab is imported (building the registered Method objects): mutmut
# switches a mutant on per call after the modules are loaded, so their mutants survive whatever the tests
IMPORT_TIME = ("factorlab.methods.compacter.model.x__method__", "factorlab.core.method.x_register_method__")


def main(mutants: Path = Path("mutants"), out: Path = Path("results/mutation")) -> None:
    metas = sorted(mutants.rglob("*.py.meta"))
    if not metas:
        sys.exit("no mutants/*.meta found: run `make mutate` first")
    per_file: dict[str, Counter] = {}
    survivors: list[str] = []
    for meta in metas:
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        name = str(meta.relative_to(mutants))[: -len(".meta")]
        counts = Counter(status_by_exit_code.get(code, f"exit {code}") for code in codes.values())
        per_file[name] = counts
        survivors += [key for key, code in codes.items() if code == 0]
    total = sum(per_file.values(), Counter())
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    summary = {
        "total": dict(total),
        "per_file": {name: dict(c) for name, c in per_file.items()},
        "survivors": sorted(survivors),
        "commit": commit,
        "machine": {"cpu": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "command": "make mutate",
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    verdicts = ["killed", "survived", "no tests", "timeout"]
    lines = [
        "# Mutation testing (`make mutate`)",
        "",
        f"Commit {commit}; mutants of `src/factorlab/layers/` and `src/factorlab/methods/` against the tests"
        " named in pyproject.toml's [tool.mutmut].",
        "",
        "| file | " + " | ".join(verdicts) + " |",
        "|---|" + "---|" * len(verdicts),
    ]
    for name, c in [*per_file.items(), ("**all**", total)]:
        lines.append(f"| {name} | " + " | ".join(str(c.get(v, 0)) for v in verdicts) + " |")
    at_import = [key for key in survivors if key.startswith(IMPORT_TIME)]
    lines += [
        "",
        f"{len(at_import)} of the {len(survivors)} survivors are in code that runs only at import "
        f"({', '.join(sorted({key.split('__mutmut_')[0] for key in at_import}))}): mutmut switches a mutant "
        "on per call after the modules are loaded, so no test can kill them. All survivors: summary.json.",
    ]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
