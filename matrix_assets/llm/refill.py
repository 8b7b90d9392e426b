"""Batched decoding that keeps the batch full: finished rows leave at once, queued prompts take their slots.

`model.generate` on a padded batch decodes until the longest row ends; every row that already produced
EOS still costs a step. In the simulation about a quarter of the decoded row-steps were such padding
(measured by `benchmarks/bench_simulation.py`). This loop drives the model's forward pass itself:

- a row that ends (EOS or `max_new_tokens`) is dropped from the batch and its KV cache right away;
- a free slot is refilled with the next queued prompt (prefilled on its own, then its KV cache is
  left-padded to the batch's width and joined), so a call with more prompts than `batch_size` never
  waits for a whole chunk to finish;
- left columns that no remaining row uses are cut from the cache, so attention does not keep paying for
  a long prompt that has already left.

Each row carries its own attention mask and position ids, so a row's result does not depend on what
it was batched with beyond float rounding. Decoding supports what `GenerationParams` promises: greedy
or temperature / top-p sampling, and the repetition penalty (same rule as transformers'
`RepetitionPenaltyLogitsProcessor`: divide positive logits, multiply negative ones, for every token id
already in the prompt or the answer). transformers' own continuous batching (`generate_batch`) does the
same scheduling with a paged cache, but it drops the repetition penalty and on a CPU it measured slower
per step and took ~10 GB for its cache, so this small loop over the standard `DynamicCache` is the default.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from matrix_assets.llm.base import GenerationParams


@dataclass
class TokenJob:
    """A tokenized request: `id` is the caller's handle, `prompt` the chat-templated token ids. A job that
    `wants_logits` generates nothing: its prompt runs like any other (in a joined pass when rows are running) and
    its next-token logits are handed to the session's `on_logits`, a verdict read off the model's distribution."""

    id: int
    prompt: list[int]
    params: GenerationParams
    wants_logits: bool = False


@dataclass
class _Row:
    job: TokenJob
    tokens: list[int] = field(default_factory=list)  # generated so far, EOS excluded


@dataclass
class DecodeStats:
    """Where a backend's refill-decoding time went, summed over its sessions (a benchmark reads it to split a
    session's time; the counts cost two clock reads per forward pass)."""

    decode_steps: int = 0
    decode_row_steps: int = 0  # rows x steps: each decoded row-step is one token (or the EOS that ended a row)
    decode_seconds: float = 0.0
    prefill_passes: int = 0
    prefill_tokens: int = 0  # prompt tokens run, the prefix cache's reused ones excluded
    prefill_seconds: float = 0.0
    # Passes that decode the running rows and prefill joining prompts together (`joined_pass`): their prompt
    # tokens count here, not in prefill_tokens, and their rows' tokens here, not in decode_row_steps.
    joined_passes: int = 0
    joined_row_steps: int = 0
    joined_prompt_tokens: int = 0
    joined_seconds: float = 0.0

    @property
    def mean_rows(self) -> float:
        return self.decode_row_steps / self.decode_steps if self.decode_steps else 0.0


def supports_refill(model: torch.nn.Module) -> bool:
    """Plain full-attention decoder caches only: sliding-window or recurrent layers keep extra state, and
    prompt-learning adapters (prompt or prefix tuning) add virtual tokens that the refill loop does not place."""
    if any(getattr(c, "is_prompt_learning", False) for c in getattr(model, "peft_config", {}).values()):
        return False
    config = getattr(model, "config", None)
    if config is None or getattr(config, "sliding_window", None):
        return False
    layer_types = getattr(config, "layer_types", None) or []
    return all(kind == "full_attention" for kind in layer_types)


