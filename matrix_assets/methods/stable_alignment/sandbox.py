"""SANDBOX: Stable Alignment's simulated society (Liu et al., ICLR 2024, arXiv 2305.16960, section 3.1).

g x g agents live on a grid (agent id = row * g + col). Each has an internal memory {question: answer} and an
external memory (the record of its interactions, here `SandboxResult.external_memory`). In round r agent i is
asked question (r * N + i) mod Q, and one *back-scatter* interaction follows:

1. draft: the agent answers; when its memory holds a question close to this one (cosine distance of the question
   embeddings under a threshold), the prompt first shows that question and the agent's earlier answer;
2. up to `max_peers` neighbours within Euclidean grid distance g // 2 are drawn at random, without replacement;
3. each rates the draft's alignment with shared social values (harmless; unbiased; honest and helpful) on 1-7 and
   gives a reason;
4. the agent revises its answer from the average rating and the reasons, highest rating first, lowest last;
5. an observer (a separate backend, sent no system prompt) rates the draft and the revision 1-7 (and optionally
   their engagement);
6. the revision goes into the agent's memory for this question (the first answer per question stays).

The protocol follows the released code (agi-templar/Stable-Alignment, Apache-2.0), prompts reworded, with its
defects fixed: every rating is read from the model's next-token distribution over "1".."7" after "Rating: "
(the expected value, the distribution kept), never parsed from text and never filled in when it is missing (the
original wrote 8 or -1 and let them leak into the training data); and instead of ten threads reading and writing
memories at once, every agent of a round reads the memories as the round began and the revisions are written
after it, in agent order, so a world is deterministic.

Model calls are batched per step of a round, across agents: one `generate` for all drafts, one
`next_token_logprobs` for all peer ratings, and so on; a backend is slow per call and fast per batch. Everything
goes through whatever backend is passed in, so a `CachedBackend` makes a re-run free.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from matrix_assets.llm.base import ChatBackend, Conversation, GenerationParams, choice_probabilities
from matrix_assets.templates import render

RATING_CANDIDATES: tuple[str, ...] = tuple(str(i) for i in range(1, 8))
QUOTE_CHARS = 1500  # longest text quoted inside another prompt (about 300 tokens)

Embedder = Callable[[Sequence[str]], np.ndarray]
ProgressCallback = Callable[[int, int], None]  # (steps done, steps in the world)


# -- settings -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SandboxSettings:
    """One world's size and budgets. The defaults are the quick profile for a 135M model on a 2-core CPU; `PAPER`
    is the original's scale. The minimum that is still Stable Alignment: 2 x 2 agents, 2 rounds, 2 peers."""

    grid_size: int = 3  # g: g * g agents (paper 10)
    rounds: int = 2  # paper 50; >= 2, so that memory can shape later drafts
    max_peers: int = 4  # interactees drawn per interaction (paper 4)
    # Only the first `question_pool` questions are asked (None: all). 9 = the quick profile's agent count, so every
    # agent meets its first question again in round 2 (its memory then shows its revision) and each question gets
    # 2 drafts and 2 revisions. The questions after the pool seed the memories (see `run_sandbox`).
    question_pool: int | None = 9
    seed_pairs_per_agent: int = 2  # (question, answer) pairs an agent's memory starts with (paper: 50)
    memory_threshold: float = 0.3  # cosine distance under which a remembered question counts as similar
    peer_memory: bool = True  # peers also see their own most similar memory when rating (as the released code)
    answer_tokens: int = 96  # drafts and revisions (paper 256)
    reason_tokens: int = 48  # a peer's reason (paper: the rest of its 256-token reply)
    # The original samples at 1.0, top-p 1, no penalty (sandbox/utils.py call_gpt); a 135M model at 1.0 drifts into
    # noise, and without a penalty it loops. Answers differ per agent anyway through the agent's id in its prompt.
    temperature: float = 0.8
    top_p: float = 0.95
    repetition_penalty: float = 1.1
    engagement: bool = False  # the observer also rates engagement 1-7 (paper: on)
    # The rating is the next token after this assistant prefix, where the reply's own "Rating:__" puts it. With
    # its space: the bundled SmolLM2 tokenizer writes "Rating: 5" as "Rating", ":", " ", "5", so after "Rating: "
    # the digits hold ~97% of the next-token mass, after "Rating:" under 1% (measured on observer prompts). For a
    # tokenizer that merges " 5" into one token, "Rating:" is the natural cut (" 5" and "5" count together).
    rating_prefix: str = "Rating: "
    seed: int = 0

    @property
    def n_agents(self) -> int:
        return self.grid_size * self.grid_size

    @property
    def radius(self) -> int:
        return self.grid_size // 2

    def validate(self) -> None:
        problems = []
        if self.grid_size < 2:
            problems.append(f"grid_size must be >= 2 (at least 2 x 2 agents), got {self.grid_size}")
        if self.rounds < 2:
            problems.append(f"rounds must be >= 2 (memory must be able to shape a later draft), got {self.rounds}")
        if self.max_peers < 2:
            problems.append(f"max_peers must be >= 2, got {self.max_peers}")
        if self.question_pool is not None and self.question_pool < 1:
            problems.append(f"question_pool must be >= 1 or None, got {self.question_pool}")
        if self.seed_pairs_per_agent < 0:
            problems.append(f"seed_pairs_per_agent must be >= 0, got {self.seed_pairs_per_agent}")
        if not 0.0 < self.memory_threshold <= 2.0:
            problems.append(f"memory_threshold is a cosine distance in (0, 2], got {self.memory_threshold}")
        if self.answer_tokens < 1 or self.reason_tokens < 1:
            problems.append("answer_tokens and reason_tokens must be >= 1")
        if self.temperature < 0.0 or not 0.0 < self.top_p <= 1.0 or self.repetition_penalty <= 0.0:
            problems.append("need temperature >= 0, 0 < top_p <= 1 and repetition_penalty > 0")
        if not self.rating_prefix.strip():
            problems.append("rating_prefix must contain text, e.g. 'Rating: '")
        if problems:
            raise ValueError("; ".join(problems))

    def params(self, max_new_tokens: int, seed: int) -> GenerationParams:
        return GenerationParams(max_new_tokens=max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                                seed=seed, repetition_penalty=self.repetition_penalty)


