"""The vLLM path on this machine, side by side with the in-process engine.

Simulation, same scenes: --scenes AdvBench prompts (bench_simulation's defaults: 3 roles, 3 plan steps,
    2 rounds), their initial answers made once by the in-process engine (not measured); then the scenes are played
    twice, each on a fresh store (no cache shared): by the in-process engine (`TransformersBackend` with the
    resource's defaults: refill decoding, oneDNN-packed linears, batch 32) and by a vLLM-CPU server
    (`OpenAICompatibleBackend`, --concurrency requests in flight, the server batching them). Reported: wall time,
    generated tokens, tokens/s, and the ratio vLLM / in-process. Greedy decoding both ways; the transcripts are
    compared (equal scenes mean the two engines gave the same text all the way through).
The paper profile through the managed vLLM engine, end to end, is `benchmarks/bench_paper_slice.py`.

    .venv/bin/python benchmarks/bench_vllm.py      # needs `bash scripts/install_vllm.sh`; writes results/vllm.md
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import platform  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

from bench_main_job import write_results  # noqa: E402  (the script's folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "vllm.md"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def play(backend, inputs, settings, db_path: Path) -> tuple[float, int, list]:  # noqa: ANN001
    from matrix_assets.methods.matrix.engine import run_scenes
    from matrix_assets.store.db import Store
    from matrix_assets.store.generation_cache import CachedBackend

    cached = CachedBackend(backend, Store(f"sqlite:///{db_path}"), chunk_size=32)
    began = time.perf_counter()
    transcripts = run_scenes(cached, inputs, settings)
    return time.perf_counter() - began, cached.stats.completion_tokens, transcripts


def simulation(args: argparse.Namespace, root: Path) -> dict:
    from matrix_assets.data.loaders import load_bundled
    from matrix_assets.defs.resources import LocalTransformersLLM
    from matrix_assets.llm.models import DEFAULT_MODEL
    from matrix_assets.llm.openai_backend import OpenAICompatibleBackend
    from matrix_assets.llm.transformers_backend import TransformersBackend
    from matrix_assets.llm.vllm_server import for_this_machine
    from matrix_assets.methods.base import answer_directly
    from matrix_assets.methods.matrix.engine import SceneSettings
    from matrix_assets.methods.matrix.scene import SceneInput

    settings = SceneSettings(n_roles=3, min_roles=3, plan_steps=3, max_rounds=2, max_reactions=3)
    resource = LocalTransformersLLM()
    local = TransformersBackend(DEFAULT_MODEL, batch_size=resource.batch_size, batch_tokens=resource.batch_tokens)
    questions = [r.text for r in load_bundled("advbench")[: args.scenes]]
    answers = answer_directly(local, questions, 128)
    inputs = [SceneInput(f"advbench-{i}", q, a) for i, (q, a) in enumerate(zip(questions, answers))]
    local_s, local_tokens, local_scenes = play(local, inputs, settings, root / "local.db")
    del local

    server = for_this_machine(DEFAULT_MODEL, "smollm2", free_port(), root / "vllm.log")
    began = time.perf_counter()
    server.start()
    startup = time.perf_counter() - began
    try:
        remote = OpenAICompatibleBackend(server.base_url, "smollm2", api_key_env=None,
                                         max_concurrency=args.concurrency, timeout_s=300)
        vllm_s, vllm_tokens, vllm_scenes = play(remote, inputs, settings, root / "vllm.db")
    finally:
        server.stop()
    same = sum(a.events == b.events and a.roles == b.roles for a, b in zip(local_scenes, vllm_scenes))
    return {"scenes": len(inputs), "local_s": local_s, "local_tokens": local_tokens, "vllm_s": vllm_s,
            "vllm_tokens": vllm_tokens, "startup_s": startup, "same_scenes": same}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=8, help="AdvBench scenes (default 8)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight to vLLM (default 32)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-vllm-") as tmp:
        root = Path(tmp)
        sim = simulation(args, root)
    local_rate, vllm_rate = sim["local_tokens"] / sim["local_s"], sim["vllm_tokens"] / sim["vllm_s"]
    lines = [
        "# vLLM-CPU vs the in-process engine",
        "",
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.machine()}, {os.cpu_count()} CPUs; "
        f"`python benchmarks/bench_vllm.py {' '.join(sys.argv[1:])}`.",
        "",
        f"The same {sim['scenes']} AdvBench scenes (3 roles, 3 plan steps, 2 rounds), greedy, fresh stores:",
        "",
        "| engine | wall (s) | generated tokens | tokens/s |",
        "|---|---|---|---|",
        f"| in-process (refill, oneDNN, batch 32) | {sim['local_s']:.0f} | {sim['local_tokens']} | {local_rate:.1f} |",
        f"| vLLM-CPU server, {args.concurrency} requests in flight | {sim['vllm_s']:.0f} | {sim['vllm_tokens']} | "
        f"{vllm_rate:.1f} |",
        "",
        f"**vLLM / in-process tokens/s: {vllm_rate / local_rate:.2f}**; the server took {sim['startup_s']:.0f} s to "
        f"start (not counted above). Scenes identical both ways: {sim['same_scenes']}/{sim['scenes']}.",
    ]
    write_results(args.out, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