def left_padded(prompts: Sequence[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of prompts padded on the left (decoder-only models continue on the right)."""
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        mask[row, width - len(ids) :] = 1
    return input_ids, mask


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _stacked(tensors: Sequence[torch.Tensor], width: int, dim: int) -> torch.Tensor:
    """Rows of several caches (or masks) as one: each left-padded along `dim` to `width`, then concatenated."""
    return torch.cat([_left_pad(tensor, width, dim) for tensor in tensors])


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` that writes each step's keys and values into spare room instead of concatenating.

    transformers' `DynamicLayer` copies a layer's whole KV on every decoded token (`torch.cat`); at batch 8 and a
    few hundred positions that copy was ~15 % of a decode step on the project's CPU. This layer keeps its KV in a
    buffer with headroom and hands out views of the filled part, so a step writes one position. When refill
    decoding changes the rows (one joins or leaves), `restack` writes the new rows straight into a fresh buffer;
    `keys`/`values` replaced from outside are moved into one on the next update. Attention sees the same values,
    so the logits are the same (tested)."""

    min_headroom = 32
    _room: tuple[torch.Tensor, torch.Tensor] | None = None  # the buffer; keys/values are views of its start
    _handed_out: tuple[torch.Tensor, torch.Tensor] | None = None  # the views last returned (replaced = stale)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.keys.shape[-2] if self.keys.dim() == 4 else 0
        if length and (self.keys.shape[:2] != key_states.shape[:2] or self.values.shape[:2] != value_states.shape[:2]):
            raise ValueError(f"KV update of shape {tuple(key_states.shape)} does not fit a cache of "
                             f"{tuple(self.keys.shape)}")
        new = key_states.shape[-2]
        room, handed_out = self._room, self._handed_out
        stale = handed_out is not None and (self.keys is not handed_out[0] or self.values is not handed_out[1])
        if room is None or stale or length + new > room[0].shape[-2]:
            self._room = self._handed_out = room = None  # the old buffer goes before the new one is allocated
            capacity = length + new + self._headroom(length)
            keys = key_states.new_empty((*key_states.shape[:2], capacity, key_states.shape[-1]))
            values = value_states.new_empty((*value_states.shape[:2], capacity, value_states.shape[-1]))
            if length:
                keys[:, :, :length] = self.keys
                values[:, :, :length] = self.values
            self._room = room = (keys, values)
        keys, values = room
        keys[:, :, length : length + new] = key_states
        values[:, :, length : length + new] = value_states
        self.keys, self.values = keys[:, :, : length + new], values[:, :, : length + new]
        self._handed_out = (self.keys, self.values)
        return self.keys, self.values

    def _headroom(self, length: int) -> int:
        # A quarter of the length as spare room: refill decoding rebuilds the buffer whenever a row joins or leaves
        # anyway, and larger room was mostly never written (it is RSS all the same).
        return max(self.min_headroom, length // 4)

    def restack(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], width: int) -> None:
        """Make the rows of several KV parts (rows, heads, length <= width, dim) this layer's KV: each part
        left-padded with zeros to `width`, stacked by rows, written straight into a new buffer with spare room.
        One copy per batch change (stacking, then moving into room on the next step, was two); the old buffer
        goes as soon as the new one is filled."""
        rows = sum(part.shape[0] for part in keys)
        capacity = width + self._headroom(width)
        room = tuple(parts[0].new_empty((rows, parts[0].shape[1], capacity, parts[0].shape[3]))
                     for parts in (keys, values))
        for buffer, parts in zip(room, (keys, values)):
            row = 0
            for part in parts:
                end, start = row + part.shape[0], width - part.shape[2]
                buffer[row:end, :, :start].zero_()  # masked columns: finite, so attention's zero weights stay zero
                buffer[row:end, :, start:width].copy_(part)
                row = end
        self._room = (room[0], room[1])
        self.keys, self.values = room[0][:, :, :width], room[1][:, :, :width]
        self._handed_out = (self.keys, self.values)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0:
            rows = indices.tolist()
            self.restack(_row_runs(self.keys, rows, 0), _row_runs(self.values, rows, 0), self.keys.shape[2])

    def reset(self) -> None:
        self._room = self._handed_out = None
        super().reset()


def growing_cache() -> DynamicCache:
    """An empty `DynamicCache` whose layers are `GrowingLayer`s."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = GrowingLayer
    return cache


def _restack(layer: DynamicLayer, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], width: int) -> None:
    """A layer's KV rebuilt from row parts, each left-padded to `width` (see `GrowingLayer.restack`)."""
    if isinstance(layer, GrowingLayer):
        layer.restack(keys, values, width)
    else:
        layer.keys, layer.values = _stacked(keys, width, 2), _stacked(values, width, 2)


def _row_runs(tensor: torch.Tensor, rows: list[int], start: int) -> list[torch.Tensor]:
    """Views of `tensor`'s `rows` (in the order given) from column `start` on, one view per run of consecutive
    rows."""
    runs: list[torch.Tensor] = []
    first = previous = rows[0]
    for row in [*rows[1:], None]:
        if row is not None and row == previous + 1:
            previous = row
            continue
        runs.append(tensor[first : previous + 1, :, start:])
        if row is not None:
            first = previous = row
    return runs


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    layers = list(cache.layers)
    if not all(type(layer) in (DynamicLayer, GrowingLayer) for layer in layers):
        raise NotImplementedError("refill decoding needs a plain DynamicCache (no sliding-window layers)")
    return layers


class _Batch:
    """The rows being decoded: their KV cache, attention mask and per-row decoding settings, kept aligned."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.rows: list[_Row] = []
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros((0, 0), dtype=torch.long)
        self.seen = torch.zeros((0, vocab_size), dtype=torch.bool)  # ids the repetition penalty applies to
        self.penalty = torch.zeros((0,))
        self.temperature = torch.zeros((0,))
        self.top_p = torch.zeros((0,))
        self.pending = torch.zeros((0,), dtype=torch.long)  # last sampled token per row, not yet in the cache

    def __len__(self) -> int:
        return len(self.rows)

    def join(self, jobs: list[TokenJob], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Append freshly prefilled rows; the narrower side is left-padded to the wider one's width."""
        seen = torch.zeros((len(jobs), self.vocab_size), dtype=torch.bool)
        for r, job in enumerate(jobs):
            seen[r, torch.tensor(job.prompt, dtype=torch.long)] = True
        per_row = {
            "penalty": torch.tensor([j.params.repetition_penalty for j in jobs], dtype=torch.float),
            "temperature": torch.tensor([j.params.temperature for j in jobs], dtype=torch.float),
            "top_p": torch.tensor([j.params.top_p for j in jobs], dtype=torch.float),
        }
        if self.cache is None or not self.rows:
            self.cache, self.mask, self.seen = cache, mask, seen
            for name, value in per_row.items():
                setattr(self, name, value)
        else:
            width = max(self.mask.shape[1], mask.shape[1])
            for layer, other in zip(_layers(self.cache), _layers(cache), strict=True):
                _restack(layer, [layer.keys, other.keys], [layer.values, other.values], width)
            self.mask = _stacked([self.mask, mask], width, 1)
            self.seen = torch.cat([self.seen, seen])
            for name, value in per_row.items():
                setattr(self, name, torch.cat([getattr(self, name), value]))
        self.rows += [_Row(job) for job in jobs]

    def keep(self, keep: list[int]) -> None:
        """Drop every row not in `keep`, and the cache columns only the dropped rows used."""
        index = torch.tensor(keep, dtype=torch.long)
        self.rows = [self.rows[r] for r in keep]
        if not self.rows:
            self.cache = None
            self.mask = self.mask[:0]
        else:
            assert self.cache is not None
            self.mask = _keep_rows(self.cache, self.mask, keep)
        for name in ("seen", "penalty", "temperature", "top_p", "pending"):
            setattr(self, name, getattr(self, name)[index])


def _keep_rows(cache: DynamicCache, mask: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """Keep the cache's rows `keep` (non-empty), from the first column one of them uses, in one copy per layer;
    returns their mask."""
    mask = mask[torch.tensor(keep, dtype=torch.long)]
    used = mask.any(dim=0).nonzero()
    start = int(used[0]) if len(used) else 0
    for layer in _layers(cache):
        _restack(layer, _row_runs(layer.keys, keep, start), _row_runs(layer.values, keep, start),
                 mask.shape[1] - start)
    return mask[:, start:]


def _sample(logits: torch.Tensor, batch: _Batch, rows: slice, generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row: repetition penalty (transformers' rule), then greedy or temperature + top-p."""
    scores = logits.float()
    penalty = batch.penalty[rows].unsqueeze(1)
    if (penalty != 1.0).any():  # greedy rows without a penalty (the evaluation's) skip three vocab-wide copies
        penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
        scores = torch.where(batch.seen[rows] & (penalty != 1.0), penalized, scores)
    chosen = scores.argmax(dim=-1)
    temperature = batch.temperature[rows]
    sampled = temperature > 0
    if sampled.any():
        probs = torch.softmax(scores / temperature.clamp(min=1e-5).unsqueeze(1), dim=-1)
        ordered, order = probs.sort(dim=-1, descending=True)
        # Nucleus: keep the most likely tokens until their mass reaches top_p (the first one always stays).
        ordered[(ordered.cumsum(dim=-1) - ordered) > batch.top_p[rows].unsqueeze(1)] = 0.0
        picked = order.gather(1, torch.multinomial(ordered, 1, generator=generator)).squeeze(1)
        chosen = torch.where(sampled, picked, chosen)
    return chosen


class PrefixCache:
    """The KV cache of recently prefilled prompts, found again by block-aligned token prefixes (the idea of
    vLLM's automatic prefix caching). The scene prompts share a lot: the chat template's system turn and each
    template's instructions come before the scene's own text; about half the prompt tokens of a simulation
    are a prefix of an earlier prompt. Entries are evicted least recently used beyond `max_tokens`."""

    def __init__(self, max_tokens: int = 4096, block: int = 4) -> None:
        self.max_tokens = max_tokens
        self.block = block
        self.entries: OrderedDict[int, tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]]] = OrderedDict()
        self.index: dict[int, tuple[int, int]] = {}  # hash of a block-aligned prefix -> (entry, its length)
        self.tokens = 0
        self.hits = 0
        self.reused_tokens = 0
        self._ids = itertools.count()

    def _prefix_hashes(self, prompt: list[int], limit: int) -> list[tuple[int, int]]:
        hashes, running = [], 0
        for end in range(self.block, limit + 1, self.block):
            running = hash((running, tuple(prompt[end - self.block : end])))
            hashes.append((running, end))
        return hashes

    def lookup(self, prompt: list[int]) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]]] | None:
        """The longest cached prefix of `prompt` that leaves at least one token to prefill, as (length, KV)."""
        for key, length in reversed(self._prefix_hashes(prompt, len(prompt) - 1)):
            found = self.index.get(key)
            if found is None or found[0] not in self.entries:
                continue
            tokens, layers = self.entries[found[0]]
            if tokens[:length] != prompt[:length]:  # a hash collision: never reuse the wrong keys
                continue
            self.entries.move_to_end(found[0])
            self.hits += 1
            self.reused_tokens += length
            return length, [(k[:, :, :length], v[:, :, :length]) for k, v in layers]
        return None

    def cached_length(self, prompt: list[int]) -> int:
        """How long a prefix of `prompt` `lookup` would find, without using it (no hit counted, no LRU move)."""
        for key, length in reversed(self._prefix_hashes(prompt, len(prompt) - 1)):
            found = self.index.get(key)
            if found is not None and found[0] in self.entries and self.entries[found[0]][0][:length] == prompt[:length]:
                return length
        return 0

    def store(self, prompt: list[int], layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep the KV of `prompt`'s block-aligned part (`layers`: one row, the prompt's positions only)."""
        length = (len(prompt) // self.block) * self.block
        if length == 0 or length > self.max_tokens:
            return
        entry = next(self._ids)
        self.entries[entry] = (prompt[:length], [(k[:, :, :length].clone(), v[:, :, :length].clone())
                                                 for k, v in layers])
        for key, end in self._prefix_hashes(prompt, length):
            self.index[key] = (entry, end)
        self.tokens += length
        while self.tokens > self.max_tokens:
            _, (tokens, _) = self.entries.popitem(last=False)
            self.tokens -= len(tokens)
        if len(self.index) > 8 * max(1, self.max_tokens // self.block):  # drop keys of evicted entries
            self.index = {k: v for k, v in self.index.items() if v[0] in self.entries}


# A prompt whose head, shared with another prompt of the same pass, is at least this many tokens longer than what the
# prefix cache holds for it waits for the next pass, where that head is cached: computing it twice in one pass costs
# more than the one decode step it waits (two requests of a scene step often start with the same memory and people).
SHARED_HEAD_TOKENS = 64


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def defer_shared_heads(jobs: list[TokenJob], prefix_cache: PrefixCache | None
                       ) -> tuple[list[TokenJob], list[TokenJob]]:
    """The jobs to run in this pass, and those that wait for the next one (see `SHARED_HEAD_TOKENS`), in order. The
    first job always runs, so a session never stalls."""
    if prefix_cache is None or len(jobs) < 2:
        return jobs, []
    now: list[TokenJob] = []
    later: list[TokenJob] = []
    for job in jobs:
        shared = max((_common_prefix(job.prompt, other.prompt) for other in now), default=0)
        if now and shared - prefix_cache.cached_length(job.prompt) >= SHARED_HEAD_TOKENS:
            later.append(job)
        else:
            now.append(job)
    return now, later


# What one more forward pass costs, in prompt tokens of prefill: on the project's CPU a pass over a single token
# takes about as long as prefilling ~40 tokens (stack overhead, small-matrix kernels); used to decide when
# padding prompts to a common width is cheaper than running them apart.
PASS_OVERHEAD_TOKENS = 32


def prefill_groups(rest_lengths: Sequence[int], overhead: int = PASS_OVERHEAD_TOKENS) -> list[list[int]]:
    """Partition prompts into forward passes at least cost: a pass costs `overhead` plus rows x its longest
    rest (every row is padded to it). Optimal over groups of consecutive lengths once sorted (a short prompt
    never pads to a long one it could have skipped): dynamic programming, O(n^2) for a batch's n prompts."""
    order = sorted(range(len(rest_lengths)), key=lambda i: rest_lengths[i])
    best = [0.0] + [float("inf")] * len(order)
    cut = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        for start in range(end):
            cost = best[start] + overhead + (end - start) * rest_lengths[order[end - 1]]
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups, end = [], len(order)
    while end:
        groups.append(order[cut[end] : end])
        end = cut[end]
    return groups[::-1]


