"""Run an example as its user would and keep what optitool wrote, under a header this script measured.

`python -m benchmarks.example_runs smollm2_depth_distill` runs `optitool run examples/smollm2_depth_distill.toml`
and writes benchmarks/results/smollm2_depth_example.md: the wall time, the peak resident memory of the run's
processes, the exit code and the machine, then the run's report.md unchanged.
`python -m benchmarks.example_runs bbc_search` runs `optitool search examples/bbc_search.toml` and writes
benchmarks/results/bbc_search/: search.md under the same header, and search.json, best.toml and pareto.png
as the search wrote them.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from benchmarks.common import HERE, ROOT, WORK, machine_line

EXAMPLES = {
    # name: (command, the file optitool writes that is kept, results path, other files kept beside it)
    "smollm2_depth_distill": ("run", "report.md", Path("smollm2_depth_example.md"), ()),
    "bbc_search": ("search", "search.md", Path("bbc_search/search.md"), ("search.json", "best.toml", "pareto.png")),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("example", choices=sorted(EXAMPLES))
    args = parser.parse_args()
    command, kept, target, beside = EXAMPLES[args.example]
    output = WORK / "examples" / args.example
    shutil.rmtree(output, ignore_errors=True)
    argv = ["optitool", command, f"examples/{args.example}.toml", "--output", str(output)]
    if command == "search":
        argv.append("--no-cache")  # every trial made and measured in this run
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "optitool.cli", *argv[1:]], cwd=ROOT)
    wall = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2  # KiB on Linux
    outcome = {0: "0", 1: "1 (a budget failed or a trial was refused; see below)"}.get(done.returncode,
                                                                                     str(done.returncode))
    header = [f"# `{' '.join(argv[:3])}`: what it wrote", "",
              f"Written by `python -m benchmarks.example_runs {args.example}` on {date.today().isoformat()}. "
              f"{machine_line(os.cpu_count() or 1)} Wall time {wall / 60:.1f} min; peak resident memory of "
              f"its largest process {peak_gb:.1f} GB; exit code {outcome}. What follows is optitool's "
              f"{kept}, unchanged.", "", ""]
    destination = HERE / "results" / target
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_text("\n".join(header) + (output / kept).read_text())
    for name in beside:
        shutil.copyfile(output / name, destination.parent / name)
    print(destination.read_text()[:2000])


if __name__ == "__main__":
    main()
