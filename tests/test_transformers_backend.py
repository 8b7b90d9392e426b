"""The in-process backend on a tiny real Llama: refill decoding, padding, continuous batching, adapters."""

from pathlib import Path

import pytest

from matrix_assets.llm.base import Completion, GenerationParams
from matrix_assets.store.generation_cache import CachedBackend
from matrix_assets.llm.refill import PrefixCache, prefill_groups, supports_refill
from matrix_assets.llm.prepack import prepack_linear_layers
from matrix_assets.llm.transformers_backend import TransformersBackend
from matrix_assets.store.db import Store

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "a much longer question about many different things at once"}],
    [{"role": "user", "content": "x y z"}],
]


def test_batched_generation_matches_one_at_a_time(tiny_model_dir: str) -> None:
    """Left padding must not change greedy outputs: batch 3 equals three calls of batch 1."""
    params = GenerationParams(max_new_tokens=10)
    batched = TransformersBackend(tiny_model_dir, batch_size=8, decoding="padded").generate(CONVERSATIONS, params)
    single = TransformersBackend(tiny_model_dir, batch_size=1, decoding="padded").generate(CONVERSATIONS, params)
    assert [c.text for c in batched] == [c.text for c in single]
    assert all(c.completion_tokens == 10 and c.prompt_tokens > 0 for c in batched)


def test_continuous_batching_gives_the_same_greedy_text(tiny_model_dir: str) -> None:
    params = GenerationParams(max_new_tokens=10)
    padded = TransformersBackend(tiny_model_dir, decoding="padded").generate(CONVERSATIONS, params)
    continuous = TransformersBackend(tiny_model_dir, decoding="continuous")
    out = continuous.generate(CONVERSATIONS, params)
    assert [c.text for c in out] == [c.text for c in padded]
    assert [c.completion_tokens for c in out] == [c.completion_tokens for c in padded]


def test_repetition_penalty_stays_on_the_padded_path(tiny_model_dir: str, monkeypatch) -> None:  # noqa: ANN001
    backend = TransformersBackend(tiny_model_dir, decoding="continuous")
    calls = []
    monkeypatch.setattr(backend, "generate_continuous", lambda *a, **k: calls.append(a) or [])
    out = backend.generate(CONVERSATIONS, GenerationParams(max_new_tokens=4, repetition_penalty=1.2))
    assert len(out) == 3 and not calls  # continuous batching would silently drop the penalty


# The tiny model as initialised answers every prompt with the same token and never emits EOS. For refill
# decoding the interesting case is rows of different lengths that depend on the prompt, so this fixture
# makes the weights larger (prompt-dependent answers) and declares a few of the tokens it then produces as
# extra end tokens (as models with several end tokens have).
MANY = [[{"role": "user", "content": "question " + "word " * (i * 5 % 11)}] for i in range(7)]


@pytest.fixture
def eos_prone_backend(tiny_model_dir: str):  # noqa: ANN201
    """A backend whose model ends some answers early, depending on the prompt (its linears prepacked, as by
    default, after the weights are redrawn)."""
    import torch

    backend = TransformersBackend(tiny_model_dir, batch_size=3, prepack_weights=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in backend.model.parameters():
            if weight.dim() == 2:
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.3)
    backend.prepacked_layers = prepack_linear_layers(backend.model, batch_size_hint=3)
    assert backend.prepacked_layers > 0 or not torch.backends.mkldnn.is_available()
    answers = []
    for conversation in MANY:
        prompt = torch.tensor([backend.encode(conversation)])
        answers.append(backend.model.generate(input_ids=prompt, max_new_tokens=12, do_sample=False,
                                              pad_token_id=2)[0, prompt.shape[1]:].tolist())
    ends = [answers[row][step] for row, step in ((0, 3), (2, 6), (4, 1), (5, 9))]
    backend.model.generation_config.eos_token_id = [backend.tokenizer.eos_token_id, *ends]
    return backend


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_refill_decoding_gives_the_same_text_as_padded_generate(eos_prone_backend, penalty: float) -> None:  # noqa: ANN001
    """7 conversations through 3 slots: rows leave at EOS and queued ones join a running batch, yet every
    answer equals the one `model.generate` gives (the repetition penalty included)."""
    params = GenerationParams(max_new_tokens=12, repetition_penalty=penalty)
    eos_prone_backend.decoding = "padded"
    padded = eos_prone_backend.generate(MANY, params)
    eos_prone_backend.decoding = "refill"
    refill = eos_prone_backend.generate(MANY, params)
    lengths = [c.completion_tokens for c in padded]
    assert len(set(lengths)) > 1 and min(lengths) < 12, f"rows must end at different steps: {lengths}"
    assert [(c.text, c.completion_tokens, c.prompt_tokens) for c in refill] == [
        (c.text, c.completion_tokens, c.prompt_tokens) for c in padded
    ]