class Prefilled(NamedTuple):
    cache: DynamicCache
    mask: torch.Tensor
    logits: torch.Tensor  # the next-token logits after each prompt


def prefill(
    model: torch.nn.Module, jobs: list[TokenJob], pad_token_id: int, prefix_cache: PrefixCache | None,
    stats: DecodeStats | None = None,
) -> Prefilled:
    """Run the prompts of newly admitted jobs; returns their cache, mask and last logits, rows in job order.

    A job whose prompt starts with a cached prefix only runs the rest. Jobs share forward passes as
    `prefill_groups` finds cheapest; in a pass every row is its cached KV (left-padded to the group's longest
    cached head), then a gap, then its remaining tokens, right-aligned: the mask hides the padding and the gap
    and the position ids count only real tokens, so each row sees what it would alone. The rows come back in
    job order whatever the passes were, so sampled rows draw the same random numbers whether or not their
    prompts were cached. Every prompt's KV then goes into the prefix cache."""
    found = [prefix_cache.lookup(job.prompt) if prefix_cache is not None else None for job in jobs]
    cached = [hit[0] if hit else 0 for hit in found]
    order: list[int] = []
    passes: list[tuple[list[DynamicLayer], torch.Tensor, torch.Tensor]] = []
    for members in prefill_groups([len(job.prompt) - n for job, n in zip(jobs, cached)]):
        head = max(cached[i] for i in members)
        ids, rest_mask = left_padded([jobs[i].prompt[cached[i]:] for i in members], pad_token_id)
        head_mask = torch.zeros((len(members), head), dtype=torch.long)
        for row, i in enumerate(members):
            head_mask[row, head - cached[i] :] = 1
        mask = torch.cat([head_mask, rest_mask], dim=1)
        positions = (rest_mask.cumsum(-1) - 1).clamp(min=0) + torch.tensor([cached[i] for i in members]).unsqueeze(1)
        cache = growing_cache()
        hits = [hit for i in members if (hit := found[i])]
        for index, (reference, _) in enumerate(hits[0][1] if hits else ()):
            empty = reference.new_zeros((1, reference.shape[1], 0, reference.shape[3]))
            layer = [hit[1][index] if (hit := found[i]) else (empty, empty) for i in members]
            cache.update(_stacked([k for k, _ in layer], head, 2), _stacked([v for _, v in layer], head, 2), index)
        began = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
        if stats is not None:
            stats.prefill_passes += 1
            stats.prefill_tokens += int(rest_mask.sum())
            stats.prefill_seconds += time.perf_counter() - began
        order += members
        passes.append((_layers(cache), mask, out.logits[:, -1, :]))
    cache, mask, logits = _in_job_order(passes, order)
    if prefix_cache is not None:
        for row, job in enumerate(jobs):
            real = mask[row].nonzero().squeeze(1)  # the prompt's own positions, in order
            prefix_cache.store(job.prompt, [(layer.keys[row : row + 1].index_select(2, real),
                                             layer.values[row : row + 1].index_select(2, real))
                                            for layer in _layers(cache)])
    return Prefilled(cache, mask, logits)


