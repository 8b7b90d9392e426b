"""Choose the quick profile's settings on a validation split, never on the reported evaluation.

Validation prompts: AdvBench training-split prompts that the quick run never uses (after the first 9, which it
trains on, and the next 18, which seed Stable Alignment's memories), so nothing here overlaps what is trained on in
the quick run or what is evaluated (the evaluation split).

1. MATRIX self-selection, `revision_candidates` k in --candidates: the real model plays the scenes of the
   validation prompts, critiques and revises with k candidates. For each k: how many prompts keep a training
   target, how many are left out as self-judged harmful, and how many kept targets still comply with the harmful
   request (the validated refusal judge, the same classifier the evaluation uses, reading validation data only),
   and the cost. The default k is the smallest k whose share of complying targets is lowest.
2. LoRA learning rate and epochs (--lrs x --epochs): MATRIX checkpoints trained on the quick run's own data (the
   first 9 training prompts with the chosen k, plus the benign mix) and scored by the mean token NLL of the method's
   targets on the validation prompts (how well the checkpoint learned what the method teaches, on prompts it never
   saw). The lowest validation NLL wins.

    .venv/bin/python benchmarks/tune_on_validation.py            # about 20-30 minutes on 2 cores
Results: printed and written to benchmarks/results/tuning.md; the model calls are cached in
benchmarks/results/tuning.db, so a re-run only pays for what changed.
"""

from __future__ import annotations

import validation_split  # noqa: F401  (first: the offline environment and the repository on sys.path)

import argparse  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from validation_split import (  # noqa: E402
    ANSWER_TOKENS, FIRST_VALIDATION, MODEL, QUICK_PROMPTS, REPO, log, open_store, validation_prompts,
)

from matrix_assets.evaluation.refusal import default_judge  # noqa: E402
from matrix_assets.llm.models import resolve_model_path  # noqa: E402
from matrix_assets.llm.transformers_backend import TransformersBackend  # noqa: E402
from matrix_assets.methods.base import answer_directly  # noqa: E402
from matrix_assets.methods.matrix import QUICK  # noqa: E402
from matrix_assets.methods.matrix.engine import run_scenes  # noqa: E402
from matrix_assets.methods.matrix.revision import RevisionInput, critique_scenes, revise  # noqa: E402
from matrix_assets.methods.matrix.scene import SceneInput  # noqa: E402
from matrix_assets.store.db import Store  # noqa: E402
from matrix_assets.store.generation_cache import CachedBackend  # noqa: E402


def matrix_targets(llm, prompts, k: int):  # noqa: ANN001, ANN201
    """The MATRIX pipeline on `prompts` (id, text) with k revision candidates: (results, items, seconds)."""
    began = time.perf_counter()
    answers = answer_directly(llm, [t for _, t in prompts], ANSWER_TOKENS)
    scenes = run_scenes(llm, [SceneInput(pid, t, a) for (pid, t), a in zip(prompts, answers)], QUICK.scene())
    settings = QUICK.revision()
    critiques = critique_scenes(llm, scenes, settings)
    items = [RevisionInput(s.prompt_id, s.question, s.answer, c.text, c.harmed_parties, s.consequence)
             for s, c in zip(scenes, critiques)]
    from dataclasses import replace

    results = revise(llm, items, replace(settings, candidates=k))
    return results, items, time.perf_counter() - began


