"""GPU benchmark: decode steps, the simulation's tokens/s and a LoRA training step, on random weights of the real
SmolLM2 architectures (they cost the same per token as the trained weights, and need no download).

One command on a machine with a CUDA GPU (`python benchmarks/bench_gpu.py`), all measurements side by side in
one process, printed and written as Markdown (`--out`):

 (a) raw decode ms per step: plain `model.generate` (dynamic KV cache, eager) at batch 1 and --batch, prompts of
     --prompt-tokens tokens, --new-tokens tokens each with EOS suppressed. A step = (time for N new tokens - time
     for 1) / (N - 1), so prefill is not counted.
 (b) the same with the static KV cache that transformers compiles (CUDA graphs): what `decoding="static"`, the
     backend's GPU default, runs. The first call (compilation) is timed apart and not counted.
 (c) the MATRIX simulation's generated tokens/s on --scenes AdvBench scenes through `TransformersBackend` on the
     GPU (random weights: the scenes are nonsense and fall back everywhere; only the token cost is measured),
     against raw batched generate at --batch (tokens/s of (a) at --batch): the ratio says how much of the
     machine the simulation's request pattern keeps busy.
 (d) LoRA training: seconds per optimiser step of `train_lora` (TRL SFTTrainer + PEFT, bf16) on --train-examples
     synthetic examples of about --train-tokens tokens, batch --train-batch: the mean over --train-steps steps
     (the first one's warm-up included); peak GPU memory.

Needs torch with CUDA, transformers, peft, trl and datasets. Without a GPU it exits with status 3, unless
`--device cpu` (used by the smoke test, with `--arch tiny`).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TOKENIZER = REPO / "tests" / "fixtures" / "smollm2_tokenizer"

# The SmolLM2 family's shapes (config.json of HuggingFaceTB/SmolLM2-135M-Instruct and -1.7B-Instruct).
ARCHITECTURES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3),
    "1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                 num_key_value_heads=32),
}


def log(message: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def random_model(arch: str, folder: Path, device: str) -> Path:
    """Random weights of the architecture, saved with the real tokenizer and chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=8192, rope_theta=100000.0,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True,
                         **ARCHITECTURES[arch])
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    out = folder / arch
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def sync(device: str) -> None:
    import torch

    if device != "cpu":
        torch.cuda.synchronize()


def decode_ms_per_step(model, batch: int, prompt_tokens: int, new_tokens: int, device: str,  # noqa: ANN001
                       static: bool) -> tuple[float, float]:
    """(ms per decode step, seconds of the first call) for `model.generate` at this batch."""
    import torch

    ids = torch.randint(100, 40000, (batch, prompt_tokens), device=device)
    kwargs = {"do_sample": False, "pad_token_id": 2, "suppress_tokens": [2]}
    if static:
        kwargs["cache_implementation"] = "static"

    def timed(n: int) -> float:
        sync(device)
        began = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                           min_new_tokens=n, **kwargs)
        sync(device)
        return time.perf_counter() - began

    first = timed(new_tokens)  # compilation (static) or allocator warm-up
    one, full = timed(1), timed(new_tokens)
    return (full - one) / (new_tokens - 1) * 1000, first


def simulation_tokens_per_s(model_dir: Path, scenes: int, batch: int, device: str) -> tuple[float, int, float]:
    from matrix_assets.llm.transformers_backend import TransformersBackend
    from matrix_assets.methods.matrix.engine import SceneSettings, run_scenes
    from matrix_assets.methods.matrix.scene import SceneInput

    backend = TransformersBackend(str(model_dir), device=device, batch_size=batch, gpu_batch_size=batch)
    generated = 0
    completion = backend._completion

    def counting(prompt, tokens, params):  # noqa: ANN001, ANN202
        nonlocal generated
        generated += len(tokens)
        return completion(prompt, tokens, params)

    backend._completion = counting  # type: ignore[method-assign]
    from matrix_assets.data.loaders import load_bundled

    questions = [r.text for r in load_bundled("advbench")[:scenes]]
    inputs = [SceneInput(f"p{i}", q, "Sure, here is how.") for i, q in enumerate(questions)]
    began = time.perf_counter()
    run_scenes(backend, inputs, SceneSettings())
    seconds = time.perf_counter() - began
    return generated / seconds, generated, seconds