PAPER = SandboxSettings(
    grid_size=10, rounds=50, max_peers=4, question_pool=None, seed_pairs_per_agent=50, answer_tokens=256,
    reason_tokens=256, temperature=1.0, top_p=1.0, repetition_penalty=1.0, engagement=True,
)


# -- results ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rating:
    """A 1-7 rating read from a next-token distribution: the expected value over the renormalised distribution of
    "1".."7", and that distribution. Both None when the backend gave none of the digits any mass (missing)."""

    value: float | None = None
    distribution: dict[str, float] | None = None

    @property
    def missing(self) -> bool:
        return self.value is None

    @classmethod
    def from_logprobs(cls, logprobs: dict[str, float]) -> Rating:
        probs = choice_probabilities(logprobs)
        if probs is None:
            return cls()
        distribution = {c: float(probs.get(c, 0.0)) for c in RATING_CANDIDATES}
        return cls(sum(int(c) * p for c, p in distribution.items()), distribution)

    def label(self) -> str:
        return "missing" if self.value is None else f"{self.value:.2f}"

    def as_int(self) -> int | None:
        """The expected value rounded half up: how the rating is quoted back in a prompt."""
        return None if self.value is None else int(math.floor(self.value + 0.5))


@dataclass(frozen=True)
class MemoryHit:
    """The most similar remembered question (under the threshold) and the answer remembered for it."""

    question: str
    answer: str
    distance: float


@dataclass(frozen=True)
class PeerFeedback:
    peer: int
    rating: Rating
    reason: str  # generated text
    memory_hit: MemoryHit | None = None  # what the peer remembered when it rated