def _in_job_order(passes: list[tuple[list[DynamicLayer], torch.Tensor, torch.Tensor]], order: list[int]
                  ) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
    """The passes' rows stacked (left-padded to the widest) and put back in job order (`order[k]`: the job of
    stacked row k)."""
    rows = torch.tensor(sorted(range(len(order)), key=order.__getitem__), dtype=torch.long)
    width = max(mask.shape[1] for _, mask, _ in passes)
    cache = growing_cache()
    for index in range(len(passes[0][0])):
        cache.update(_stacked([layers[index].keys for layers, _, _ in passes], width, 2)[rows],
                     _stacked([layers[index].values for layers, _, _ in passes], width, 2)[rows], index)
    mask = _stacked([mask for _, mask, _ in passes], width, 1)[rows]
    return cache, mask, torch.cat([logits for _, _, logits in passes])[rows]


# Joined passes: when prompts join a running batch, their prefill and the running rows' next decode step share one
# forward pass. On a CPU a pass costs ~40 ms before its first token (streaming the weights), as much as a decode step
# of 8 rows; a separate prefill pass for every joining prompt paid it again each time (~100 times in the simulation
# benchmark's session). The pass packs every token into one sequence: the linear layers run on the real tokens only
# (no padding), and attention (`joined_attention`) runs per part: the running rows against their KV cache, each
# joining prompt causally against its cached prefix and itself.
JOINED_ATTENTION = "refill_joined"