def test_refill_accounts_for_every_decoded_row_step(eos_prone_backend) -> None:  # noqa: ANN001
    """The decode counters add up: a row's first token comes from its prefill, every later token (or the EOS that
    ends it) from one decode step; rows that leave early make the mean batch narrower than the slots."""
    from matrix_assets.llm.refill import DecodeStats

    eos_prone_backend.decode_stats = DecodeStats()
    out = eos_prone_backend.generate(MANY, GenerationParams(max_new_tokens=12))
    stats = eos_prone_backend.decode_stats
    expected = sum(c.completion_tokens if c.completion_tokens < 12 else 11 for c in out)
    # Rows that step in a pass with joining prompts count apart from those of plain decode steps.
    assert stats.decode_row_steps + stats.joined_row_steps == expected
    assert stats.joined_passes > 0 and stats.joined_prompt_tokens > 0
    assert 0 < stats.mean_rows < eos_prone_backend.rows_for([[0]] * len(MANY), GenerationParams(max_new_tokens=12))
    assert stats.prefill_passes >= 1 and stats.prefill_tokens > 0
    assert stats.decode_seconds > 0 and stats.prefill_seconds > 0


def test_refill_reports_each_row_as_it_finishes(eos_prone_backend) -> None:  # noqa: ANN001
    seen: list[tuple[int, Completion]] = []
    out = eos_prone_backend.generate_streaming(MANY, GenerationParams(max_new_tokens=12),
                                               on_result=lambda i, c: seen.append((i, c)))
    assert sorted(i for i, _ in seen) == list(range(len(MANY)))
    assert [i for i, _ in seen] != list(range(len(MANY))), "rows finish in their own order, not input order"
    assert [c for _, c in sorted(seen, key=lambda x: x[0])] == out


def test_refill_sampling_is_seeded(tiny_model_dir: str) -> None:
    backend = TransformersBackend(tiny_model_dir, batch_size=2)
    params = GenerationParams(max_new_tokens=8, temperature=0.9, top_p=0.9, seed=3)
    first = backend.generate(MANY[:4], params)
    assert [c.text for c in backend.generate(MANY[:4], params)] == [c.text for c in first]
    assert [c.text for c in backend.generate(MANY[:4], params.replace(seed=4))] != [c.text for c in first]
    assert all(0 < c.completion_tokens <= 8 for c in first)