def feedback_order(peers: Sequence[PeerFeedback]) -> list[PeerFeedback]:
    """Feedback as the revision prompt shows it: highest rating first, lowest last (the last thing the agent reads
    before revising). Equal ratings keep the peers' drawn order; a missing rating goes first, away from the end,
    where the original put its placeholder too, and does not count in the average."""
    return sorted(peers, key=lambda f: (0, 0.0) if f.rating.value is None else (1, -f.rating.value))


@dataclass(frozen=True)
class Interaction:
    """One back-scatter interaction: one record of the center agent's external memory."""

    round: int
    agent: int
    question: str
    draft: str
    memory_hit: MemoryHit | None
    peers: tuple[PeerFeedback, ...]  # in the order they were drawn
    mean_peer_rating: float | None  # mean over the peers whose rating is not missing
    revision: str
    observer_before: Rating
    observer_after: Rating
    engagement_before: Rating | None = None
    engagement_after: Rating | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (for a store); `from_dict` rebuilds it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Interaction:
        def rating(d: dict | None) -> Rating | None:
            return None if d is None else Rating(d.get("value"), d.get("distribution"))

        def hit(d: dict | None) -> MemoryHit | None:
            return None if d is None else MemoryHit(d["question"], d["answer"], float(d["distance"]))

        return cls(
            round=int(data["round"]), agent=int(data["agent"]), question=data["question"], draft=data["draft"],
            memory_hit=hit(data.get("memory_hit")),
            peers=tuple(PeerFeedback(int(p["peer"]), rating(p["rating"]), p["reason"], hit(p.get("memory_hit")))
                        for p in data["peers"]),
            mean_peer_rating=data.get("mean_peer_rating"), revision=data["revision"],
            observer_before=rating(data["observer_before"]), observer_after=rating(data["observer_after"]),
            engagement_before=rating(data.get("engagement_before")),
            engagement_after=rating(data.get("engagement_after")),
        )

    def render_markdown(self) -> str:
        mean = "missing" if self.mean_peer_rating is None else f"{self.mean_peer_rating:.2f}"
        lines = [f"#### Round {self.round + 1}, agent {self.agent}", "",
                 f"**Question:** {_one_line(self.question)}", ""]
        if self.memory_hit is not None:
            lines += [f"**Remembered** (distance {self.memory_hit.distance:.2f}): "
                      f"\"{_one_line(self.memory_hit.question)}\"", _quote(self.memory_hit.answer), ""]
        else:
            lines += ["**Remembered:** nothing similar", ""]
        lines += [f"**Draft** (observer {self.observer_before.label()}{_engagement(self.engagement_before)}):",
                  _quote(self.draft), "", f"**Feedback** (mean rating {mean}, highest first):"]
        for f in feedback_order(self.peers):
            lines.append(f"- agent {f.peer}, rating {f.rating.label()} ({_distribution(f.rating)}): "
                         f"{_one_line(f.reason) or '(no reason)'}")
        lines += ["", f"**Revision** (observer {self.observer_after.label()}{_engagement(self.engagement_after)}):",
                  _quote(self.revision)]
        return "\n".join(lines)


@dataclass
class SandboxResult:
    settings: SandboxSettings
    interactions: list[Interaction]
    seed_pairs: list[list[tuple[str, str]]]  # per agent: the (question, answer) pairs its memory started with
    memories: list[dict[str, str]]  # per agent: the internal memory at the end
    seed_generated: bool = False  # the seed answers are the model's own (rather than passed in)

    def external_memory(self, agent: int) -> list[Interaction]:
        return [i for i in self.interactions if i.agent == agent]

    def summary(self) -> dict[str, float | int]:
        before = [i.observer_before.value for i in self.interactions if i.observer_before.value is not None]
        after = [i.observer_after.value for i in self.interactions if i.observer_after.value is not None]
        peers = [p for i in self.interactions for p in i.peers]
        both = [i for i in self.interactions if not i.observer_before.missing and not i.observer_after.missing]
        return {
            "agents": self.settings.n_agents,
            "rounds": self.settings.rounds,
            "interactions": len(self.interactions),
            "seed_pairs": sum(len(p) for p in self.seed_pairs),
            "memory_hits": sum(1 for i in self.interactions if i.memory_hit is not None),
            "peer_feedback": len(peers),
            "peer_ratings_missing": sum(1 for p in peers if p.rating.missing),
            "observer_ratings_missing": 2 * len(self.interactions) - len(before) - len(after),
            "mean_observer_before": round(sum(before) / len(before), 3) if before else float("nan"),
            "mean_observer_after": round(sum(after) / len(after), 3) if after else float("nan"),
            "improved": sum(1 for i in both if i.observer_after.value > i.observer_before.value),
        }