@dataclass
class _Segment:
    start: int  # position of the prompt's first new token in the packed sequence
    length: int  # its new tokens
    head: list[tuple[torch.Tensor, torch.Tensor]] | None  # the prefix cache's KV of its cached head, per layer
    head_length: int


@dataclass
class JoinedPass:
    """What `joined_attention` needs to know about a packed pass; it writes each joining prompt's KV to `new_kv`."""

    running: list[DynamicLayer]  # the running rows' cache layers (their new token's KV is appended)
    running_mask: torch.Tensor  # (rows, 1, 1, columns) bool, the new column included
    n_running: int
    segments: list[_Segment]
    new_kv: list[list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=list)  # per segment, per layer


def joined_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, *, joined_pass: JoinedPass | None = None,
                     **kwargs: object) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, except in a joined pass (query, key, value: one packed sequence of the running
    rows' tokens, then each joining prompt's), where each part attends to its own keys only."""
    if joined_pass is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    plan, layer = joined_pass, module.layer_idx
    if layer == 0:
        plan.new_kv = [[] for _ in plan.segments]
    parts = []
    n = plan.n_running
    if n:
        def rows(t: torch.Tensor) -> torch.Tensor:  # (1, heads, n, dim) -> (n, heads, 1, dim)
            return t[0, :, :n].transpose(0, 1).unsqueeze(2)

        keys, values = plan.running[layer].update(rows(key), rows(value))
        out, _ = sdpa_attention_forward(module, rows(query), keys, values, plan.running_mask, **kwargs)
        parts.append(out.reshape(1, n, *out.shape[2:]))
    for index, segment in enumerate(plan.segments):
        part = slice(segment.start, segment.start + segment.length)
        q, k, v = query[:, :, part], key[:, :, part], value[:, :, part]
        mask = None  # causal
        if segment.head is not None:
            head_k, head_v = segment.head[layer]
            k, v = torch.cat([head_k, k], dim=2), torch.cat([head_v, v], dim=2)
            mask = torch.ones((segment.length, segment.head_length + segment.length), dtype=torch.bool,
                              device=query.device)
            mask = mask.tril(segment.head_length)[None, None]
        plan.new_kv[index].append((k, v))
        out, _ = sdpa_attention_forward(module, q, k, v, mask, **kwargs)
        parts.append(out)
    return torch.cat(parts, dim=1), None


def use_joined_passes(model: torch.nn.Module) -> bool:
    """Switch a model on SDPA attention to `joined_attention` (SDPA in every other pass); False where the model's
    attention does not dispatch through transformers' attention interface, or uses another implementation."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", JOINED_ATTENTION):
        return False
    AttentionInterface.register(JOINED_ATTENTION, joined_attention)
    AttentionMaskInterface.register(JOINED_ATTENTION, sdpa_mask)
    if config._attn_implementation != JOINED_ATTENTION and base._can_set_attn_implementation():
        base.set_attn_implementation(JOINED_ATTENTION)
    return config._attn_implementation == JOINED_ATTENTION