def test_generation_cache_commits_refill_rows_one_by_one(tmp_path: Path, eos_prone_backend) -> None:  # noqa: ANN001
    """The cache hands the streaming local backend all misses in one call and stores each answer as it ends:
    a crash after some rows finished keeps them."""
    store = Store(f"sqlite:///{tmp_path / 'cache.db'}")
    calls: list[int] = []
    original = eos_prone_backend.generate_streaming

    def crash_after_three(conversations, params, on_result=None):  # noqa: ANN001, ANN202
        calls.append(len(conversations))
        delivered = []

        def forward(i: int, c: Completion) -> None:
            on_result(i, c)
            delivered.append(i)
            if len(delivered) == 3:
                raise RuntimeError("killed")

        return original(conversations, params, on_result=forward)

    eos_prone_backend.generate_streaming = crash_after_three
    cached = CachedBackend(eos_prone_backend, store, chunk_size=2)
    with pytest.raises(RuntimeError, match="killed"):
        cached.generate(MANY, GenerationParams(max_new_tokens=12))
    assert calls == [len(MANY)]  # one call despite chunk_size=2
    assert store.count("generations") == 3
    eos_prone_backend.generate_streaming = original
    progress: list[tuple[int, int]] = []
    CachedBackend(eos_prone_backend, store).generate(MANY, GenerationParams(max_new_tokens=12),
                                                     progress=lambda d, t: progress.append((d, t)))
    assert progress == [(i, 4) for i in range(5)]  # only the 4 missing rows, reported one by one
    assert store.count("generations") == len(MANY)


def test_refill_works_under_a_lora_adapter(tmp_path: Path, tiny_model_dir: str) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    tuned = TransformersBackend(tiny_model_dir, adapter_path=str(tmp_path / "adapter"), batch_size=2)
    assert tuned.decoding == "refill"
    params = GenerationParams(max_new_tokens=6)
    refill = tuned.generate(MANY[:5], params)
    tuned.decoding = "padded"
    assert [c.text for c in refill] == [c.text for c in tuned.generate(MANY[:5], params)]


def test_models_with_sliding_window_layers_fall_back_to_padded_decoding(tiny_model_dir: str) -> None:
    backend = TransformersBackend(tiny_model_dir)
    assert backend.decoding == "refill" and supports_refill(backend.model)
    backend.model.config.sliding_window = 16
    assert not supports_refill(backend.model)


def test_scenes_on_the_live_refill_session_equal_scenes_decoded_padded(eos_prone_backend) -> None:  # noqa: ANN001
    """The simulation's live session (scenes queue their next request while others decode, and the modulator's
    verdicts are scored from inside the running session) gives the same transcripts as plain padded waves."""
    from matrix_assets.methods.matrix.engine import SceneSettings, run_scenes
    from matrix_assets.methods.matrix.scene import SceneInput

    settings = SceneSettings(n_roles=3, plan_steps=2, max_rounds=2, plan_tokens=12, action_tokens=8)
    inputs = [SceneInput(f"p{i}", f"question {i} " + "word " * i, "First do this. Then do that.") for i in range(5)]
    eos_prone_backend.decoding = "padded"
    padded = run_scenes(eos_prone_backend, inputs, settings)
    eos_prone_backend.decoding = "refill"
    order: list[str] = []
    live = run_scenes(eos_prone_backend, inputs, settings, on_scene_done=lambda t: order.append(t.prompt_id))
    assert [t.render_markdown() for t in live] == [t.render_markdown() for t in padded]
    assert sorted(order) == [i.prompt_id for i in inputs]
    assert any(e.kind == "modulation" for t in live for e in t.events)
    for scene in live:
        # The random tiny model puts little mass on yes/no: a verdict under MIN_CANDIDATE_MASS is read from the
        # reply's text instead, and counted, never silently assumed.
        from_text = sum(1 for e in scene.events if e.kind == "modulation" and e.p_yes is None)
        assert scene.fallbacks.get("feasible_from_text", 0) == from_text


def test_prefix_cache_reuses_shared_prompt_heads_without_changing_answers(eos_prone_backend) -> None:  # noqa: ANN001
    shared = [[{"role": "user", "content": "a long shared instruction " * 4 + tail}] for tail in ("one", "two", "three")]
    params = GenerationParams(max_new_tokens=10, repetition_penalty=1.2)
    eos_prone_backend.prefix_cache = None
    plain = eos_prone_backend.generate(shared + MANY, params)
    eos_prone_backend.prefix_cache = PrefixCache(max_tokens=4096)
    cached = eos_prone_backend.generate(shared + MANY, params)
    again = eos_prone_backend.generate(shared + MANY, params)  # now every prompt's head is cached
    assert eos_prone_backend.prefix_cache.hits >= len(shared) + len(MANY)
    assert [c.text for c in cached] == [c.text for c in again] == [c.text for c in plain]