RoundCallback = Callable[[int, list[Interaction]], None]  # (round, its interactions), as each round ends


# -- geometry -----------------------------------------------------------------------------------------------------


def grid_position(agent: int, grid_size: int) -> tuple[int, int]:
    return divmod(agent, grid_size)


def social_circle(agent: int, grid_size: int) -> list[int]:
    """The other agents within Euclidean grid distance g // 2 (radius 1: the 4-neighbourhood), by id."""
    row, col = grid_position(agent, grid_size)
    radius = grid_size // 2
    out = []
    for other in range(grid_size * grid_size):
        r, c = grid_position(other, grid_size)
        if other != agent and (r - row) ** 2 + (c - col) ** 2 <= radius * radius:
            out.append(other)
    return out


def draw_peers(agent: int, round_: int, settings: SandboxSettings) -> list[int]:
    """Up to `max_peers` of the agent's social circle, drawn without replacement by a `random.Random` seeded with
    (world seed, round, agent): the same world draws the same peers."""
    circle = social_circle(agent, settings.grid_size)
    rng = random.Random(f"stable-alignment:{settings.seed}:{round_}:{agent}")
    return rng.sample(circle, min(settings.max_peers, len(circle)))


def question_for(agent: int, round_: int, n_agents: int, pool: Sequence[str]) -> str:
    return pool[(round_ * n_agents + agent) % len(pool)]


def sample_seed_pairs(pairs: Sequence[tuple[str, str]], settings: SandboxSettings) -> list[list[tuple[str, str]]]:
    """`seed_pairs_per_agent` of the given (question, answer) pairs for every agent, each agent its own sample
    without replacement (the original samples each agent's 50 independently from its human data), drawn by a
    `random.Random` seeded with (world seed, agent): the same world starts from the same memories."""
    k = min(settings.seed_pairs_per_agent, len(pairs))
    return [random.Random(f"stable-alignment-seeds:{settings.seed}:{agent}").sample(list(pairs), k)
            for agent in range(settings.n_agents)]


# -- memory -------------------------------------------------------------------------------------------------------


class _Embeddings:
    """Unit-length question embeddings, each text embedded once per world (in batches)."""

    def __init__(self, embed: Embedder) -> None:
        self.embed = embed
        self.vectors: dict[str, np.ndarray] = {}

    def ensure(self, texts: Sequence[str]) -> None:
        missing = list(dict.fromkeys(t for t in texts if t not in self.vectors))
        if not missing:
            return
        matrix = np.asarray(self.embed(missing), dtype=np.float64)
        if matrix.ndim != 2 or matrix.shape[0] != len(missing):
            raise ValueError(f"the embedder returned shape {matrix.shape} for {len(missing)} texts")
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        matrix = matrix / np.where(norms == 0.0, 1.0, norms)
        self.vectors.update(zip(missing, matrix))

    def nearest(self, memory: dict[str, str], question: str, threshold: float) -> MemoryHit | None:
        """The remembered question nearest to `question` by cosine distance (the first one on ties), if under the
        threshold."""
        if not memory:
            return None
        keys = list(memory)
        distances = 1.0 - np.stack([self.vectors[k] for k in keys]) @ self.vectors[question]
        best = int(np.argmin(distances))
        distance = max(0.0, float(distances[best]))
        return MemoryHit(keys[best], memory[keys[best]], distance) if distance < threshold else None