def joins_passes(model: torch.nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(getattr(base, "config", None), "_attn_implementation", None) == JOINED_ATTENTION


def joined_pass(
    model: torch.nn.Module, batch: _Batch, jobs: list[TokenJob], prefix_cache: PrefixCache | None,
    stats: DecodeStats | None = None,
) -> tuple[torch.Tensor, Prefilled]:
    """One forward pass that decodes the batch's next step and prefills `jobs`: returns the running rows' logits
    and the jobs' `Prefilled` (their cache, mask and last logits, in job order), as `prefill` would."""
    found = [prefix_cache.lookup(job.prompt) if prefix_cache is not None else None for job in jobs]
    n = len(batch)
    batch.mask = torch.cat([batch.mask, batch.mask.new_ones((n, 1))], dim=1)
    ids, positions, segments = [batch.pending], [batch.mask.sum(-1) - 1], []
    start = n
    for job, hit in zip(jobs, found):
        cached = hit[0] if hit else 0
        rest = job.prompt[cached:]
        segments.append(_Segment(start, len(rest), hit[1] if hit else None, cached))
        ids.append(torch.tensor(rest, dtype=torch.long))
        positions.append(torch.arange(cached, len(job.prompt)))
        start += len(rest)
    plan = JoinedPass(_layers(batch.cache), batch.mask.bool()[:, None, None, :], n, segments)
    keep = torch.tensor([*range(n), *(s.start + s.length - 1 for s in segments)])
    began = time.perf_counter()
    out = model(input_ids=torch.cat(ids)[None], position_ids=torch.cat(positions)[None],
                attention_mask=torch.ones((1, 1, 1, 1), dtype=torch.bool),  # a 4D mask is passed through unused
                use_cache=False, joined_pass=plan, logits_to_keep=keep)
    if stats is not None:
        stats.joined_passes += 1
        stats.joined_row_steps += n
        stats.joined_prompt_tokens += start - n
        stats.joined_seconds += time.perf_counter() - began
    logits = out.logits[0]
    width = max(len(job.prompt) for job in jobs)
    cache = growing_cache()
    for layer in range(len(plan.running)):
        cache.update(_stacked([kv[layer][0] for kv in plan.new_kv], width, 2),
                     _stacked([kv[layer][1] for kv in plan.new_kv], width, 2), layer)
    mask = left_padded([job.prompt for job in jobs], 0)[1]
    if prefix_cache is not None:
        for job, kv in zip(jobs, plan.new_kv):
            prefix_cache.store(job.prompt, kv)
    return logits[:n], Prefilled(cache, mask, logits[n:])


def decode_live(
    model: torch.nn.Module,
    take: Callable[[int], list[TokenJob]],
    on_done: Callable[[TokenJob, list[int]], None],
    *,
    batch_size: int,
    eos_token_ids: set[int],
    pad_token_id: int,
    prefix_cache: PrefixCache | None = None,
    stats: DecodeStats | None = None,
    on_logits: Callable[[TokenJob, torch.Tensor], None] | None = None,
) -> None:
    """Decode jobs as they come: whenever fewer than `batch_size` rows run, `take(free_slots)` is asked for
    more; `on_done(job, new_token_ids)` (EOS excluded) is called the moment a row ends and may queue further
    jobs. Returns when `take` has nothing and no row is left. Each job's own `GenerationParams` apply to its
    row (max_new_tokens, repetition penalty, temperature, top_p); the first sampled job's seed seeds the
    sampling generator of the session. With a `prefix_cache`, a prompt that starts like an earlier one only
    prefills what is new. `stats`, when given, adds up the time of the prefill passes and decode steps.
    A job that `wants_logits` gets `on_logits(job, next_token_logits)` once its prompt has run (it may queue
    further jobs too) and takes no row. A taken prompt that shares a long uncached head with another of the same
    pass waits one pass and reuses that head from the prefix cache (`defer_shared_heads`)."""
    batch = _Batch(model.get_output_embeddings().out_features)
    generator: torch.Generator | None = None
    joined = joins_passes(model)
    waiting: list[TokenJob] = []  # taken, held back one pass to reuse a head another prompt computes (see below)

    while True:
        jobs: list[TokenJob] = []
        if len(batch) < batch_size:
            room = batch_size - len(batch) - len(waiting)
            jobs, waiting = waiting + (take(room) if room > 0 else []), []
        if jobs:
            jobs.sort(key=lambda j: len(j.prompt))
            jobs, waiting = defer_shared_heads(jobs, prefix_cache)
            if generator is None and any(j.params.temperature > 0 for j in jobs):
                seed = next(j.params.seed for j in jobs if j.params.temperature > 0)
                generator = torch.Generator().manual_seed(seed)
            fresh = len(batch)
            if joined and batch.rows:  # the running rows take their next step in the joining prompts' pass
                running_logits, (cache, mask, logits) = joined_pass(model, batch, jobs, prefix_cache, stats)
                batch.pending = _sample(running_logits, batch, slice(0, fresh), generator)
                fresh = 0
            else:
                cache, mask, logits = prefill(model, jobs, pad_token_id, prefix_cache, stats)
            jobs, cache, mask, logits = _hand_out_logits(jobs, cache, mask, logits, on_logits)
            if jobs:
                batch.join(jobs, cache, mask)
                rows = slice(len(batch) - len(jobs), len(batch))
                batch.pending = torch.cat([batch.pending, _sample(logits, batch, rows, generator)])
            del cache  # its rows now live in the batch's cache
        elif batch.rows:
            fresh = 0
            rows = slice(0, len(batch))
            batch.mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch), 1))], dim=1)
            positions = batch.mask.sum(-1, keepdim=True) - 1
            began = time.perf_counter()
            out = model(input_ids=batch.pending.unsqueeze(1), attention_mask=batch.mask, position_ids=positions,
                        past_key_values=batch.cache, use_cache=True)
            if stats is not None:
                stats.decode_steps += 1
                stats.decode_row_steps += len(batch)
                stats.decode_seconds += time.perf_counter() - began
            batch.pending = _sample(out.logits[:, -1, :], batch, rows, generator)
        else:
            return

        # Record the rows' new tokens; a row that ended leaves the batch before the next step.
        batch.seen[torch.arange(fresh, len(batch)), batch.pending[fresh:]] = True
        done: list[_Row] = []
        for r in range(fresh, len(batch)):
            row, token = batch.rows[r], int(batch.pending[r])
            if token in eos_token_ids:
                done.append(row)
                continue
            row.tokens.append(token)
            if len(row.tokens) >= row.job.params.max_new_tokens:
                done.append(row)
        if done:
            finished = {id(row) for row in done}
            batch.keep([r for r, row in enumerate(batch.rows) if id(row) not in finished])
            for row in done:
                on_done(row.job, row.tokens)