def test_prefix_cache_never_reuses_another_prompt_and_stays_bounded(monkeypatch) -> None:  # noqa: ANN001
    import torch

    cache = PrefixCache(max_tokens=64, block=4)
    kv = [(torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8))]
    cache.store(list(range(12)), kv)
    found = cache.lookup(list(range(12)) + [99])
    assert found is not None and found[0] == 12 and torch.equal(found[1][0][0], kv[0][0])
    assert cache.lookup(list(range(8)) + [50, 51, 52, 53, 54])[0] == 8  # the longest shared block prefix
    assert cache.lookup(list(range(12))) [0] == 8  # at least one token is left to prefill
    for start in range(100, 200, 12):
        cache.store(list(range(start, start + 12)), kv)
    assert cache.tokens <= 64 and len(cache.entries) == 64 // 12

    # Every prefix hashing alike (a collision) must not hand one prompt another prompt's keys.
    colliding = PrefixCache(max_tokens=64, block=4)
    monkeypatch.setattr(colliding, "_prefix_hashes", lambda prompt, limit: [(1, 4), (2, 8)][: limit // 4])
    colliding.store(list(range(8)), kv)
    assert colliding.lookup(list(range(8)) + [5])[0] == 8
    assert colliding.lookup([7] * 9) is None


def test_growing_cache_layers_hold_what_dynamic_layers_hold_and_write_steps_in_place(tiny_model_dir: str) -> None:
    """Refill decoding's KV layers: the model sees the same keys and values (so the same logits) as with
    transformers' DynamicLayer, through prefill, steps, a batch rebuilt from outside (a row joining or
    leaving) and growth past the headroom; a plain step writes into the existing buffer."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    from matrix_assets.llm.refill import GrowingLayer, growing_cache

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(5, 500, (3, 9), generator=generator)
    steps = torch.randint(5, 500, (3, 2 * GrowingLayer.min_headroom + 10), generator=generator)
    plain, growing = DynamicCache(), growing_cache()
    with torch.no_grad():
        expected = [model(input_ids=prompt, past_key_values=plain, use_cache=True).logits]
        got = [model(input_ids=prompt, past_key_values=growing, use_cache=True).logits]
        rooms = []
        for i in range(steps.shape[1]):
            if i == 20:  # a row leaves, as `_Batch.keep` does it: the layers' tensors are replaced from outside
                keep = torch.tensor([0, 2])
                plain.batch_select_indices(keep)
                growing.batch_select_indices(keep)
                steps = steps[keep]
            if i == 30:  # a row joins and the leading column is cut, as `_Batch.join` / `_Batch.keep` do
                for cache in (plain, growing):
                    for layer in cache.layers:
                        layer.keys = torch.cat([layer.keys, layer.keys[:1]])[:, :, 1:]
                        layer.values = torch.cat([layer.values, layer.values[:1]])[:, :, 1:]
                steps = torch.cat([steps, steps[:1]])
            token = steps[:, i : i + 1]
            positions = torch.full((token.shape[0], 1), plain.get_seq_length())  # the cut column shifts no position
            expected.append(model(input_ids=token, past_key_values=plain, position_ids=positions,
                                  use_cache=True).logits)
            got.append(model(input_ids=token, past_key_values=growing, position_ids=positions, use_cache=True).logits)
            rooms.append(growing.layers[0]._room[0])  # kept alive: no address is reused
    assert all(type(layer) is GrowingLayer for layer in growing.layers)
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(e, g)
    for p_layer, g_layer in zip(plain.layers, growing.layers, strict=True):
        assert torch.equal(p_layer.keys, g_layer.keys) and torch.equal(p_layer.values, g_layer.values)
    # Buffers are reallocated only on adoption (the row that left, the row that joined) and growth, not every step.
    assert len({room.data_ptr() for room in rooms}) <= 6 < len(rooms)


def test_growing_cache_layers_refuse_an_update_of_another_batch_size() -> None:
    import torch

    from matrix_assets.llm.refill import GrowingLayer

    layer = GrowingLayer()
    layer.update(torch.zeros(2, 1, 4, 8), torch.zeros(2, 1, 4, 8))
    with pytest.raises(ValueError, match="does not fit"):
        layer.update(torch.zeros(1, 1, 1, 8), torch.zeros(1, 1, 1, 8))
    layer.values = layer.values.clone()  # replaced from outside alone: adopted, not written over
    layer.values[0, 0, 0, 0] = 7.0
    keys, values = layer.update(torch.ones(2, 1, 1, 8), torch.ones(2, 1, 1, 8))
    assert values[0, 0, 0, 0] == 7.0 and keys.shape == values.shape == (2, 1, 5, 8)


def test_growing_cache_layers_let_go_of_their_buffer_when_rows_leave() -> None:
    """A batch change frees each layer's old buffer as that layer is rebuilt: no moment holds every layer twice."""
    import weakref

    import torch

    from matrix_assets.llm.refill import GrowingLayer

    layer = GrowingLayer()
    keys = torch.arange(3 * 4 * 8, dtype=torch.float).reshape(3, 1, 4, 8)
    layer.update(keys, -keys)
    old_buffer = weakref.ref(layer._room[0])
    layer.batch_select_indices(torch.tensor([0, 2]))
    assert old_buffer() is None, "the old buffer is still held after the rows left"
    assert torch.equal(layer.keys, keys[[0, 2]]) and torch.equal(layer.values, -keys[[0, 2]])
    grown, _ = layer.update(torch.ones(2, 1, 1, 8), torch.ones(2, 1, 1, 8))
    assert torch.equal(grown[:, :, :4], keys[[0, 2]]) and grown.shape == (2, 1, 5, 8)


def test_a_token_budget_widens_batches_of_short_prompts_without_changing_the_text(
        tiny_model_dir: str, monkeypatch) -> None:  # noqa: ANN001
    import matrix_assets.llm.transformers_backend as module

    params = GenerationParams(max_new_tokens=6)
    narrow = TransformersBackend(tiny_model_dir, batch_size=2)
    wide = TransformersBackend(tiny_model_dir, batch_size=2, batch_tokens=10_000)
    encoded = [wide.encode(c) for c in CONVERSATIONS]
    assert narrow.rows_for(encoded, params) == 2
    assert wide.rows_for(encoded, params) == len(CONVERSATIONS)  # every row fits the budget
    per_row = sum(len(e) for e in encoded) / len(encoded) + params.max_new_tokens
    tight = TransformersBackend(tiny_model_dir, batch_size=1, batch_tokens=int(2 * per_row) + 1)
    assert tight.rows_for(encoded, params) == 2
    assert TransformersBackend(tiny_model_dir, batch_size=2, batch_tokens=1).rows_for(encoded, params) == 2

    widths = []
    real = module.TransformersBackend.generate_refill

    def spy(self, batch, params, on_result=None):  # noqa: ANN001, ANN202
        widths.append(self.rows_for(batch, params))
        return real(self, batch, params, on_result)

    monkeypatch.setattr(module.TransformersBackend, "generate_refill", spy)
    assert [c.text for c in wide.generate(CONVERSATIONS, params)] == \
        [c.text for c in narrow.generate(CONVERSATIONS, params)]
    assert widths == [len(CONVERSATIONS), 2]


def test_prefill_shares_a_pass_between_cache_misses_and_hits_of_different_lengths(eos_prone_backend) -> None:  # noqa: ANN001
    """Newly admitted prompts share a forward pass whether their head is cached (at different lengths) or not:
    each row's last logits equal those of its prompt run alone, and the KV it stores is its own prompt's."""
    import torch

    from matrix_assets.llm.refill import TokenJob, prefill

    model, pad = eos_prone_backend.model, eos_prone_backend.tokenizer.pad_token_id
    head = list(range(40, 80))  # 40 tokens: the cache keeps 32 and 16 token blocks of it
    prompts = [head[:20] + [7, 8, 9], list(range(200, 220)), head + [5, 6], head[:33] + [1, 2, 3, 4, 5, 6, 7]]
    cache = PrefixCache(max_tokens=4096, block=16)
    params = GenerationParams(max_new_tokens=4)
    with torch.inference_mode():
        prefill(model, [TokenJob(0, head + [1], params)], pad, cache)
        hits_before = cache.hits
        passes = []
        hook = model.register_forward_pre_hook(lambda module, args: passes.append(1))
        _, mask, logits = prefill(model, [TokenJob(i, p, params) for i, p in enumerate(prompts)], pad, cache)
        hook.remove()
        alone = [model(input_ids=torch.tensor([p])).logits[0, -1] for p in prompts]
        own = model(input_ids=torch.tensor([prompts[1]]), use_cache=True).past_key_values
    assert cache.hits - hits_before == 3 and cache.reused_tokens == 16 + 32 + 32
    assert len(passes) == 1  # rests of 7, 20, 10 and 8 tokens: padding to 20 is cheaper than a second pass
    assert mask.sum(-1).tolist() == [len(p) for p in prompts]  # rows in job order
    for row, expected in enumerate(alone):
        assert torch.allclose(logits[row], expected, atol=1e-4), row
    # The miss sat behind 32 columns of other rows' heads and a gap: what was stored is its own 16-token block.
    found = cache.lookup(prompts[1] + [0])
    assert found is not None and found[0] == 16
    assert torch.allclose(found[1][0][0], own.layers[0].keys[:, :, :16], atol=1e-5)


def test_prefill_groups_pad_where_it_is_cheaper_than_another_pass() -> None:
    assert prefill_groups([5, 6, 200, 7], overhead=32) == [[0, 1, 3], [2]]  # 200 would pad three short rows
    assert prefill_groups([9, 9, 9], overhead=32) == [[0, 1, 2]]
    assert prefill_groups([30, 10], overhead=32) == [[1, 0]]  # padding 10 -> 30 costs 20 < one more pass
    assert prefill_groups([60, 10], overhead=32) == [[1], [0]]
    assert prefill_groups([3, 1, 2], overhead=0) == [[1], [2], [0]]
    assert prefill_groups([]) == []


def test_a_joined_pass_equals_a_decode_step_and_a_prefill(eos_prone_backend) -> None:  # noqa: ANN001
    """Prompts joining a running batch share its next decode step's forward pass: the running rows get the logits
    and KV of a plain decode step, each joining prompt (one with a cached head, one without) the logits and KV of
    its own prefill, and the prefix cache stores the joining prompts' own KV."""
    import torch

    from matrix_assets.llm.refill import TokenJob, _Batch, joined_pass, joins_passes, prefill

    model, pad = eos_prone_backend.model, eos_prone_backend.tokenizer.pad_token_id
    assert eos_prone_backend.joined_passes and joins_passes(model)
    params = GenerationParams(max_new_tokens=4)
    running = [TokenJob(0, list(range(30, 47)), params), TokenJob(1, list(range(60, 65)), params)]
    head = list(range(100, 140))
    joining = [TokenJob(2, head + [7, 8, 9], params), TokenJob(3, list(range(300, 320)), params)]

    def running_batch(cache: PrefixCache) -> _Batch:
        batch = _Batch(model.get_output_embeddings().out_features)
        prefilled = prefill(model, running, pad, None)
        batch.join(running, prefilled.cache, prefilled.mask)
        batch.pending = prefilled.logits.argmax(-1)
        prefill(model, [TokenJob(9, head + [1], params)], pad, cache)  # the head of joining[0] is cached
        return batch

    with torch.inference_mode():
        separate_cache, joined_cache = PrefixCache(block=16), PrefixCache(block=16)
        separate = running_batch(separate_cache)
        separate.mask = torch.cat([separate.mask, separate.mask.new_ones((2, 1))], dim=1)
        step = model(input_ids=separate.pending[:, None], attention_mask=separate.mask,
                     position_ids=separate.mask.sum(-1, keepdim=True) - 1, past_key_values=separate.cache,
                     use_cache=True).logits[:, -1]
        alone = prefill(model, joining, pad, separate_cache)

        batch = running_batch(joined_cache)
        passes = []
        hook = model.register_forward_pre_hook(lambda module, args: passes.append(1))
        step_logits, joined = joined_pass(model, batch, joining, joined_cache)
        hook.remove()
    assert len(passes) == 1 and joined_cache.hits == separate_cache.hits == 1
    assert torch.allclose(step_logits, step, atol=1e-4)
    assert torch.allclose(joined.logits, alone.logits, atol=1e-4)
    assert torch.equal(batch.mask, separate.mask)
    for mine, theirs in zip(batch.cache.layers, separate.cache.layers):
        assert torch.allclose(mine.keys, theirs.keys, atol=1e-5) and torch.allclose(mine.values, theirs.values, atol=1e-5)
    # The joining rows' KV at their prompts' own positions (`prefill` leaves a gap after a cached head; a joined
    # pass does not): the same values in the same order.
    assert joined.mask.sum(-1).tolist() == alone.mask.sum(-1).tolist() == [len(job.prompt) for job in joining]
    for mine, theirs in zip(joined.cache.layers, alone.cache.layers):
        for row in range(len(joining)):
            for a, b in ((mine.keys, theirs.keys), (mine.values, theirs.values)):
                assert torch.allclose(a[row][:, joined.mask[row].bool()], b[row][:, alone.mask[row].bool()], atol=1e-5)
    for job in joining:
        mine, theirs = joined_cache.lookup(job.prompt + [0]), separate_cache.lookup(job.prompt + [0])
        assert mine is not None and theirs is not None and mine[0] == theirs[0]
        assert torch.allclose(mine[1][-1][0], theirs[1][-1][0], atol=1e-5)


def test_verdicts_run_in_the_live_session_and_share_the_cache(tmp_path: Path, eos_prone_backend,  # noqa: ANN001
                                                              monkeypatch) -> None:  # noqa: ANN001
    """Scripts whose verdicts (Score requests) come while other scripts' rows decode: the refill session runs each
    verdict's prompt in a pass it takes anyway (a joined pass when rows are running) and reads the same
    distribution `next_token_logprobs` gives; the texts equal padded decoding's; the verdicts go into the
    generation cache under `next_token_logprobs`' keys, so a warm run asks the model for nothing."""
    from matrix_assets.llm import refill
    from matrix_assets.llm.scripts import Generate, Score, drive

    params = GenerationParams(max_new_tokens=12)

    def scripts(results: dict[int, list]) -> list:
        def script(i: int):  # noqa: ANN202
            first = yield [Generate(MANY[i], params)]
            scene = [*MANY[i], {"role": "assistant", "content": first[0]}, {"role": "user", "content": "Did it work?"}]
            second = yield [Score(scene, ("yes", "no"), "Answer:"), Generate(scene, params)]
            results[i] = [first[0], second[0], second[1], scene]
        return [script(i) for i in range(len(MANY))]

    eos_prone_backend.decoding = "padded"
    assert not eos_prone_backend.serves_scores
    padded: dict[int, list] = {}
    drive(eos_prone_backend, scripts(padded))

    eos_prone_backend.decoding = "refill"
    verdicts_joined = []
    original = refill.joined_pass

    def joined_pass(model, batch, jobs, *args, **kwargs):  # noqa: ANN001, ANN202
        verdicts_joined.append(sum(job.wants_logits for job in jobs))
        return original(model, batch, jobs, *args, **kwargs)

    monkeypatch.setattr(refill, "joined_pass", joined_pass)
    store = Store(f"sqlite:///{tmp_path / 'cache.db'}")
    cached = CachedBackend(eos_prone_backend, store)
    assert cached.serves_scores
    asked_apart: list[int] = []
    monkeypatch.setattr(eos_prone_backend, "next_token_logprobs", lambda convs, *a, **k: asked_apart.append(1))
    live: dict[int, list] = {}
    stats = drive(cached, scripts(live))
    monkeypatch.undo()

    assert not asked_apart and stats.scores_unavailable == 0
    assert sum(verdicts_joined) > 0, "some verdict should have joined a running batch"
    assert [live[i][0] for i in range(len(MANY))] == [padded[i][0] for i in range(len(MANY))]
    assert [live[i][2] for i in range(len(MANY))] == [padded[i][2] for i in range(len(MANY))]
    for i in range(len(MANY)):
        assert set(live[i][1]) == {"yes", "no"}
        for candidate in ("yes", "no"):
            assert live[i][1][candidate] == pytest.approx(padded[i][1][candidate], abs=1e-4)
    assert cached.stats.generated == 2 * len(MANY) + len(MANY)  # every generation and verdict, once

    # A warm run: every generation and verdict from the cache, nothing decoded.
    warm_backend = CachedBackend(eos_prone_backend, store)
    decoded: list[int] = []
    monkeypatch.setattr(refill, "decode_live", lambda model, take, *a, **k: decoded.extend(take(8)))
    warm: dict[int, list] = {}
    drive(warm_backend, scripts(warm))
    assert warm == live and warm_backend.stats.generated == 0 and not decoded
    # Asked apart, the same verdicts are cache hits too (one key for both ways of asking).
    apart = warm_backend.next_token_logprobs([live[i][3] for i in range(len(MANY))], ["yes", "no"],
                                             assistant_prefix="Answer:")
    assert apart == [live[i][1] for i in range(len(MANY))] and warm_backend.stats.generated == 0


def test_prompts_sharing_a_head_in_one_pass_reuse_it(eos_prone_backend) -> None:  # noqa: ANN001
    """Prompts taken together that start alike: the first computes the shared head, the others wait one pass and
    reuse it from the prefix cache instead of computing it again in the same pass; the answers stay padded
    decoding's."""
    from matrix_assets.llm.refill import SHARED_HEAD_TOKENS, PrefixCache, TokenJob, defer_shared_heads

    head = "the shared part of every prompt " * 12
    conversations = [[{"role": "user", "content": head + ending}] for ending in ("one", "two and three", "four")]
    params = GenerationParams(max_new_tokens=8)
    eos_prone_backend.decoding = "padded"
    padded = eos_prone_backend.generate(conversations, params)
    eos_prone_backend.decoding = "refill"
    eos_prone_backend.prefix_cache = PrefixCache(block=4)
    refill = eos_prone_backend.generate(conversations, params)
    assert [c.text for c in refill] == [c.text for c in padded]
    shared = len(eos_prone_backend.encode(conversations[0])) - 8
    assert shared > SHARED_HEAD_TOKENS
    assert eos_prone_backend.prefix_cache.reused_tokens >= 2 * (shared - 4)  # both later prompts reused the head

    # The rule itself: a short shared head (the chat template's) does not hold a prompt back, nor does one the
    # cache already holds; the first prompt always runs.
    jobs = [TokenJob(i, p, params) for i, p in enumerate([[1] * 100 + [2], [1] * 100 + [3], [1] * 10 + [4] * 90])]
    now, later = defer_shared_heads(jobs, PrefixCache(block=4))
    assert [j.id for j in now] == [0, 2] and [j.id for j in later] == [1]
    assert defer_shared_heads(jobs, None) == (jobs, [])
    cache = PrefixCache(block=4)
    cache.store([1] * 100, [])
    assert cache.cached_length([1] * 100 + [3]) == 100
    assert defer_shared_heads(jobs, cache) == (jobs, [])
