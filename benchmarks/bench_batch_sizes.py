"""Tokens/s of the local engine at batch 16, 32, 64 and 128, for the prompt shapes the main job decodes.

Two shapes, the same for every batch size:
- `evaluation`: held-out AdvBench and XSTest prompts as the evaluation sends them (a user turn, ~20-40 prompt
  tokens with the chat template), up to --eval-tokens new tokens (the quick profile's 64);
- `scene`: the same requests behind ~170 tokens of context (a human-written HH-RLHF dialogue as the system turn),
  as the scene engine's and the society's calls are (on average 172 prompt tokens for ~60 generated ones).

Each (shape, batch size) runs in a fresh child process (so the peak RSS is its own) on the bundled
SmolLM2-135M-Instruct with the project's `TransformersBackend` (refill decoding, oneDNN-packed linears), greedy,
the same --prompts requests each time; the answers must not depend on the batch size beyond float-rounding ties.

    .venv/bin/python benchmarks/bench_batch_sizes.py        # ~10 min; writes benchmarks/results/batch_sizes.md
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "batch_sizes.md"
BATCH_SIZES = (16, 32, 64, 128)


def conversations(shape: str, n: int) -> list[list[dict[str, str]]]:
    from matrix_assets.data.hh_harmless import seed_pairs
    from matrix_assets.data.loaders import load_bundled

    half = n // 2
    texts = [r.text for r in load_bundled("advbench")[-half:]] + [r.text for r in load_bundled("xstest_safe")[: n - half]]
    if shape == "evaluation":
        return [[{"role": "user", "content": t}] for t in texts]
    pairs = seed_pairs()
    out = []
    for i, text in enumerate(texts):
        turns = [f"Human: {q}\nAssistant: {a}" for q, a in (pairs[(2 * i) % len(pairs)], pairs[(2 * i + 1) % len(pairs)])]
        context = ("Earlier in this scene:\n" + "\n".join(turns))[:800]
        out.append([{"role": "system", "content": context}, {"role": "user", "content": text}])
    return out


def child(shape: str, batch_size: int, n_prompts: int, tokens: int) -> dict:
    from matrix_assets.llm.base import GenerationParams
    from matrix_assets.llm.models import DEFAULT_MODEL
    from matrix_assets.llm.transformers_backend import TransformersBackend

    chats = conversations(shape, n_prompts)
    backend = TransformersBackend(DEFAULT_MODEL, batch_size=batch_size)
    params = GenerationParams(max_new_tokens=tokens)
    backend.generate(chats[:2], params.replace(max_new_tokens=4))  # warm-up: first-call allocations
    began = time.perf_counter()
    completions = backend.generate(chats, params)
    seconds = time.perf_counter() - began
    return {"shape": shape, "batch_size": batch_size, "seconds": round(seconds, 2),
            "prompt_tokens": sum(c.prompt_tokens for c in completions),
            "new_tokens": sum(c.completion_tokens for c in completions),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "answers": [c.text for c in completions]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=128, help="requests per run (default 128)")
    parser.add_argument("--eval-tokens", type=int, default=64, help="new tokens, evaluation shape (default 64)")
    parser.add_argument("--scene-tokens", type=int, default=60, help="new tokens, scene shape (default 60)")
    parser.add_argument("--batch-sizes", default=",".join(map(str, BATCH_SIZES)),
                        help="comma-separated (default 16,32,64,128)")
    parser.add_argument("--shapes", default="evaluation,scene")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    tokens_of = {"evaluation": args.eval_tokens, "scene": args.scene_tokens}
    if args.child:
        shape, batch = args.child.split(":")
        print(json.dumps(child(shape, int(batch), args.prompts, tokens_of[shape])))
        return 0
    rows = []
    for shape in args.shapes.split(","):
        reference = None
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            done = subprocess.run([sys.executable, __file__, "--child", f"{shape}:{batch}",
                                   "--prompts", str(args.prompts), "--eval-tokens", str(args.eval_tokens),
                                   "--scene-tokens", str(args.scene_tokens)],
                                  capture_output=True, text=True, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            answers = result.pop("answers")
            reference = reference or (batch, answers, result["new_tokens"] / result["seconds"])
            result["same_answers"] = sum(a == b for a, b in zip(answers, reference[1]))
            result["tok_s"] = round(result["new_tokens"] / result["seconds"], 1)
            result["vs_first"] = round(result["tok_s"] / reference[2], 2)
            rows.append(result)
            print(json.dumps(result), flush=True)
    lines = [
        "# Batch size sweep of the local engine",
        "",
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.machine()}, {os.cpu_count()} CPUs; "
        f"`{' '.join(['python', 'benchmarks/bench_batch_sizes.py', *sys.argv[1:]])}`. {args.prompts} requests per "
        "run, greedy, refill decoding, each run in a fresh child process.",
        "",
        "| shape | batch | prompt tokens | new tokens | wall (s) | new tok/s | vs first batch size | peak RSS (MiB) "
        "| answers identical to the first batch size |",
        "|---|---|---|---|---|---|---|---|---|",
        *[f"| {r['shape']} | {r['batch_size']} | {r['prompt_tokens']} | {r['new_tokens']} | {r['seconds']} | "
          f"{r['tok_s']} | {r['vs_first']}x | {r['peak_rss_mib']} | {r['same_answers']}/{args.prompts} |"
          for r in rows],
        "",
        "Throughput ratios come from one run, side by side; absolute seconds are not comparable across machines.",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