def minilm_embedder() -> Embedder:
    """Sentence embeddings from the bundled all-MiniLM-L6-v2 (`matrix_assets.embeddings`: unit length, loaded once
    per process, offline). The original used OpenAI's text-embedding-ada-002 with the same 0.3 cosine-distance
    threshold; on MiniLM, 0.3 separates paraphrases ("pick a lock" / "pick a lock quickly": 0.09) from merely
    related questions ("open a lock without the key": 0.33)."""
    from matrix_assets.embeddings import embed

    return embed


# -- the world ----------------------------------------------------------------------------------------------------


def _step_seed(world_seed: int, round_: int, step: str) -> int:
    """A sampling seed per (world, round, step); the answers of one step differ through the agent's id in its prompt
    (one `generate` call carries one `GenerationParams` for the whole batch)."""
    return int(hashlib.sha256(f"stable-alignment:{world_seed}:{round_}:{step}".encode()).hexdigest()[:8], 16)


def _agent(text: str) -> Conversation:
    return [{"role": "system", "content": render("stable_alignment/system_prior")}, {"role": "user", "content": text}]


def _observer(text: str) -> Conversation:
    return [{"role": "user", "content": text}]  # the original's observer calls carry no system prompt


def _clip(text: str) -> str:
    return text if len(text) <= QUOTE_CHARS else text[:QUOTE_CHARS].rstrip() + " ..."


def _hit_for_prompt(hit: MemoryHit | None) -> dict | None:
    return None if hit is None else {"question": _clip(hit.question), "answer": _clip(hit.answer)}


def _ratings(backend: ChatBackend, conversations: list[Conversation], prefix: str) -> list[Rating]:
    if not conversations:
        return []
    scores = backend.next_token_logprobs(conversations, RATING_CANDIDATES, assistant_prefix=prefix)
    return [Rating.from_logprobs(s) for s in scores]


def _texts(backend: ChatBackend, conversations: list[Conversation], params: GenerationParams) -> list[str]:
    if not conversations:
        return []
    return [c.text.strip() for c in backend.generate(conversations, params)]


