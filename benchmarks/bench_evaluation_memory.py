"""Peak memory of answering with several checkpoints: held at once (as the evaluation did) vs one at a time.

The evaluation answers every held-out prompt with the base model and with each method's checkpoint. It used to
build every checkpoint's backend up front and keep all of them for the process's life; each is a full copy of the
base weights (a LoRA adapter merged in, the linears packed for oneDNN: ~2.3 GB resident for the 135M model). Now
`evaluation.run.answer_prompts` builds a checkpoint's backend when its turn comes and the resource frees it after
it has answered.

Both ways run here side by side, each in a fresh child process (so neither inherits the other's memory), on the
bundled SmolLM2-135M-Instruct with --adapters LoRA adapters of random weights (rank 8 on every attention and MLP
projection, like the project's), answering the same --prompts AdvBench prompts with --tokens new tokens each. The
child reports its peak RSS (`resource.getrusage`) and wall time; the answers of both ways must be identical.

    .venv/bin/python benchmarks/bench_evaluation_memory.py            # writes benchmarks/results/evaluation_memory.md
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "evaluation_memory.md"


def make_adapters(folder: Path, n: int) -> list[str]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from matrix_assets.llm.models import DEFAULT_MODEL, resolve_model_path

    paths = []
    for index in range(n):
        torch.manual_seed(index)
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(DEFAULT_MODEL), dtype=torch.float32)
        config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        peft_model = get_peft_model(model, config)
        with torch.no_grad():  # B starts at zero; random B makes each adapter change the answers
            for name, parameter in peft_model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.02)
        out = folder / f"adapter_{index}"
        peft_model.save_pretrained(out)
        paths.append(str(out))
    return paths


def child(mode: str, adapters: list[str], n_prompts: int, tokens: int) -> dict:
    """One way of answering, in this (fresh) process."""
    from matrix_assets.data.loaders import load_bundled
    from matrix_assets.defs.resources import LocalTransformersLLM
    from matrix_assets.evaluation.run import EvalPrompt, answer_prompts

    prompts = [EvalPrompt(f"p{i}", r.text, "harmful", "advbench", None)
               for i, r in enumerate(load_bundled("advbench")[:n_prompts])]
    llm = LocalTransformersLLM()
    began = time.perf_counter()
    if mode == "held":  # every backend built up front and kept
        models = {"base": llm.backend(), **{f"ckpt{i}": llm.backend(a) for i, a in enumerate(adapters)}}
        answers = answer_prompts(models, prompts, tokens)
    else:  # built in turn, freed after answering
        models = {"base": llm.backend(),
                  **{f"ckpt{i}": functools.partial(llm.backend, a) for i, a in enumerate(adapters)}}
        by_label = {f"ckpt{i}": a for i, a in enumerate(adapters)}
        answers = answer_prompts(models, prompts, tokens,
                                 done_with=lambda label: label in by_label and llm.release(by_label[label]))
    seconds = time.perf_counter() - began
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "peak_rss_mib": round(peak_mib), "seconds": round(seconds, 1),
            "answers": {label: [a.answer for a in items] for label, items in answers.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=5, help="checkpoints besides the base model (default 5: "
                        "the five methods of the default run)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--adapter-paths", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, json.loads(args.adapter_paths), args.prompts, args.tokens)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(Path(tmp), args.adapters)
        results = {}
        for mode in ("held", "one_at_a_time"):
            done = subprocess.run(
                [sys.executable, __file__, "--child", mode, "--adapter-paths", json.dumps(adapters),
                 "--prompts", str(args.prompts), "--tokens", str(args.tokens)],
                capture_output=True, text=True, check=True)
            results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    held, turn = results["held"], results["one_at_a_time"]
    same = held["answers"] == turn["answers"]
    distinct = len({tuple(v) for v in held["answers"].values()})
    lines = [
        "# Evaluation memory: checkpoints held at once vs one at a time",
        "",
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.machine()}, {os.cpu_count()} CPUs; "
        f"`{' '.join(['python', 'benchmarks/bench_evaluation_memory.py', *sys.argv[1:]])}`.",
        f"Base model + {args.adapters} random LoRA adapters, {args.prompts} AdvBench prompts x {args.tokens} new "
        "tokens each, every way in a fresh child process.",
        "",
        "| way | peak RSS (MiB) | wall (s) |",
        "|---|---|---|",
        f"| every checkpoint built up front and held (before) | {held['peak_rss_mib']} | {held['seconds']} |",
        f"| one checkpoint at a time, freed after answering (now) | {turn['peak_rss_mib']} | {turn['seconds']} |",
        "",
        "Wall times are the two children's, run one after the other: compare them only on a quiet machine.",
        "",
        f"Peak RSS ratio, now / before: **{turn['peak_rss_mib'] / held['peak_rss_mib']:.2f}**. "
        f"Answers identical both ways: **{same}** ({distinct} distinct answer lists over "
        f"{len(held['answers'])} models).",
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
