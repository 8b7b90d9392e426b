"""The paper profile end to end through vLLM, on a reduced slice, on this machine: `matrix-assets run --profile paper`
with `MATRIX_LLM_BACKEND=vllm` (a vLLM server started and stopped for each Dagster run, every checkpoint served by
name), MATRIX and Stable Alignment only, a few training prompts, a 3 x 3 society for 2 rounds, a few evaluation
prompts per set and a capped number of optimizer steps. Everything else is the paper profile: scene sizes, the roles
chain, k = 1, the data mix, the papers' sampling, Stable Alignment seeded with human HH-RLHF pairs.

1. A fresh clone of HEAD in a temporary folder, with this checkout's `.venv` and `.venv-vllm` linked in (both must be
   installed: `bash scripts/install.sh && bash scripts/install_vllm.sh`); nothing computed before.
2. `/usr/bin/time -v .venv/bin/matrix-assets run --profile paper ...` in it: wall time and peak RSS.
3. Each Dagster step's duration from the clone's instance, and the model calls the store recorded.

    .venv/bin/python benchmarks/bench_paper_slice.py    # ~25 min on 2 cores; writes benchmarks/results/paper_slice.md

The GPU recipe differs only in the model and the install line (README, *Scale path*).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_main_job import ENV, step_stats, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "paper_slice.md"
SLICE = ["--profile", "paper", "--methods", "matrix,stable_alignment", "--max-prompts", "2", "--eval-prompts", "4",
         "--max-steps", "2", "--set", "stable_alignment.grid_size=3", "--set", "stable_alignment.rounds=2"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS, help="Markdown results (default %(default)s)")
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR", help="clone into DIR and keep it")
    args = parser.parse_args()
    for venv in (".venv", ".venv-vllm"):
        if not (REPO / venv / "bin" / "python").exists():
            raise SystemExit(f"{venv} is missing: run bash scripts/install.sh and bash scripts/install_vllm.sh first")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="bench-paper-slice-") as tmp:
        clone = args.keep.resolve() if args.keep else Path(tmp) / "clone"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        for venv in (".venv", ".venv-vllm"):
            (clone / venv).symlink_to(REPO / venv)
        env = {**os.environ, **ENV, "MATRIX_LLM_BACKEND": "vllm", "MATRIX_VLLM_VENV": str(REPO / ".venv-vllm")}
        env.pop("DAGSTER_HOME", None)
        # The linked venv's package would otherwise keep its state beside that checkout: keep it in the clone.
        env["MATRIX_HOME"] = str(clone / ".matrix")
        env["MATRIX_DAGSTER_STORAGE"] = str(clone / ".matrix" / "dagster")
        command = [".venv/bin/matrix-assets", "run", *SLICE]
        began = time.time()
        done = subprocess.run(["/usr/bin/time", "-v", *command], cwd=clone, env=env, capture_output=True, text=True)
        wall = time.time() - began
        output = done.stdout + done.stderr
        if done.returncode:
            raise SystemExit(f"the paper slice failed ({done.returncode}) after {wall:.0f} s:\n{output[-6000:]}")
        peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", output)
        steps = step_stats(clone)
        from matrix_assets.store.db import Store

        db = Store(f"sqlite:///{clone / '.matrix' / 'matrix.db'}")
        calls = db.query("SELECT model_id, COUNT(*) AS n FROM generations GROUP BY model_id")
        table = "\n".join(done.stdout.rstrip().splitlines()[-30:])
    lines = [
        "# The paper profile through vLLM, a reduced slice",
        "",
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.machine()}, {os.cpu_count()} CPUs, "
        f"commit {commit}: `python benchmarks/bench_paper_slice.py` = a fresh clone, `MATRIX_LLM_BACKEND=vllm "
        f"matrix-assets run {' '.join(SLICE)}` (vLLM-CPU servers started and stopped by the runs).",
        "",
        f"- wall time: **{wall / 60:.1f} min** ({wall:.0f} s)",
        f"- peak RSS of the largest process (`time -v`; the vLLM server is a child): "
        f"{int(peak.group(1)) / 2**20:.2f} GB" if peak else "- peak RSS: not reported",
        "- model calls stored: " + ", ".join(f"{c['model_id']}: {c['n']}" for c in calls),
        "",
        "| job | step | seconds |",
        "|---|---|---|",
        *[f"| {s['job']} | {s['step']} | {s['seconds']:.0f} |" for s in steps],
        "",
        "The end of the run's output:",
        "",
        "```",
        table.strip(),
        "```",
    ]
    write_results(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