def _hand_out_logits(
    jobs: list[TokenJob], cache: DynamicCache, mask: torch.Tensor, logits: torch.Tensor,
    on_logits: Callable[[TokenJob, torch.Tensor], None] | None,
) -> tuple[list[TokenJob], DynamicCache, torch.Tensor, torch.Tensor]:
    """Give the jobs that want logits theirs; the rest (and their rows of the prefilled cache) go on to decode."""
    keep = [i for i, job in enumerate(jobs) if not job.wants_logits]
    if len(keep) == len(jobs):
        return jobs, cache, mask, logits
    if on_logits is None:
        raise ValueError("a job wants its next-token logits but the session has no on_logits")
    for job, row in zip(jobs, logits):
        if job.wants_logits:
            on_logits(job, row)
    if not keep:
        return [], cache, mask[:0], logits[:0]
    # A longer verdict prompt left-padded the others: the kept rows lose those columns too.
    return [jobs[i] for i in keep], cache, _keep_rows(cache, mask, keep), logits[torch.tensor(keep, dtype=torch.long)]


def generate_with_refill(
    model: torch.nn.Module,
    prompts: Sequence[list[int]],
    params: GenerationParams,
    *,
    batch_size: int,
    eos_token_ids: set[int],
    pad_token_id: int,
    on_row_done: Callable[[int, list[int]], None] | None = None,
    prefix_cache: PrefixCache | None = None,
    stats: DecodeStats | None = None,
) -> list[list[int]]:
    """A fixed list of prompts through `decode_live`, shortest first; returns the new token ids per prompt.
    `on_row_done(index, tokens)` is called as each prompt finishes (so callers can persist it at once)."""
    queue = sorted((TokenJob(i, list(p), params) for i, p in enumerate(prompts)), key=lambda j: -len(j.prompt))
    results: list[list[int]] = [[] for _ in prompts]

    def take(limit: int) -> list[TokenJob]:
        return [queue.pop() for _ in range(min(limit, len(queue)))]

    def done(job: TokenJob, tokens: list[int]) -> None:
        results[job.id] = tokens
        if on_row_done is not None:
            on_row_done(job.id, tokens)

    decode_live(model, take, done, batch_size=batch_size, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id,
                prefix_cache=prefix_cache, stats=stats)
    return results