def training_seconds_per_step(model_dir: Path, examples: int, tokens: int, batch: int, steps: int,
                              work: Path) -> tuple[float, float]:
    import torch

    from matrix_assets.training.sft import SFTExample, TrainSettings, train_lora

    half = " ".join(["word"] * (tokens // 2))  # about one token per word; the chat template adds ~40
    data = [SFTExample(f"question {i}: {half}", f"answer {i}: {half}") for i in range(examples)]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = train_lora(str(model_dir), data, work / "train",
                        train=TrainSettings(max_steps=steps, batch_size=batch, max_length=tokens + 128))
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    return result.seconds / max(1, result.steps), peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke runs only)")
    parser.add_argument("--arch", default="135m,1.7b", help=f"comma list of {', '.join(ARCHITECTURES)}")
    parser.add_argument("--batch", type=int, default=256, help="the large batch of (a), (b) and (c)")
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--scenes", type=int, default=64, help="AdvBench scenes of (c) (0 skips it)")
    parser.add_argument("--train-examples", type=int, default=64)
    parser.add_argument("--train-tokens", type=int, default=256)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--train-steps", type=int, default=4, help="timed steps of (d) (0 skips it)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu.md")
    args = parser.parse_args()

    import torch
    import transformers

    if args.device != "cpu" and not torch.cuda.is_available():
        print(f"no CUDA device visible to torch {torch.__version__}; nothing measured (use --device cpu for a "
              "smoke run)", file=sys.stderr)
        return 3
    device_name = torch.cuda.get_device_name() if args.device != "cpu" else platform.processor() or "CPU"
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch.split(","):
            log(f"{arch}: random weights")
            folder = random_model(arch, Path(tmp), args.device)
            from transformers import AutoModelForCausalLM

            dtype = torch.bfloat16 if args.device != "cpu" else torch.float32
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").to(
                args.device).eval()
            row: dict = {"arch": arch, "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
            for batch in sorted({1, args.batch}):
                for static in (False, True):
                    name = f"{'static' if static else 'eager'}_b{batch}"
                    log(f"{arch}: {name}")
                    ms, first = decode_ms_per_step(model, batch, args.prompt_tokens, args.new_tokens, args.device,
                                                   static)
                    row[f"{name}_ms"], row[f"{name}_first_s"] = ms, first
            del model
            if args.scenes:
                log(f"{arch}: simulation of {args.scenes} scenes")
                tps, tokens, seconds = simulation_tokens_per_s(folder, args.scenes, args.batch, args.device)
                row.update(sim_tokens_per_s=tps, sim_tokens=tokens, sim_seconds=seconds)
            if args.train_steps:
                log(f"{arch}: LoRA training")
                row["train_s_per_step"], row["train_peak_gib"] = training_seconds_per_step(
                    folder, args.train_examples, args.train_tokens, args.train_batch, args.train_steps, Path(tmp))
            rows.append(row)
    report = render(args, rows, device_name, torch.__version__, transformers.__version__)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report, encoding="utf-8")
    (args.out.with_suffix(".json")).write_text(json.dumps(rows, indent=2), encoding="utf-8")
    print(report)
    return 0


def render(args: argparse.Namespace, rows: list[dict], device: str, torch_version: str, tf_version: str) -> str:
    b = args.batch
    lines = [
        "# GPU benchmark", "",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC · {device} · torch {torch_version} · transformers "
        f"{tf_version} · random weights of the real architectures", "",
        f"Command: `python benchmarks/bench_gpu.py {' '.join(sys.argv[1:])}`", "",
        f"Prompts of {args.prompt_tokens} tokens, {args.new_tokens} new tokens (EOS suppressed).", "",
        f"| model | params | eager b1 ms/step | eager b{b} ms/step | static b1 ms/step | static b{b} ms/step | "
        f"raw static b{b} tok/s | simulation tok/s | simulation ÷ raw | LoRA s/step | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        raw = b / (r[f"static_b{b}_ms"] / 1000)
        sim = r.get("sim_tokens_per_s")
        lines.append(
            f"| {r['arch']} | {r['params_m']:.0f} M | {r['eager_b1_ms']:.1f} | {r[f'eager_b{b}_ms']:.1f} | "
            f"{r['static_b1_ms']:.1f} | {r[f'static_b{b}_ms']:.1f} | {raw:,.0f} | "
            f"{f'{sim:,.0f}' if sim else '-'} | {f'{sim / raw:.2f}' if sim else '-'} | "
            f"{r.get('train_s_per_step', float('nan')):.2f} | {r.get('train_peak_gib', float('nan')):.1f} |")
    lines += ["", "Static-cache first calls (compilation, not counted): " + ", ".join(
        f"{r['arch']} b{b} {r[f'static_b{b}_first_s']:.0f} s" for r in rows), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