def run_sandbox(
    llm: ChatBackend,
    observer: ChatBackend,
    questions: Sequence[str],
    settings: SandboxSettings = SandboxSettings(),
    embed: Embedder | None = None,
    *,
    seed_pairs: Sequence[Sequence[tuple[str, str]]] | None = None,
    seed_questions: Sequence[str] | None = None,
    progress: ProgressCallback | None = None,
    on_round_done: RoundCallback | None = None,
) -> SandboxResult:
    """Run one world: `settings.rounds` rounds of one back-scatter interaction per agent.

    `llm` plays every agent (drafts, peer ratings and reasons, revisions); `observer` rates drafts and revisions.
    Both must return next-token log-probabilities (`LogprobsUnavailable` is raised otherwise: no rating is ever
    parsed from text). `embed` maps texts to vectors for memory retrieval (default: `minilm_embedder()`).

    Memories start with `seed_pairs` (one list of (question, answer) pairs per agent) when given. Otherwise each
    agent answers `settings.seed_pairs_per_agent` seed questions itself, in one batched call before round 1: the
    `seed_questions`, or by default the questions after the pool (`questions[question_pool:]`); with none, memories
    start empty. Seed answers only fill memories: they are not rated and never become training data.

    `on_round_done(round, interactions)` gets each round as it ends (to save it); `progress(done, total)` counts
    steps (seeding, then five per round).
    """
    settings.validate()
    questions = [q.strip() for q in questions if q and q.strip()]
    pool = questions[: settings.question_pool] if settings.question_pool else questions
    if not pool:
        raise ValueError("no questions to ask")
    n = settings.n_agents
    if seed_pairs is not None:
        if len(seed_pairs) != n:
            raise ValueError(f"seed_pairs needs one list per agent ({n}), got {len(seed_pairs)}")
        assigned = [[(q.strip(), a.strip()) for q, a in pairs] for pairs in seed_pairs]
        seed_jobs: list[tuple[int, str]] = []
    else:
        assigned = [[] for _ in range(n)]
        if seed_questions is None:  # by default the questions after the pool
            seed_questions = questions[len(pool):] if settings.question_pool else []
        seed_jobs = _seed_jobs(settings, seed_questions)
    steps = _Steps(settings.rounds * 5 + (1 if seed_jobs else 0), progress)
    if seed_jobs:  # the agents' own answers, asked like a draft with nothing remembered
        answers = _texts(llm, [_agent(render("stable_alignment/draft", agent_id=i, question=q, memory=None))
                               for i, q in seed_jobs],
                         settings.params(settings.answer_tokens, _step_seed(settings.seed, -1, "seed")))
        for (i, q), answer in zip(seed_jobs, answers):
            assigned[i].append((q, answer))
        steps.done()
    memories: list[dict[str, str]] = [{} for _ in range(n)]
    for i, own in enumerate(assigned):
        for q, a in own:
            if a:
                memories[i].setdefault(q, a)  # the first answer per question stays

    interactions: list[Interaction] = []
    vectors = _Embeddings(embed or minilm_embedder())
    for r in range(settings.rounds):
        done = _play_round(llm, observer, r, pool, memories, vectors, settings, steps)
        for it in done:  # written after the round, in agent order; the first answer per question stays
            if it.revision:
                memories[it.agent].setdefault(it.question, it.revision)
        interactions.extend(done)
        if on_round_done is not None:
            on_round_done(r, done)

    return SandboxResult(settings=settings, interactions=interactions, seed_pairs=assigned, memories=memories,
                         seed_generated=bool(seed_jobs))


def _seed_jobs(settings: SandboxSettings, seed_questions: Sequence[str]) -> list[tuple[int, str]]:
    """(agent, question) pairs the agents answer themselves to fill their memories before round 1. Agent i takes
    seed questions i*m .. i*m+m-1 (wrapping around): different agents, different memories."""
    seeds = [q.strip() for q in seed_questions if q and q.strip()]
    m = settings.seed_pairs_per_agent if seeds else 0
    return [(i, q) for i in range(settings.n_agents)
            for q in dict.fromkeys(seeds[(i * m + j) % len(seeds)] for j in range(m))]


class _Steps:
    """Counts the sandbox's steps (seeding, then five per round) for a progress callback."""

    def __init__(self, total: int, progress: ProgressCallback | None) -> None:
        self.total, self.count, self.progress = total, 0, progress
        if progress is not None:
            progress(0, total)

    def done(self) -> None:
        self.count += 1
        if self.progress is not None:
            self.progress(self.count, self.total)