def mean_nll(base_path: str, adapter: str | None, pairs) -> float:  # noqa: ANN001
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from matrix_assets.training.rating_contrastive import tokenize_prompt_completion

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    losses = []
    with torch.inference_mode():
        for prompt, response in pairs:
            ids, labels = tokenize_prompt_completion(tokenizer, prompt, response, 512)
            out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
            losses.append(float(out.loss))
    return sum(losses) / len(losses)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--validation", type=int, default=16, help="validation prompts (default 16)")
    parser.add_argument("--candidates", default="1,2,3", help="revision_candidates to compare (default 1,2,3)")
    parser.add_argument("--lrs", default="2e-4,1e-3,2e-3", help="learning rates (default 2e-4,1e-3,2e-3)")
    parser.add_argument("--epochs", default="3,8", help="epochs (default 3,8)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default; use 1 on a machine other processes load)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "tuning.md")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    store = open_store(args.out.parent)
    quick = [(p.prompt_id, p.text) for p in store.train_prompts("advbench")[:QUICK_PROMPTS]]
    validation = [(p.prompt_id, p.text) for p in validation_prompts(store, args.validation)]
    start = FIRST_VALIDATION
    log(f"{len(validation)} validation prompts (training split positions {start}-{start + len(validation) - 1})")
    backend = TransformersBackend(MODEL, batch_size=8)
    llm = CachedBackend(backend, store)
    judge = default_judge()
    lines = ["# Tuning on the validation split", "",
             f"Validation: {len(validation)} AdvBench training-split prompts never used by the quick run. "
             f"Model {MODEL}. Command: `.venv/bin/python benchmarks/tune_on_validation.py "
             f"{' '.join(sys.argv[1:])}`".rstrip(), "",
             "## 1. revision_candidates (MATRIX self-selection)", "",
             "| k | prompts kept | left out (self-judged harmful) | left out (empty) | kept targets that comply "
             "(judge) | complying targets / all prompts | seconds (uncached) |", "|---|---|---|---|---|---|---|"]
    best_k, best_share = None, math.inf
    for k in [int(v) for v in args.candidates.split(",")]:
        results, _, seconds = matrix_targets(llm, validation, k)
        kept = [r.chosen for r in results if r.chosen]
        complying = sum(1 for refused in judge.predict(kept) if not refused) if kept else 0
        share = complying / len(results)
        excluded = [r.excluded for r in results]
        lines.append(f"| {k} | {len(kept)} | {excluded.count('self_judged_harmful')} | "
                     f"{excluded.count('empty_revision')} | {complying}/{len(kept)} | {share:.2f} | {seconds:.0f} |")
        log(lines[-1])
        if share < best_share - 1e-9:
            best_k, best_share = k, share
    lines += ["", f"Chosen: k = {best_k} (the smallest k with the lowest share of prompts that would train on a "
              "complying target).", "", "## 2. learning rate and epochs", ""]

    from dataclasses import replace

    from matrix_assets.training.sft import LoraSettings, SFTExample, TrainSettings, train_lora

    quick_results, quick_items, _ = matrix_targets(llm, quick, best_k)
    val_results, val_items, _ = matrix_targets(llm, validation, best_k)
    examples = [SFTExample(i.question, r.chosen) for i, r in zip(quick_items, quick_results) if r.chosen]
    benign = store_benign(store, llm, round(len(examples) * 0.5))
    examples += benign
    val_pairs = [(i.question, r.chosen) for i, r in zip(val_items, val_results) if r.chosen]
    base_path = resolve_model_path(MODEL)
    baseline = mean_nll(base_path, None, val_pairs)
    lines += [f"{len(examples)} training examples ({len(benign)} benign); validation NLL of the method's targets "
              f"on {len(val_pairs)} validation prompts; base model: {baseline:.3f}.", "",
              "| learning rate | epochs | steps | validation NLL | train seconds |", "|---|---|---|---|---|"]
    best, best_nll = None, math.inf
    with tempfile.TemporaryDirectory() as tmp:
        for lr in [float(v) for v in args.lrs.split(",")]:
            for epochs in [float(v) for v in args.epochs.split(",")]:
                settings = replace(TrainSettings(), learning_rate=lr, epochs=epochs)
                result = train_lora(base_path, examples, Path(tmp) / f"{lr}-{epochs}", lora=LoraSettings(),
                                    train=settings)
                nll = mean_nll(base_path, str(result.adapter_path), val_pairs)
                lines.append(f"| {lr:g} | {epochs:g} | {result.steps} | {nll:.3f} | {result.seconds:.0f} |")
                log(lines[-1])
                if nll < best_nll:
                    best, best_nll = (lr, epochs), nll
    lines += ["", f"Chosen: learning rate {best[0]:g}, {best[1]:g} epochs (lowest validation NLL)."]
    report = "\n".join(lines) + "\n"
    args.out.write_text(report, encoding="utf-8")
    print(report)
    return 0


def store_benign(store: Store, llm, n: int) -> list:  # noqa: ANN001
    from matrix_assets.store.prompt_sets import ensure_prompt_set
    from matrix_assets.training.sft import SFTExample

    ensure_prompt_set(store, "vicuna_bench")
    prompts = store.train_prompts("vicuna_bench", limit=n)
    answers = answer_directly(llm, [p.text for p in prompts], 128)
    return [SFTExample(p.text, a) for p, a in zip(prompts, answers) if a.strip()]


if __name__ == "__main__":
    raise SystemExit(main())
