"""Does decoding a scene step under a JSON schema help? Measured per step (plan, roles) on the validation split.

The same validation prompts as `tune_on_validation.py` (AdvBench training split, positions the quick run never
uses), the bundled model, MATRIX's quick scene. Each scene is simulated twice: free text (the default) and with
`structured_output=("plan", "roles")` (xgrammar on the local backend; `pip install 'matrix-assets[structured]'`).
Per step:

- fallback share: scenes whose plan (or roles) came from a fallback instead of the model's reply;
- invalid JSON: structured replies that did not parse (cut off by the token budget);
- degenerate share: of the plan steps (or role lines) the model wrote (scenes on a fallback left out), those
  that are not text: no word of 3+ letters, or fewer than half of their words distinct ("A.A.A.A", "the the
  the"), or a role whose description repeats its name ("Ava - Ava's - Ava's");
- examples of both.

The rule, fixed before measuring: structured output stays on for a step only where it lowers the fallback share
and does not raise the degenerate share. Usage:

    .venv/bin/python benchmarks/structured_output.py        # about 10-20 minutes on 2 cores; cached re-runs
"""

from __future__ import annotations

import validation_split  # noqa: F401  (first: the offline environment and the repository on sys.path)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from validation_split import (  # noqa: E402
    ANSWER_TOKENS, FIRST_VALIDATION, MODEL, REPO, log, open_store, validation_prompts,
)

from matrix_assets.llm.transformers_backend import TransformersBackend  # noqa: E402
from matrix_assets.methods.base import answer_directly  # noqa: E402
from matrix_assets.methods.matrix import QUICK  # noqa: E402
from matrix_assets.methods.matrix.engine import PLANNING_FALLBACKS, run_scenes  # noqa: E402
from matrix_assets.methods.matrix.scene import SceneInput, Transcript  # noqa: E402
from matrix_assets.store.generation_cache import CachedBackend  # noqa: E402


def degenerate(text: str) -> bool:
    words = re.findall(r"\w+", text.lower())
    return not any(len(w) >= 3 and w.isalpha() for w in words) or len(set(words)) < 0.5 * len(words)


def degenerate_role(line: str) -> bool:
    name, _, rest = line.partition(" - ")
    return degenerate(line) or all(part.strip().lower().startswith(name.strip().lower()) for part in rest.split(" - "))


def step_texts(scene: Transcript, step: str) -> list[str]:
    if step == "plan":
        return list(scene.plan)
    return [f"{r.name} - {r.description} - {r.status}" for r in scene.roles]


def relied_on_fallback(scene: Transcript, step: str) -> bool:
    return any(scene.fallbacks.get(f, 0) for f in PLANNING_FALLBACKS[step])


def summarize(scenes: list[Transcript], step: str) -> dict[str, float]:
    fell_back = sum(1 for s in scenes if relied_on_fallback(s, step))
    # Only what the model wrote counts for degeneration: a fallback's text is the answer's or the roster's.
    texts = [t for s in scenes if not relied_on_fallback(s, step) for t in step_texts(s, step)]
    return {"fallback": fell_back / len(scenes), "fell_back": fell_back,
            "degenerate": sum(map(degenerate_role if step == "roles" else degenerate, texts)) / max(1, len(texts)),
            "n_texts": len(texts),
            "invalid": sum(s.fallbacks.get(f"structured_{step}_invalid", 0) for s in scenes)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--validation", type=int, default=16, help="validation prompts (default 16)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "structured_output.md")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    store = open_store(args.out.parent)  # shares the tuning script's cache
    start = FIRST_VALIDATION
    validation = validation_prompts(store, args.validation)
    llm = CachedBackend(TransformersBackend(MODEL, batch_size=16), store)
    answers = answer_directly(llm, [p.text for p in validation], ANSWER_TOKENS)
    inputs = [SceneInput(p.prompt_id, p.text, a) for p, a in zip(validation, answers)]
    runs: dict[str, list[Transcript]] = {}
    for label, structured in (("free text", ()), ("structured", ("plan", "roles"))):
        began = time.perf_counter()
        runs[label] = run_scenes(llm, inputs, dataclasses.replace(QUICK.scene(), structured_output=structured))
        log(f"{label}: {len(inputs)} scenes in {time.perf_counter() - began:.0f} s")
    lines = ["# Structured output for the scene's plan and roles", "",
             f"{len(inputs)} validation prompts (AdvBench training split, positions {start}-{start + len(inputs) - 1}),"
             f" model {MODEL}, MATRIX quick scene. Command: `.venv/bin/python benchmarks/structured_output.py`", "",
             "| step | decoding | scenes on a fallback | invalid JSON replies | degenerate lines the model wrote |", "|---|---|---|---|---|"]
    verdicts = []
    for step in ("plan", "roles"):
        free, structured = summarize(runs["free text"], step), summarize(runs["structured"], step)
        for label, r in (("free text", free), ("structured", structured)):
            lines.append(f"| {step} | {label} | {r['fell_back']}/{len(inputs)} ({r['fallback']:.0%}) | "
                         f"{r['invalid'] if label == 'structured' else '-'} | {r['degenerate']:.0%} of {r['n_texts']} |")
        keep = (structured["fallback"] < free["fallback"] and structured["n_texts"]
                and structured["degenerate"] <= free["degenerate"])
        verdicts.append(f"- {step}: {'ON' if keep else 'off'} (fallback share {free['fallback']:.0%} -> "
                        f"{structured['fallback']:.0%}, degenerate {free['degenerate']:.0%} -> "
                        f"{structured['degenerate']:.0%})")
    lines += ["", "Verdict (on only where the fallback share drops and degenerate lines do not rise):", *verdicts,
              "", "## Examples (first 3 scenes)", ""]
    for i in range(min(3, len(inputs))):
        lines.append(f"**{inputs[i].question}**")
        for label in runs:
            scene = runs[label][i]
            lines.append(f"- {label}: plan {scene.plan!r}; roles {[step_texts(scene, 'roles')]!r}")
        lines.append("")
    report = "\n".join(lines)
    args.out.write_text(report + "\n", encoding="utf-8")
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