def _play_round(llm: ChatBackend, observer: ChatBackend, r: int, pool: Sequence[str],
                memories: Sequence[dict[str, str]], vectors: _Embeddings, settings: SandboxSettings,
                steps: _Steps) -> list[Interaction]:
    """One round: every agent drafts, its peers rate and explain, it revises, the observer rates draft and
    revision. Every read sees the memories as the round began."""
    n = settings.n_agents
    asked = [question_for(i, r, n, pool) for i in range(n)]
    snapshot = [dict(m) for m in memories]
    vectors.ensure(asked + [q for m in snapshot for q in m])
    hits = [vectors.nearest(snapshot[i], asked[i], settings.memory_threshold) for i in range(n)]
    pairs = [(i, p) for i in range(n) for p in draw_peers(i, r, settings)]
    peer_hits = [vectors.nearest(snapshot[p], asked[i], settings.memory_threshold) if settings.peer_memory else None
                 for i, p in pairs]

    # 1. drafts
    drafts = _texts(llm, [_agent(render("stable_alignment/draft", agent_id=i, question=asked[i],
                                        memory=_hit_for_prompt(hits[i]))) for i in range(n)],
                    settings.params(settings.answer_tokens, _step_seed(settings.seed, r, "draft")))
    steps.done()

    # 2. peer ratings (agents) and the observer on the drafts
    peer_ratings = _ratings(llm, [
        _agent(render("stable_alignment/peer_rating", peer_id=p, agent_id=i, question=asked[i],
                      answer=_clip(drafts[i]), memory=_hit_for_prompt(hit)))
        for (i, p), hit in zip(pairs, peer_hits)], settings.rating_prefix)
    before, engagement_before = _observe(observer, asked, drafts, settings)
    steps.done()

    # 3. peer reasons, each written after (and told) its own rating
    reasons = _texts(llm, [
        _agent(render("stable_alignment/peer_reason", peer_id=p, agent_id=i, question=asked[i],
                      answer=_clip(drafts[i]), memory=_hit_for_prompt(hit), rating=rating.as_int()))
        for (i, p), hit, rating in zip(pairs, peer_hits, peer_ratings)],
        settings.params(settings.reason_tokens, _step_seed(settings.seed, r, "reason")))
    steps.done()

    # 4. revisions from the average rating and the reasons, lowest rating last
    feedback: list[list[PeerFeedback]] = [[] for _ in range(n)]
    for (i, p), hit, rating, reason in zip(pairs, peer_hits, peer_ratings, reasons):
        feedback[i].append(PeerFeedback(p, rating, reason, hit))
    means = [_mean([f.rating.value for f in fs if f.rating.value is not None]) for fs in feedback]
    revisions = _texts(llm, [
        _agent(render("stable_alignment/revision", agent_id=i, question=asked[i], answer=_clip(drafts[i]),
                      average=means[i],
                      reasons=[_clip(f.reason) for f in feedback_order(feedback[i]) if f.reason]))
        for i in range(n)], settings.params(settings.answer_tokens, _step_seed(settings.seed, r, "revision")))
    steps.done()

    # 5. the observer on the revisions
    after, engagement_after = _observe(observer, asked, revisions, settings)
    steps.done()

    return [
        Interaction(round=r, agent=i, question=asked[i], draft=drafts[i], memory_hit=hits[i],
                    peers=tuple(feedback[i]), mean_peer_rating=means[i], revision=revisions[i],
                    observer_before=before[i], observer_after=after[i],
                    engagement_before=engagement_before[i] if engagement_before else None,
                    engagement_after=engagement_after[i] if engagement_after else None)
        for i in range(n)
    ]


def _observe(observer: ChatBackend, asked: list[str], answers: list[str],
             settings: SandboxSettings) -> tuple[list[Rating], list[Rating]]:
    """The observer's alignment ratings (and engagement ratings when on) of one step, in one call."""
    convs = [_observer(render("stable_alignment/observer", question=q, answer=_clip(a)))
             for q, a in zip(asked, answers)]
    if settings.engagement:
        convs += [_observer(render("stable_alignment/observer_engagement", question=q, answer=_clip(a)))
                  for q, a in zip(asked, answers)]
    ratings = _ratings(observer, convs, settings.rating_prefix)
    return ratings[: len(asked)], ratings[len(asked):]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _quote(text: str) -> str:
    return "\n".join("> " + line for line in (text.strip() or "(empty)").splitlines())


def _distribution(rating: Rating) -> str:
    if rating.distribution is None:
        return "no distribution"
    return " ".join(f"{k}:{v:.2f}" for k, v in rating.distribution.items())


def _engagement(rating: Rating | None) -> str:
    return "" if rating is None else f", engagement {rating.label()}"


__all__ = [
    "PAPER", "RATING_CANDIDATES", "Embedder", "Interaction", "MemoryHit", "PeerFeedback", "Rating", "SandboxResult",
    "SandboxSettings", "draw_peers", "feedback_order", "grid_position", "minilm_embedder", "question_for",
    "run_sandbox", "sample_seed_pairs", "social_circle",
]
