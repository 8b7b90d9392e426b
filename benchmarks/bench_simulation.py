"""Benchmark of the batched MATRIX scene simulation on the bundled default model.

Everything runs in one process on SmolLM2-135M-Instruct (TransformersBackend, loaded once), on a fixed
list of AdvBench harmful prompts (the bundled file, `goal` column, first --scenes rows). The initial
answers r0 are generated once at the start and are not measured. Each measurement gets a fresh
temporary SQLite store, so no run profits from another's generation cache (except (c), on purpose).

Measurements (all reported as ratios measured side by side in this run, never absolute targets):

 (a) generation throughput vs the raw limit. `run_scenes` runs through CachedBackend over a counting
     wrapper, as in the pipeline: all scenes on one live backend session (`ChatBackend.serve`, refill
     decoding by default: a finished row leaves the batch at once and the next queued request takes its
     slot). The wrapper records every request (prompt token length, generated tokens up to EOS,
     max_new_tokens, decoding parameters) and the session's wall time.
     simulation tokens/s = generated tokens / session time.
     Right after the session the same shapes are replayed on the raw model: padded `model.generate`
     (TransformersBackend.generate_encoded) on synthetic prompts of the same token lengths (windows of
     real token ids), per decoding setting, in length-sorted --batch-size batches, with
     min_new_tokens = max_new_tokens, so every row generates the full length.
     raw tokens/s = rows x max_new_tokens / replay time. Ratio (a) = simulation tokens/s / raw tokens/s.
     The table splits the ratio into "useful fraction of decoded rows" (generated tokens / decoded
     row-steps; padded decoding wastes steps on rows that already ended) and "per-step speed"
     (rows x steps per second in the simulation / raw rows x steps per second); their product is (a).
 (b) speed-up over sequential generation: the same scenes with a wrapper that forwards the
     conversations one at a time (batch size 1) to the same model, vs the batched run. By default it
     runs all the same scenes; --seq-scenes N runs only the first N to save time, which is why the ratio
     is stated per scene: (sequential s / scene) / (batched s / scene).
 (c) warm cache: the batched simulation again, on the store of the cold batched run. Reports the
     warm/cold wall-time ratio and the number of backend calls of the warm run (must be 0), and
     checks that the warm transcripts equal the cold ones.
 (d) peak memory: the process's max RSS (resource.getrusage) after each phase, and the memory of
     the model's parameters and buffers.

Threads: by default torch's own choice (one intra-op thread per core, 2 on the project's machine), as in
the pipeline. On a machine that other processes load at the same time, OpenMP threads that wait for a busy
core slow generation down by up to 10x; use --threads 1 there (both sides of every ratio use the setting).
Targets: (a) >= 0.8, (b) >= 3x at batch size 8, (c) < 5% and 0 backend calls.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Iterator, Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from matrix_assets.llm.base import (  # noqa: E402
    ChatBackend, Completion, Conversation, GenerationParams, Job, OnCompletion, TakeJobs,
)
from matrix_assets.llm.refill import DecodeStats  # noqa: E402
from matrix_assets.store.generation_cache import CachedBackend  # noqa: E402
from matrix_assets.methods.base import answer_directly  # noqa: E402
from matrix_assets.methods.matrix.engine import SceneSettings, run_scenes  # noqa: E402
from matrix_assets.methods.matrix.scene import SceneInput, Transcript  # noqa: E402
from matrix_assets.store.db import Store  # noqa: E402

MODEL = "smollm2-135m-instruct"
ADVBENCH = REPO / "matrix_assets" / "data" / "advbench_harmful_behaviors.csv"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# -- prompts ---------------------------------------------------------------------------------------


def harmful_prompts(n: int) -> list[str]:
    """The first n AdvBench goals (the bundled loader, or the CSV's `goal` column as a fallback)."""
    try:
        from matrix_assets.data.loaders import load_bundled

        texts = [r.text for r in load_bundled("advbench")]
    except Exception as exc:  # the loader is maintained elsewhere; the CSV is the source of truth
        log(f"load_bundled('advbench') failed ({exc}); reading {ADVBENCH.name} directly")
        import csv

        with ADVBENCH.open(newline="", encoding="utf-8") as handle:
            texts = [row["goal"].strip() for row in csv.DictReader(handle) if row["goal"].strip()]
    if len(texts) < n:
        raise SystemExit(f"AdvBench has only {len(texts)} prompts, {n} requested")
    return texts[:n]


# -- backend wrappers --------------------------------------------------------------------------------


@dataclass
class CallRecord:
    """One backend `generate` call as seen by the counting wrapper."""

    n_conversations: int
    prompt_tokens: list[int]
    completion_tokens: list[int]
    max_new_tokens: int
    params: GenerationParams
    seconds: float
    decode_slots: int = 0  # sum over the model batches of rows x decode steps (padding included)
    replay_rows: int = 0
    replay_tokens: int = 0  # rows x max_new_tokens actually generated by the raw replay
    replay_seconds: float = 0.0
    replay_short_rows: int = 0  # replay rows that stopped before max_new_tokens (should be 0)
    replay_prefill_seconds: float = 0.0  # the replay batches' prompts alone, one forward pass each, timed apart


def model_batches(prompt_tokens: Sequence[int], batch_size: int) -> list[list[int]]:
    """Row indices of the `model.generate` calls TransformersBackend.generate makes for one call."""
    order = sorted(range(len(prompt_tokens)), key=lambda i: prompt_tokens[i])
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


class CountingBackend(ChatBackend):
    """Forwards to the real backend and records every call; optionally replays each call's shape raw."""

    def __init__(self, inner: ChatBackend, *, batch_size: int, replay: RawReplay | None = None,
                 one_at_a_time: bool = False) -> None:
        self.inner = inner
        self.model_id = inner.model_id
        self.batch_size = batch_size
        self.replay = replay
        self.one_at_a_time = one_at_a_time
        self.calls: list[CallRecord] = []
        self.score_requests = 0
        self.score_seconds = 0.0
        self.session_scores = 0  # verdicts answered inside the live session (a backend that serves_scores)

    @property
    def serves_scores(self) -> bool:  # type: ignore[override]
        return not self.one_at_a_time and self.inner.serves_scores

    def generate(self, conversations: Sequence[Conversation], params: GenerationParams) -> list[Completion]:
        """A plain batched call (the simulation itself uses `serve`): timed and recorded like a session."""
        began = time.perf_counter()
        if self.one_at_a_time:
            completions = [c for conv in conversations for c in self.inner.generate([conv], params)]
        else:
            completions = self.inner.generate(conversations, params)
        self._record([(params, c) for c in completions], time.perf_counter() - began)
        return completions

    def next_token_logprobs(self, conversations: Sequence[Conversation], candidates: Sequence[str], *,
                            assistant_prefix: str = "") -> list[dict[str, float]]:
        """The modulator's verdicts (one forward pass per prompt, no decoding): forwarded and counted, their time
        inside the session they are asked from."""
        self.score_requests += len(conversations)
        began = time.perf_counter()
        try:
            if self.one_at_a_time:
                return [s for conv in conversations for s in
                        self.inner.next_token_logprobs([conv], candidates, assistant_prefix=assistant_prefix)]
            return self.inner.next_token_logprobs(conversations, candidates, assistant_prefix=assistant_prefix)
        finally:
            self.score_seconds += time.perf_counter() - began

    def serve(self, take: TakeJobs, on_completion: OnCompletion) -> None:
        """The simulation's live session, timed as a whole."""
        done: list[tuple[GenerationParams, Completion]] = []

        def record(job: Job, completion: Completion) -> None:
            if job.candidates:  # a verdict: its prompt ran in the session's passes, it generated nothing
                self.session_scores += 1
            else:
                done.append((job.params, completion))
            on_completion(job, completion)

        began = time.perf_counter()
        if self.one_at_a_time:  # the reference implementation's way: one request at a time
            while jobs := take(1):
                record(jobs[0], self.inner.generate([jobs[0].conversation], jobs[0].params)[0])
        else:
            self.inner.serve(take, record)
        self._record(done, time.perf_counter() - began)

    def _record(self, done: Sequence[tuple[GenerationParams, Completion]], seconds: float) -> None:
        """One CallRecord per decoding setting; each replayed raw right away when a replay is attached."""
        groups: dict[GenerationParams, list[Completion]] = {}
        for params, completion in done:
            groups.setdefault(params, []).append(completion)
        records = []
        for params, completions in groups.items():
            records.append(CallRecord(
                n_conversations=len(completions),
                prompt_tokens=[c.prompt_tokens for c in completions],
                completion_tokens=[c.completion_tokens for c in completions],
                max_new_tokens=params.max_new_tokens, params=params, seconds=0.0,
            ))
            self._count_slots(records[-1])
        total_slots = sum(r.decode_slots for r in records) or 1
        for r in records:  # the call's time, shared by decoded row-steps (only sums are reported)
            r.seconds = seconds * r.decode_slots / total_slots
        self.calls += records
        if self.replay is not None:
            for r in records:
                self.replay.run(r)

    def _count_slots(self, record: CallRecord) -> None:
        params = record.params
        if getattr(self.inner, "decoding", "padded") == "refill" and not self.one_at_a_time:
            # A row leaves the batch at once: it costs its tokens plus the step that sampled EOS.
            record.decode_slots = sum(min(params.max_new_tokens, n + 1) for n in record.completion_tokens)
            return
        size = 1 if self.one_at_a_time else self.batch_size
        for rows in model_batches(record.prompt_tokens, size):
            # generate() stops once every row has ended; rows that ended early are padding until then.
            steps = min(params.max_new_tokens, max(record.completion_tokens[i] for i in rows) + 1)
            record.decode_slots += len(rows) * steps

    @property
    def replay_seconds(self) -> float:
        """Time the replay took inside the simulation's wall time (its prefill timing included), to subtract."""
        return sum(c.replay_seconds + c.replay_prefill_seconds for c in self.calls)


class RawReplay:
    """The raw limit: same batch shapes, straight into generate_encoded, every row at full length."""

    def __init__(self, backend, token_pool: list[int], batch_size: int) -> None:  # noqa: ANN001
        self.backend = backend
        self.pool = token_pool
        self.batch_size = batch_size
        self._offset = 0

    def _prompt(self, length: int) -> list[int]:
        """`length` consecutive real token ids (a different window for every row)."""
        start = self._offset % len(self.pool)
        self._offset += 97
        ids = (self.pool[start:] + self.pool * (1 + length // len(self.pool)))[:length]
        return ids

    @contextlib.contextmanager
    def _full_length(self, n_tokens: int) -> Iterator[None]:
        # Workaround: generate_encoded takes no min_new_tokens, so the bound `generate` of this model
        # instance is shadowed for the duration of the replay (EOS is suppressed until n_tokens).
        model = self.backend.model
        model.generate = functools.partial(type(model).generate, model, min_new_tokens=n_tokens)
        try:
            yield
        finally:
            del model.generate

    def _prefill_seconds(self, batch: list[list[int]]) -> float:
        """How long the batch's prompts alone take (one padded forward pass, as `generate` starts with), so the
        replay's time splits into prefill and decoding."""
        import torch

        from matrix_assets.llm.refill import left_padded

        ids, mask = left_padded(batch, self.backend.tokenizer.pad_token_id)
        began = time.perf_counter()
        with torch.inference_mode():
            self.backend.model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
        return time.perf_counter() - began

    def run(self, record: CallRecord) -> None:
        params = record.params
        for rows in model_batches(record.prompt_tokens, self.batch_size):
            batch = [self._prompt(max(1, record.prompt_tokens[i])) for i in rows]
            record.replay_prefill_seconds += self._prefill_seconds(batch)
            with self._full_length(params.max_new_tokens):
                began = time.perf_counter()
                out = self.backend.generate_encoded(batch, params)
                record.replay_seconds += time.perf_counter() - began
            record.replay_rows += len(batch)
            record.replay_tokens += len(batch) * params.max_new_tokens
            record.replay_short_rows += sum(1 for c in out if c.completion_tokens < params.max_new_tokens)


# -- measurements --------------------------------------------------------------------------------------


@dataclass
class RunResult:
    label: str
    scenes: int
    wall_seconds: float  # run_scenes wall time, raw replay excluded
    calls: list[CallRecord]
    transcripts: list[Transcript] = field(repr=False)
    cache_hits: int = 0
    cache_requested: int = 0
    prefix_reused_tokens: int = 0  # prompt tokens not prefilled thanks to the backend's prefix cache
    decode: DecodeStats | None = None  # the backend's refill accounting of this run (None: another decoding)
    score_seconds: float = 0.0  # verdict requests (next-token log-probabilities), inside the session's time
    score_requests: int = 0
    session_scores: int = 0  # verdicts whose prompts ran inside the session's passes (their time is in them)

    @property
    def prompt_tokens(self) -> int:
        return sum(sum(c.prompt_tokens) for c in self.calls)

    @property
    def backend_seconds(self) -> float:
        return sum(c.seconds for c in self.calls)

    @property
    def conversations(self) -> int:
        return sum(c.n_conversations for c in self.calls)

    @property
    def generated_tokens(self) -> int:
        return sum(sum(c.completion_tokens) for c in self.calls)


def simulate(label: str, backend, inputs: Sequence[SceneInput], settings: SceneSettings, store: Store, *,  # noqa: ANN001
             batch_size: int, replay: RawReplay | None = None, one_at_a_time: bool = False) -> RunResult:
    counting = CountingBackend(backend, batch_size=batch_size, replay=replay, one_at_a_time=one_at_a_time)
    cached = CachedBackend(counting, store, chunk_size=batch_size)
    prefix_cache = getattr(backend, "prefix_cache", None)
    if prefix_cache is not None:  # every measured run starts without KV left over from an earlier phase
        backend.prefix_cache = prefix_cache = type(prefix_cache)(prefix_cache.max_tokens, prefix_cache.block)
    if hasattr(backend, "decode_stats"):
        backend.decode_stats = DecodeStats()
    began = time.perf_counter()
    transcripts = run_scenes(cached, inputs, settings)
    wall = time.perf_counter() - began - counting.replay_seconds
    decoded = getattr(backend, "decode_stats", None)
    return RunResult(label, len(inputs), wall, counting.calls, transcripts, cached.stats.hits, cached.stats.requested,
                     prefix_cache.reused_tokens if prefix_cache is not None else 0,
                     decoded if decoded is not None and decoded.decode_steps else None, counting.score_seconds,
                     counting.score_requests, counting.session_scores)


def fresh_store(root: str, name: str) -> Store:
    return Store(f"sqlite:///{Path(root) / name / 'matrix.db'}")


def transcript_signature(t: Transcript) -> tuple:
    return (t.target, tuple(t.plan), tuple((r.name, r.description) for r in t.roles),
            tuple((e.round, e.actor, e.kind, e.action, e.observation) for e in t.events), t.outcome)


# -- report ----------------------------------------------------------------------------------------------


def fmt_ratio(x: float) -> str:
    return f"{x:.2f}"


def split_rows(cold: RunResult, calls: Sequence[CallRecord], batch_size: int, gen_tokens: int, replay_tokens: int,
               replay_s: float, raw_tps: float) -> list[tuple[str, str, str, str]]:
    """Where the session's time went (the backend's own accounting) next to the replay's, and what (a) could
    reach, at most, if every decode step of the session ran a full batch."""
    d = cold.decode
    if d is None or not raw_tps:
        return []
    raw_prefill = sum(c.replay_prefill_seconds for c in calls)
    gen_prefill = max(0.0, d.prefill_seconds - cold.score_seconds)  # verdicts go through the same prefill
    rest = cold.backend_seconds - d.decode_seconds - d.joined_seconds - gen_prefill - cold.score_seconds
    step_s = d.decode_seconds / d.decode_steps
    # Rows that stepped in joined passes cost those passes nothing extra; the plain steps' rows fill full batches.
    full = gen_prefill + cold.score_seconds + rest + d.joined_seconds + (d.decode_row_steps / batch_size) * step_s
    raw_decode_tps = replay_tokens / (replay_s - raw_prefill) if replay_s > raw_prefill else 0.0
    decode_only = (d.decode_row_steps / d.decode_seconds) / raw_decode_tps if raw_decode_tps else 0.0
    joined_rows = d.joined_row_steps / d.joined_passes if d.joined_passes else 0.0
    verdicts = (f"verdicts {cold.score_seconds:.1f} s ({cold.score_requests} prompts asked apart, no token "
                f"generated)" if cold.score_requests else "")
    if cold.session_scores:
        verdicts += ("; " if verdicts else "") + (f"{cold.session_scores} verdict prompts ran inside those passes "
                                                  "(no token generated)")
    return [
        ("(a) the session's time, split",
         f"decode steps {d.decode_seconds:.1f} s ({d.decode_steps} steps, mean {d.mean_rows:.1f} of {batch_size} "
         f"rows); decode steps that also prefilled joining prompts {d.joined_seconds:.1f} s ({d.joined_passes} "
         f"passes, mean {joined_rows:.1f} rows stepping, {d.joined_prompt_tokens} prompt tokens); prefill alone "
         f"{gen_prefill:.1f} s (an empty batch's prompts); {verdicts}; the rest {rest:.1f} s "
         f"({d.prefill_tokens} prompt tokens run in prefill passes, verdicts included)", "", ""),
        ("(a) the raw replay's time, split",
         f"prefill {raw_prefill:.1f} s (its prompts alone, timed apart), decoding {replay_s - raw_prefill:.1f} s", "",
         ""),
        ("(a) decode steps alone: row-steps/s ÷ raw decoding tok/s", fmt_ratio(decode_only), "", ""),
        ("(a) at most, were every decode step full (row-steps ÷ batch size at the mean step time)",
         f"{fmt_ratio(gen_tokens / full / raw_tps)} ({gen_tokens} tok / {full:.1f} s)", "", ""),
    ]


def build_report(args: argparse.Namespace, settings: SceneSettings, meta: dict, cold: RunResult,
                 seq: RunResult, warm: RunResult, rss: list[tuple[str, float]]) -> str:
    calls = cold.calls
    gen_tokens = cold.generated_tokens
    backend_s = cold.backend_seconds
    sim_tps = gen_tokens / backend_s if backend_s else 0.0
    replay_tokens = sum(c.replay_tokens for c in calls)
    replay_s = sum(c.replay_seconds for c in calls)
    raw_tps = replay_tokens / replay_s if replay_s else 0.0
    ratio_a = sim_tps / raw_tps if raw_tps else 0.0
    slots = sum(c.decode_slots for c in calls)
    useful = gen_tokens / slots if slots else 0.0
    step_speed = (slots / backend_s) / raw_tps if backend_s and raw_tps else 0.0
    short_rows = sum(c.replay_short_rows for c in calls)
    full_rows = sum(1 for c in calls for n in c.completion_tokens if n >= c.max_new_tokens)
    all_rows = sum(c.n_conversations for c in calls)

    per_scene_batched = cold.wall_seconds / cold.scenes
    per_scene_seq = seq.wall_seconds / seq.scenes
    seq_scope = "the same" if seq.scenes == cold.scenes else "the first"
    speedup = per_scene_seq / per_scene_batched if per_scene_batched else 0.0
    seq_tps = seq.generated_tokens / seq.backend_seconds if seq.backend_seconds else 0.0

    warm_ratio = warm.wall_seconds / cold.wall_seconds if cold.wall_seconds else 0.0
    identical = [transcript_signature(a) for a in cold.transcripts] == [transcript_signature(b) for b in warm.transcripts]

    def ok(flag: bool) -> str:
        return "yes" if flag else "**no**"

    rows = [
        ("(a) simulation tokens/s ÷ raw tokens/s", fmt_ratio(ratio_a), ">= 0.8", ok(ratio_a >= 0.8)),
        ("(a) simulation: generated tokens / time in backend",
         f"{gen_tokens} tok / {backend_s:.1f} s = {sim_tps:.1f} tok/s ({all_rows} conversations, {len(calls)} decoding settings)",
         "", ""),
        ("(a) raw limit: same shapes, every row to max_new_tokens",
         f"{replay_tokens} tok / {replay_s:.1f} s = {raw_tps:.1f} tok/s (rows short of full length: {short_rows})",
         "", ""),
        ("(a) = useful fraction of decoded rows (EOS padding)",
         f"{useful:.2f} ({gen_tokens} of {slots} row-steps; {full_rows}/{all_rows} rows hit max_new_tokens)", "", ""),
        ("(a) × per-step speed vs raw (rows×steps/s ÷ raw tok/s)", fmt_ratio(step_speed), "", ""),
        *split_rows(cold, calls, args.batch_size, gen_tokens, replay_tokens, replay_s, raw_tps),
        ("(a) prompt tokens not prefilled (prefix cache; raw has none)",
         f"{cold.prefix_reused_tokens} of {cold.prompt_tokens} "
         f"({100 * cold.prefix_reused_tokens / max(1, cold.prompt_tokens):.0f} %); sequential run: "
         f"{seq.prefix_reused_tokens} of {seq.prompt_tokens}", "", ""),
        ("(b) speed-up over sequential (batch 1), wall time per scene",
         f"{speedup:.2f}x", ">= 3x at batch 8", ok(speedup >= 3.0) + ("" if args.batch_size == 8 else " (batch != 8)")),
        ("(b) batched: wall time per scene",
         f"{per_scene_batched:.1f} s ({cold.wall_seconds:.1f} s / {cold.scenes} scenes, "
         f"{cold.conversations} conversations in one live session)", "", ""),
        ("(b) sequential: wall time per scene",
         f"{per_scene_seq:.1f} s ({seq.wall_seconds:.1f} s / {seq_scope} {seq.scenes} scenes, "
         f"{seq.conversations} conversations, one at a time)", "", ""),
        ("(b) tokens/s batched ÷ tokens/s sequential",
         f"{sim_tps / seq_tps:.2f}x ({sim_tps:.1f} vs {seq_tps:.1f} tok/s)" if seq_tps else "n/a", "", ""),
        ("(c) warm / cold wall time (same store)",
         f"{100 * warm_ratio:.2f} % ({warm.wall_seconds:.2f} s vs {cold.wall_seconds:.1f} s)", "< 5 %",
         ok(warm_ratio < 0.05)),
        ("(c) backend calls in the warm run", f"{len(warm.calls)} (cache hits {warm.cache_hits}/{warm.cache_requested})",
         "0", ok(len(warm.calls) == 0)),
        ("(c) warm transcripts identical to cold", "yes" if identical else "no", "", ""),
    ]
    rows += [(f"(d) peak RSS after {phase}", f"{mib:.0f} MiB", "", "") for phase, mib in rss]
    extra = meta["param_mib"] - meta["weights_mib"]
    rows.append(("(d) model parameters + buffers", f"{meta['param_mib']:.0f} MiB ({meta['n_params'] / 1e6:.1f} M "
                 f"params = {meta['weights_mib']:.0f} MiB in {meta['dtype']}"
                 + (f"; +{extra:.0f} MiB of buffers, e.g. the packed copy of an output layer tied to the embeddings"
                    if extra >= 1 else "") + ")", "", ""))

    table = ["| measurement | value | target | met |", "|---|---|---|---|"]
    table += [f"| {m} | {v} | {t} | {k} |" for m, v, t, k in rows]

    header = [
        "# Simulation benchmark",
        "",
        f"{meta['date']} · model `{MODEL}` ({meta['n_params'] / 1e6:.1f} M params, {meta['dtype']}) · "
        f"torch {meta['torch']} / transformers {meta['transformers']} · {meta['cpus']} CPUs, "
        f"{meta['threads']} torch thread(s) · Python {platform.python_version()}",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Settings: {args.scenes} AdvBench scenes, batch size {args.batch_size}, decoding {args.decoding} (prefix "
        f"cache {args.prefix_cache_tokens} tokens), {meta['prepacked']} linear layers oneDNN-prepacked, "
        f"{settings.n_roles} roles, "
        f"{settings.plan_steps} plan steps, {settings.max_rounds} rounds, action tokens {settings.action_tokens}, "
        f"plan tokens {settings.plan_tokens}, repetition penalty {settings.repetition_penalty}; sequential run on "
        f"{seq_scope} {seq.scenes} scenes. Initial answers ({args.answer_tokens} tokens) generated once "
        f"beforehand in {meta['answers_s']:.0f} s, not measured. Phases: batched {cold.wall_seconds:.0f} s, raw "
        f"replay {replay_s:.0f} s, warm {warm.wall_seconds:.1f} s, sequential {seq.wall_seconds:.0f} s; total "
        f"runtime {meta['total_s']:.0f} s (model load included).",
        "",
    ]
    notes = [
        "",
        "How to read it:",
        "",
        "- (a) compares the tokens the simulation really gets per second of session time with what padded "
        "`model.generate` delivers on the same prompt lengths and batch size when every row decodes to "
        "max_new_tokens. It splits into the useful fraction of decoded rows (padded decoding keeps stepping rows "
        "that already produced EOS; refill decoding drops them) times the per-step speed relative to raw. The raw "
        "side spreads each prompt's prefill over max_new_tokens, the simulation over the tokens it needs; the "
        "simulation's batch runs short at the end of the session, when the last scenes finish one by one; the "
        "prefix cache saves prefill the raw side pays.",
        "- (b) is wall time per scene, batch 1 vs batched (with --seq-scenes the sequential run covers only the "
        "first scenes); its trajectories can differ slightly (padding changes float rounding), so the numbers of "
        "conversations per scene are shown. On a CPU batching helps less than on a GPU; it helps most when a "
        "decode step costs little more at batch 8 than at batch 1, which the oneDNN-prepacked linears make so "
        "(--no-prepack shows torch's default kernel).",
        "- (c) re-runs the cold batched simulation on the same store: every generation is a cache hit.",
        "- (d) is the process's max RSS so far (monotonic), so each row includes the earlier phases.",
    ]
    return "\n".join(header + table + notes) + "\n"


# -- main --------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench_simulation.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--scenes", type=int, default=8, help="AdvBench prompts simulated in the batched runs (default 8)")
    parser.add_argument("--seq-scenes", type=int, default=None,
                        help="scenes of the sequential run (b) (default: all --scenes; fewer saves time, the "
                             "sequential run is the slowest phase per scene, and (b) is compared per scene)")
    parser.add_argument("--batch-size", type=int, default=8, help="TransformersBackend and cache chunk batch size (default 8)")
    parser.add_argument("--roles", type=int, default=3, help="roles per scene, SceneSettings.n_roles (default 3)")
    parser.add_argument("--steps", type=int, default=3, help="plan steps per scene (default 3, as the quick run)")
    parser.add_argument("--rounds", type=int, default=2, help="modulated rounds per scene, max_rounds (default 2)")
    parser.add_argument("--plan-tokens", type=int, default=SceneSettings.plan_tokens,
                        help=f"max tokens of a plan or roles call, SceneSettings.plan_tokens (default {SceneSettings.plan_tokens})")
    parser.add_argument("--action-tokens", type=int, default=SceneSettings.action_tokens,
                        help=f"max tokens of an action, SceneSettings.action_tokens (default {SceneSettings.action_tokens})")
    parser.add_argument("--answer-tokens", type=int, default=128,
                        help="max tokens of the unmeasured initial answers (default 128, the quick profile's)")
    parser.add_argument("--decoding", choices=("refill", "padded", "continuous"), default="refill",
                        help="TransformersBackend decoding: refill (default: finished rows leave the batch, queued "
                        "conversations take their slots), padded (one model.generate per length-sorted chunk) or "
                        "transformers' continuous batching (calls with a repetition penalty stay padded)")
    parser.add_argument("--prefix-cache-tokens", type=int, default=4096,
                        help="refill decoding's prefix KV cache size in tokens (default 4096; 0 = off)")
    parser.add_argument("--no-prepack", action="store_true",
                        help="keep torch's default nn.Linear kernel instead of oneDNN-prepacked weights "
                        "(TransformersBackend(prepack_weights=False)), to compare")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (default 0: torch's default, one per core, as the pipeline "
                        "runs; 1 is steadier on a machine other processes load)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "simulation.md",
                        help="Markdown file the table is written to (default benchmarks/results/simulation.md)")
    args = parser.parse_args(argv)
    if min(args.scenes, args.batch_size, args.roles, args.rounds, args.steps, args.plan_tokens, args.action_tokens) < 1:
        parser.error("--scenes, --batch-size, --roles, --steps, --rounds, --plan-tokens and --action-tokens must be >= 1")
    if args.threads < 0:
        parser.error("--threads must be >= 0 (0: torch's default)")
    if args.seq_scenes is None:
        args.seq_scenes = args.scenes
    args.seq_scenes = max(1, min(args.seq_scenes, args.scenes))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    with contextlib.suppress(Exception):
        transformers.utils.logging.disable_progress_bar()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    from matrix_assets.llm.transformers_backend import TransformersBackend

    settings = SceneSettings(
        n_roles=args.roles, min_roles=min(3, args.roles), plan_steps=max(args.steps, args.rounds),
        max_rounds=args.rounds, max_reactions=max(1, args.roles), plan_tokens=args.plan_tokens,
        action_tokens=args.action_tokens,
    )
    rss: list[tuple[str, float]] = [("start (imports)", max_rss_mib())]

    log(f"loading {MODEL} (batch size {args.batch_size}, {torch.get_num_threads()} torch thread(s))")
    backend = TransformersBackend(MODEL, batch_size=args.batch_size, decoding=args.decoding,
                                  prefix_cache_tokens=args.prefix_cache_tokens, prepack_weights=not args.no_prepack)
    params = list(backend.model.parameters()) + list(backend.model.buffers())
    # Prepacked linears hold their weights as buffers, so the architecture is counted on an empty (meta) copy.
    with torch.device("meta"):
        architecture = transformers.AutoModelForCausalLM.from_config(backend.model.config)
    meta = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "n_params": sum(p.numel() for p in architecture.parameters()),
        "weights_mib": sum(p.numel() * p.element_size() for p in architecture.parameters()) / 2**20,
        "prepacked": backend.prepacked_layers,
        "param_mib": sum(p.numel() * p.element_size() for p in params) / 2**20,
        "dtype": str(next(backend.model.parameters()).dtype).replace("torch.", ""),
        "command": " ".join([".venv/bin/python", "benchmarks/bench_simulation.py", *(argv or sys.argv[1:])]),
    }
    rss.append(("model load", max_rss_mib()))

    questions = harmful_prompts(args.scenes)
    log(f"generating the initial answers of {len(questions)} prompts once (not measured)")
    t0 = time.perf_counter()
    answers = answer_directly(backend, questions, args.answer_tokens)
    meta["answers_s"] = time.perf_counter() - t0
    inputs = [SceneInput(f"advbench-{i}", q, a) for i, (q, a) in enumerate(zip(questions, answers))]
    rss.append(("initial answers", max_rss_mib()))

    # Real token ids for the synthetic replay prompts: the chat-templated prompts and answers.
    pool: list[int] = []
    for q, a in zip(questions, answers):
        pool += backend.encode([{"role": "user", "content": q}, {"role": "assistant", "content": a}])

    with tempfile.TemporaryDirectory(prefix="bench-simulation-") as root:
        log(f"(a)+(c) cold batched simulation of {len(inputs)} scenes, each call replayed raw right after it")
        cold_store = fresh_store(root, "batched")
        replay = RawReplay(backend, pool, args.batch_size)
        cold = simulate("batched", backend, inputs, settings, cold_store, batch_size=args.batch_size, replay=replay)
        log(f"    {cold.wall_seconds:.1f} s simulation, {sum(c.replay_seconds for c in cold.calls):.1f} s raw replay")
        rss.append(("batched simulation + raw replay", max_rss_mib()))

        log("(c) warm re-run on the same store")
        warm = simulate("warm", backend, inputs, settings, cold_store, batch_size=args.batch_size)
        log(f"    {warm.wall_seconds:.2f} s, {len(warm.calls)} backend calls")
        rss.append(("warm re-run", max_rss_mib()))
        cold_store.engine.dispose()

        log(f"(b) sequential simulation (one conversation at a time) of {args.seq_scenes} of the scenes")
        seq_store = fresh_store(root, "sequential")
        seq = simulate("sequential", backend, inputs[: args.seq_scenes], settings, seq_store,
                       batch_size=args.batch_size, one_at_a_time=True)
        log(f"    {seq.wall_seconds:.1f} s")
        rss.append(("sequential simulation", max_rss_mib()))
        seq_store.engine.dispose()

    meta["total_s"] = time.perf_counter() - started
    report = build_report(args, settings, meta, cold, seq, warm, rss)
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report, encoding="utf-8")
    log(f"wrote {args.out} (total {meta['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
