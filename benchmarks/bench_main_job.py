"""The main job as a new user runs it, measured step by step: wall time and peak RSS of each step, and the
evaluation's speed against raw batched generate of the same prompts on the same model.

1. A fresh clone of this repository's HEAD in a temporary folder (nothing computed before: no store, no MLflow,
   no generation cache, no Dagster history; the install reuses uv's package cache, as a second install would).
2. `/usr/bin/time -v bash scripts/run.sh` in it (the README's main command): total wall time and peak RSS (the
   largest single process, which is what `time -v` reports). A sampler reads the RSS of the whole process tree
   every second; each sample is charged to the Dagster step running at that moment, so each step gets its own
   peak (steps run one at a time: the `model` pool's limit is 1).
3. Each step's duration from the clone's Dagster instance (`get_run_step_stats`).
4. The evaluation's tokens/s (every model's answers, re-tokenized, over the `evaluation_scores` step's wall time:
   loading each checkpoint, judging and MLflow included) against raw batched generate of the same held-out
   prompts on the base model (`TransformersBackend(decoding="padded")`: one `model.generate` per length-sorted
   chunk, the same width and max new tokens), run right after in this process, so the ratio is side by side.

    .venv/bin/python benchmarks/bench_main_job.py    # ~25 min on 2 cores; writes benchmarks/results/main_job.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "main_job.md"
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
       "TOKENIZERS_PARALLELISM": "false"}


def write_results(path: Path, lines: Sequence[str]) -> None:
    """A benchmark's Markdown results, written and printed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


def tree_rss_mib(root: int) -> float:
    """Resident memory of a process and all its descendants (from /proc), in MiB."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            rss[int(entry.name)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
            children.setdefault(int(fields[1]), []).append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack += children.get(pid, [])
    return total / 2**20


class Sampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.samples, self.stop = pid, [], threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.time(), tree_rss_mib(self.pid)))
            self.stop.wait(1.0)


def run_main_job(clone: Path, extra: Sequence[str]) -> tuple[float, float, list[tuple[float, float]], str]:
    env = {**os.environ, **ENV}
    env.pop("DAGSTER_HOME", None)
    env.pop("MATRIX_HOME", None)
    began = time.time()
    process = subprocess.Popen(["/usr/bin/time", "-v", "bash", "scripts/run.sh", *extra], cwd=clone, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = Sampler(process.pid)
    sampler.start()
    output = process.communicate()[0]
    sampler.stop.set()
    sampler.join()
    if process.returncode:
        raise SystemExit(f"scripts/run.sh failed ({process.returncode}):\n{output[-4000:]}")
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", output)
    return time.time() - began, int(peak.group(1)) / 1024 if peak else float("nan"), sampler.samples, output


def evaluation_phases(clone: Path) -> dict[str, float]:
    """The evaluation's own account of its time (`seconds/answering`, `seconds/loading`, ...), from the metadata
    of the latest `evaluation_scores` materialization in the clone's Dagster instance."""
    import dagster as dg

    event = dg.DagsterInstance.get().get_latest_materialization_event(dg.AssetKey("evaluation_scores"))
    if event is None or event.asset_materialization is None:
        return {}
    return {k.split("/", 1)[1]: float(v.value) for k, v in event.asset_materialization.metadata.items()
            if k.startswith("seconds/")}


def step_stats(clone: Path) -> list[dict]:
    """Every step of every run in the clone's Dagster instance, in the order they started."""
    os.environ["DAGSTER_HOME"] = str(clone)
    os.environ["MATRIX_DAGSTER_STORAGE"] = str(clone / ".matrix" / "dagster")
    import dagster as dg

    instance = dg.DagsterInstance.get()
    steps = []
    for run in instance.get_runs(ascending=True):
        for stat in instance.get_run_step_stats(run.run_id):
            if stat.start_time and stat.end_time:
                steps.append({"job": run.job_name, "step": stat.step_key, "start": stat.start_time,
                              "end": stat.end_time, "seconds": stat.end_time - stat.start_time,
                              "status": stat.status.value if stat.status else "?"})
    return sorted(steps, key=lambda s: s["start"])


def evaluation_ratio(clone: Path, eval_seconds: float) -> dict:
    """The evaluation's tokens/s against raw batched generate of the same prompts on the base model."""
    from matrix_assets.defs.resources import LocalTransformersLLM
    from matrix_assets.evaluation.settings import EvaluationSettings
    from matrix_assets.llm.base import GenerationParams
    from matrix_assets.llm.transformers_backend import TransformersBackend
    from matrix_assets.store.db import Store

    db = Store(f"sqlite:///{clone / '.matrix' / 'matrix.db'}")
    answers = db.query("SELECT a.model_label, a.answer, p.text FROM eval_answers a JOIN prompts p "
                       "ON p.prompt_id = a.prompt_id")
    prompts = sorted({a["text"] for a in answers})
    resource = LocalTransformersLLM()
    raw = TransformersBackend(resource.model, batch_size=resource.batch_size, decoding="padded")
    tokens = EvaluationSettings().answer_tokens
    chats = [[{"role": "user", "content": p}] for p in prompts]
    width = TransformersBackend(resource.model, batch_size=resource.batch_size,
                                batch_tokens=resource.batch_tokens).rows_for([raw.encode(c) for c in chats],
                                                                             GenerationParams(max_new_tokens=tokens))
    raw.batch_size = width  # the width the evaluation's refill decoding used for these prompts
    raw.generate(chats[:2], GenerationParams(max_new_tokens=4))  # warm-up
    began = time.perf_counter()
    completions = raw.generate(chats, GenerationParams(max_new_tokens=tokens))
    raw_seconds = time.perf_counter() - began
    raw_tokens = sum(c.completion_tokens for c in completions)
    eval_tokens = sum(len(raw.tokenizer.encode(a["answer"], add_special_tokens=False)) for a in answers)
    return {"models": len({a["model_label"] for a in answers}), "prompts": len(prompts), "answers": len(answers),
            "width": width, "eval_tokens": eval_tokens, "eval_seconds": eval_seconds, "raw_tokens": raw_tokens,
            "raw_seconds": raw_seconds, "eval_tok_s": eval_tokens / eval_seconds,
            "raw_tok_s": raw_tokens / raw_seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS, help="Markdown results (default %(default)s)")
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR",
                        help="clone into DIR and keep it (store, MLflow, Dagster history, and rss_timeline.csv: the process "
                        "tree's RSS every second with the step running) instead of a temporary folder")
    parser.add_argument("run_args", nargs="*", help="extra arguments for `matrix-assets run` (after --)")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="bench-main-job-") as tmp:
        clone = args.keep.resolve() if args.keep else Path(tmp) / "clone"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        wall, peak, samples, output = run_main_job(clone, args.run_args)
        steps = step_stats(clone)
        for step in steps:
            inside = [rss for t, rss in samples if step["start"] <= t <= step["end"]]
            step["peak_rss_mib"] = max(inside) if inside else float("nan")
        if args.keep:  # the RSS of the process tree over time, each sample with the step it was charged to
            with (clone / "rss_timeline.csv").open("w", encoding="utf-8") as timeline:
                timeline.write("seconds,rss_mib,step\n")
                for t, rss in samples:
                    step = next((s["step"] for s in steps if s["start"] <= t <= s["end"]), "")
                    timeline.write(f"{t - samples[0][0]:.0f},{rss:.0f},{step}\n")
        evaluation = next((s for s in steps if s["step"] == "evaluation_scores"), None)
        phases = evaluation_phases(clone) if evaluation else {}
        ratio = evaluation_ratio(clone, evaluation["seconds"]) if evaluation else None
        if ratio and phases.get("answering"):
            ratio["answering_s"] = phases["answering"]
            ratio["answering_tok_s"] = ratio["eval_tokens"] / phases["answering"]
        table = "\n".join(output.split("\tCommand being timed")[0].rstrip().splitlines()[-40:])
    pipeline = sum(s["seconds"] for s in steps)
    lines = [
        "# Main job, step by step",
        "",
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.machine()}, {os.cpu_count()} CPUs, "
        f"commit {commit}; `python benchmarks/bench_main_job.py {' '.join(args.run_args)}`: a fresh clone, "
        "`/usr/bin/time -v bash scripts/run.sh` (install from uv's cache included).",
        "",
        f"- wall time: **{wall / 60:.1f} min** ({wall:.0f} s; Dagster steps {pipeline:.0f} s, the rest install, "
        "process starts and job setup)",
        f"- peak RSS of the largest process (`time -v`): **{peak / 1024:.2f} GB**; of the whole process tree: "
        f"{max((r for _, r in samples), default=float('nan')) / 1024:.2f} GB",
        "",
        "| job | step | seconds | peak RSS of the process tree (MiB) |",
        "|---|---|---|---|",
        *[f"| {s['job']} | {s['step']} | {s['seconds']:.0f} | "
          f"{'—' if s['peak_rss_mib'] != s['peak_rss_mib'] else round(s['peak_rss_mib'])} |" for s in steps],
    ]
    if ratio:
        lines += [
            "",
            f"Evaluation: {ratio['answers']} answers ({ratio['models']} models x {ratio['prompts']} prompts), "
            f"{ratio['eval_tokens']} tokens in {ratio['eval_seconds']:.0f} s = {ratio['eval_tok_s']:.1f} tok/s "
            "(checkpoint loading, judging, MLflow included). Raw batched generate of the same prompts on the base "
            f"model, {ratio['width']} rows per `model.generate`: {ratio['raw_tokens']} tokens in "
            f"{ratio['raw_seconds']:.0f} s = {ratio['raw_tok_s']:.1f} tok/s.",
            "",
            f"Evaluation tokens/s ÷ raw batched generate tokens/s, the whole step: "
            f"**{ratio['eval_tok_s'] / ratio['raw_tok_s']:.2f}**.",
        ]
        if "answering_s" in ratio:
            lines += [
                "",
                f"While answering (the step's own timing, `seconds/answering`: {ratio['answering_s']:.0f} s; the rest "
                f"is {', '.join(f'{k} {v:.0f} s' for k, v in phases.items() if k != 'answering')}): "
                f"{ratio['answering_tok_s']:.1f} tok/s, **{ratio['answering_tok_s'] / ratio['raw_tok_s']:.2f} of raw** "
                "(target >= 0.8).",
            ]
    lines += ["", "The end of the run's output:", "", "```", table.strip(), "```"]
    write_results(args.out, lines)
    print(json.dumps({"wall_s": wall, "peak_mib": peak, "ratio": ratio}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
