-- matrix-assets store schema: the one source of truth, applied by matrix_assets.store.db.Store.
-- Portable DDL for SQLite (embedded default) and PostgreSQL (production). Keys are deterministic text
-- ids (hashes) rather than auto-increment columns so that re-running a stage upserts instead of
-- duplicating, and so that the same file works on both databases. Each table's PRIMARY KEY is also the
-- conflict key of the store's upserts (read from the database, never written twice).
-- Timestamps are ISO-8601 UTC strings. Columns ending in _json hold JSON (lists, objects).

-- Bumped whenever a table changes shape: a store written by another version is refused with a clear message.
CREATE TABLE IF NOT EXISTS schema_version (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    version  INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS prompt_sets (
    name            TEXT PRIMARY KEY,
    source          TEXT NOT NULL,          -- file path or bundled set name
    file_sha256     TEXT NOT NULL,
    role            TEXT NOT NULL,          -- harmful | safe | helpfulness
    n_prompts       INTEGER NOT NULL,
    n_train         INTEGER NOT NULL,
    n_eval          INTEGER NOT NULL,
    n_near_duplicates INTEGER NOT NULL DEFAULT 0,  -- eval prompts moved out: too close to a training prompt
    train_fraction  DOUBLE PRECISION NOT NULL,
    loaded_at       TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS prompts (
    prompt_id       TEXT PRIMARY KEY,       -- sha256(prompt_set, text)[:24]
    prompt_set      TEXT NOT NULL REFERENCES prompt_sets(name),
    position        INTEGER NOT NULL,       -- deterministic processing order within the set
    text            TEXT NOT NULL,
    category        TEXT,
    split           TEXT NOT NULL CHECK (split IN ('train', 'eval', 'excluded'))  -- excluded: near-duplicate
);
CREATE INDEX IF NOT EXISTS ix_prompts_set_split ON prompts (prompt_set, split, position);

-- The generation cache: every model call, keyed by hash(model identity, decoding parameters, messages);
-- next-token verdict distributions are cached here too (params_json names the candidates).
CREATE TABLE IF NOT EXISTS generations (
    cache_key          TEXT PRIMARY KEY,
    model_id           TEXT NOT NULL,
    params_json        TEXT NOT NULL,
    messages_json      TEXT NOT NULL,
    completion         TEXT NOT NULL,
    prompt_tokens      INTEGER NOT NULL,
    completion_tokens  INTEGER NOT NULL,
    seconds            DOUBLE PRECISION NOT NULL,  -- share of the batch's wall time
    created_at         TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS initial_responses (
    prompt_id   TEXT NOT NULL REFERENCES prompts(prompt_id),
    model_id    TEXT NOT NULL,
    response    TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    PRIMARY KEY (prompt_id, model_id)
);

-- MATRIX scenes. A transcript row is written in the same transaction as all of its events: a row here means
-- the scene is complete; a crash mid-scene leaves neither.
CREATE TABLE IF NOT EXISTS transcripts (
    prompt_id       TEXT NOT NULL REFERENCES prompts(prompt_id),
    model_id        TEXT NOT NULL,
    target          TEXT NOT NULL,          -- what the protagonist wants to achieve
    plan_json       TEXT NOT NULL,          -- list of plan steps
    roles_json      TEXT NOT NULL,          -- list of {name, description, status, memory: [observations]}
    objects_json    TEXT NOT NULL,          -- list of {name, state} at the end of the scene
    protagonist_memory_json TEXT NOT NULL,  -- what the protagonist noticed, in order
    memory          TEXT NOT NULL,          -- the modulator's summary at the end
    n_rounds        INTEGER NOT NULL,
    stopped         INTEGER NOT NULL,
    stopped_by      TEXT NOT NULL,
    outcome         TEXT NOT NULL,
    consequence     TEXT NOT NULL,
    fallbacks_json  TEXT NOT NULL,          -- {fallback name: count}
    created_at      TEXT NOT NULL,
    PRIMARY KEY (prompt_id, model_id)
);

CREATE TABLE IF NOT EXISTS transcript_events (
    prompt_id    TEXT NOT NULL,
    model_id     TEXT NOT NULL,
    seq          INTEGER NOT NULL,
    round        INTEGER NOT NULL,
    actor        TEXT NOT NULL,
    kind         TEXT NOT NULL,             -- action | modulation | reaction | objects | memory
    action       TEXT NOT NULL,
    observation  TEXT NOT NULL,             -- what the modulator routed, or ''
    audience_json TEXT NOT NULL,            -- the roles that noticed it, in the modulator's order
    feasible     INTEGER,                   -- 1/0 for protagonist actions judged by the modulator
    p_yes        DOUBLE PRECISION,          -- the verdict's probability, when read from the next-token distribution
    PRIMARY KEY (prompt_id, model_id, seq)
);

-- Critiques of the methods that critique (matrix: from the scene; cai: against fixed principles).
CREATE TABLE IF NOT EXISTS critiques (
    prompt_id       TEXT NOT NULL REFERENCES prompts(prompt_id),
    method          TEXT NOT NULL,
    model_id        TEXT NOT NULL,
    text            TEXT NOT NULL,
    harmed_parties_json TEXT NOT NULL,      -- names of the harmed roles (matrix), [] otherwise
    used_fallback   INTEGER NOT NULL,
    created_at      TEXT NOT NULL,
    PRIMARY KEY (prompt_id, method, model_id)
);

-- Every revision candidate, with the model's own verdict on it when it chose among several.
CREATE TABLE IF NOT EXISTS revision_candidates (
    prompt_id   TEXT NOT NULL REFERENCES prompts(prompt_id),
    method      TEXT NOT NULL,
    model_id    TEXT NOT NULL,
    candidate_index INTEGER NOT NULL,
    text        TEXT NOT NULL,
    p_harm      DOUBLE PRECISION,           -- P(yes) to "would this answer hurt anyone in the scene?"
    selected    INTEGER NOT NULL,
    created_at  TEXT NOT NULL,
    PRIMARY KEY (prompt_id, method, model_id, candidate_index)
);

-- Stable Alignment's society: one row per back-scatter interaction, one per rating.
CREATE TABLE IF NOT EXISTS sa_interactions (
    prompt_set        TEXT NOT NULL,
    model_id          TEXT NOT NULL,
    round             INTEGER NOT NULL,
    agent             INTEGER NOT NULL,
    prompt_id         TEXT NOT NULL,
    question          TEXT NOT NULL,
    draft             TEXT NOT NULL,
    memory_question   TEXT,                 -- the similar past question shown with the draft prompt, if any
    memory_answer     TEXT,
    peers_json        TEXT NOT NULL,        -- the interactees, in the order they were drawn
    mean_peer_rating  DOUBLE PRECISION,
    revision          TEXT NOT NULL,
    observer_before   DOUBLE PRECISION,     -- observer's rating of the draft (1-7), NULL when missing
    observer_after    DOUBLE PRECISION,     -- of the revision
    created_at        TEXT NOT NULL,
    PRIMARY KEY (prompt_set, model_id, round, agent)
);

CREATE TABLE IF NOT EXISTS sa_ratings (
    prompt_set      TEXT NOT NULL,
    model_id        TEXT NOT NULL,
    round           INTEGER NOT NULL,
    agent           INTEGER NOT NULL,       -- the center agent of the interaction
    rater           TEXT NOT NULL,          -- "peer:<id>", "observer:before" or "observer:after"
    rating          DOUBLE PRECISION,       -- expected value of the next-token distribution over 1..7, NULL when missing
    distribution_json TEXT NOT NULL,        -- {"1": p, ..., "7": p}, {} when missing
    reason          TEXT NOT NULL,          -- the peer's generated reason ('' for the observer)
    PRIMARY KEY (prompt_set, model_id, round, agent, rater)
);

-- What every method trains on: one group per (prompt, kind), one or more rated responses each. A group with
-- an `excluded` reason is left out of training and counted.
CREATE TABLE IF NOT EXISTS training_groups (
    method      TEXT NOT NULL,
    model_id    TEXT NOT NULL,
    group_id    TEXT NOT NULL,
    prompt_set  TEXT NOT NULL,
    prompt_id   TEXT NOT NULL,
    kind        TEXT NOT NULL,
    prompt      TEXT NOT NULL,
    excluded    TEXT,
    created_at  TEXT NOT NULL,
    PRIMARY KEY (method, model_id, group_id)
);

CREATE TABLE IF NOT EXISTS training_responses (
    method      TEXT NOT NULL,
    model_id    TEXT NOT NULL,
    group_id    TEXT NOT NULL,
    position    INTEGER NOT NULL,
    text        TEXT NOT NULL,
    rating      DOUBLE PRECISION,
    PRIMARY KEY (method, model_id, group_id, position)
);

CREATE TABLE IF NOT EXISTS sft_datasets (
    dataset_id   TEXT PRIMARY KEY,
    method       TEXT NOT NULL,
    trainer      TEXT NOT NULL,             -- sft | stable_alignment
    prompt_sets_json TEXT NOT NULL,
    path         TEXT NOT NULL,             -- JSONL copy of the examples
    n_examples   INTEGER NOT NULL,          -- responses trained on
    n_groups     INTEGER NOT NULL,
    n_aligned    INTEGER NOT NULL,          -- groups from the method
    n_benign     INTEGER NOT NULL,          -- benign self-answers mixed in
    n_excluded   INTEGER NOT NULL,          -- prompts the method left out
    created_at   TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS sft_examples (
    dataset_id  TEXT NOT NULL,
    position    INTEGER NOT NULL,
    group_index INTEGER NOT NULL,           -- responses of one group are trained together
    prompt_id   TEXT NOT NULL,
    source      TEXT NOT NULL,              -- the group's kind, or benign_self_answer
    prompt      TEXT NOT NULL,
    response    TEXT NOT NULL,
    rating      DOUBLE PRECISION,
    PRIMARY KEY (dataset_id, position)
);

CREATE TABLE IF NOT EXISTS checkpoints (
    checkpoint_id      TEXT PRIMARY KEY,
    base_model         TEXT NOT NULL,
    dataset_id         TEXT NOT NULL,
    method             TEXT NOT NULL,
    adapter_path       TEXT NOT NULL,
    n_examples         INTEGER NOT NULL,
    train_loss         DOUBLE PRECISION,
    mlflow_run_id      TEXT,
    registered_model   TEXT,
    model_version      TEXT,
    dagster_run_id     TEXT,
    created_at         TEXT NOT NULL,       -- first trained
    built_at           TEXT NOT NULL        -- last produced by finetuned_checkpoint (trained or reused)
);

-- One evaluation: which prompts, judged by what.
CREATE TABLE IF NOT EXISTS eval_runs (
    eval_id          TEXT PRIMARY KEY,
    prompt_sets_json TEXT NOT NULL,         -- {eval set: [prompt sets]}
    counts_json      TEXT NOT NULL,         -- {eval set: prompts}
    prompts_sha256   TEXT NOT NULL,         -- hash of the sorted prompt ids: same hash, same prompts
    judge            TEXT NOT NULL,
    judge_validation_id TEXT,               -- the judge's agreement with human labels this evaluation cites
    mlflow_run_id    TEXT,
    created_at       TEXT NOT NULL,
    -- headline: a profile's default prompt sets and sizes (the table a run reports); exploratory: any other
    kind             TEXT NOT NULL DEFAULT 'exploratory' CHECK (kind IN ('headline', 'exploratory'))
);

-- One row per (evaluation, model, prompt): the answer and everything judged about it.
CREATE TABLE IF NOT EXISTS eval_answers (
    eval_id          TEXT NOT NULL,
    model_label      TEXT NOT NULL,         -- base, or the method of the tuned checkpoint
    checkpoint_id    TEXT,
    eval_set         TEXT NOT NULL,         -- harmful | safe | helpfulness
    prompt_set       TEXT NOT NULL,
    prompt_id        TEXT NOT NULL,
    answer           TEXT NOT NULL,
    refusal          INTEGER,               -- the default judge's verdict (1 refusal, 0 compliance), NULL: missing
    p_refusal        DOUBLE PRECISION,
    keyword_refusal  INTEGER NOT NULL,      -- the published string matcher, beside it
    model_judge_refusal INTEGER,            -- the model judge, when it ran (NULL: missing or not run)
    PRIMARY KEY (eval_id, model_label, prompt_id)
);

-- Labels a person (or, said so in `method`, a model) gave to evaluation answers, read blind (question and answer
-- only), with XSTest's scheme: refusal = full or partial refusal; harmful_content = usable help for a harmful request.
CREATE TABLE IF NOT EXISTS answer_labels (
    label_set        TEXT NOT NULL,         -- one labelled file: its digest
    eval_id          TEXT NOT NULL,
    model_label      TEXT NOT NULL,
    prompt_id        TEXT NOT NULL,
    eval_set         TEXT NOT NULL,         -- harmful | safe | helpfulness
    refusal          INTEGER,               -- 1 full or partial refusal, 0 full compliance, NULL not labelled
    harmful_content  INTEGER,               -- 1 usable help for a harmful request, 0 none, NULL not labelled
    labeller         TEXT NOT NULL,         -- who read them
    method           TEXT NOT NULL,         -- how: e.g. "two independent reads, consensus"; never "human" unless so
    created_at       TEXT NOT NULL,
    PRIMARY KEY (label_set, eval_id, model_label, prompt_id)
);

-- Helpfulness pairwise judging, both answer orders kept.
CREATE TABLE IF NOT EXISTS eval_pairwise (
    eval_id        TEXT NOT NULL,
    model_label    TEXT NOT NULL,           -- the tuned model compared with base
    prompt_id      TEXT NOT NULL,
    p_tuned_first  DOUBLE PRECISION,        -- P(judge prefers the tuned answer) when shown first; NULL: missing
    p_tuned_second DOUBLE PRECISION,        -- ... when shown second
    outcome        TEXT NOT NULL,           -- win | tie | loss | missing
    PRIMARY KEY (eval_id, model_label, prompt_id)
);

-- Rates with exact intervals, per (evaluation, model, metric). `k` of `n` prompts.
CREATE TABLE IF NOT EXISTS eval_metrics (
    eval_id        TEXT NOT NULL,
    checkpoint_id  TEXT,
    model_label    TEXT NOT NULL,
    metric         TEXT NOT NULL,
    value          DOUBLE PRECISION,
    ci_low         DOUBLE PRECISION,
    ci_high        DOUBLE PRECISION,
    k              INTEGER,
    n              INTEGER NOT NULL,
    created_at     TEXT NOT NULL,
    PRIMARY KEY (eval_id, model_label, metric)
);

-- Base vs a tuned model on the same prompts, as pairs: the difference with a paired bootstrap interval and an
-- exact McNemar test on the discordant pairs.
CREATE TABLE IF NOT EXISTS eval_paired (
    eval_id        TEXT NOT NULL,
    model_label    TEXT NOT NULL,
    metric         TEXT NOT NULL,
    n              INTEGER NOT NULL,
    base_rate      DOUBLE PRECISION,
    tuned_rate     DOUBLE PRECISION,
    diff           DOUBLE PRECISION,
    diff_ci_low    DOUBLE PRECISION,
    diff_ci_high   DOUBLE PRECISION,
    base_only      INTEGER NOT NULL,        -- pairs where only base has the property
    tuned_only     INTEGER NOT NULL,
    mcnemar_p      DOUBLE PRECISION,
    PRIMARY KEY (eval_id, model_label, metric)
);

-- Each judge's agreement with human labels (XSTest v2 completions), per held-out chat model and metric.
CREATE TABLE IF NOT EXISTS judge_agreement (
    validation_id  TEXT NOT NULL,
    judge          TEXT NOT NULL,           -- embedding | keyword | model:<id>
    subset         TEXT NOT NULL,           -- the chat model whose completions were judged (held out from fitting)
    metric         TEXT NOT NULL,           -- accuracy | kappa | refusal_precision | ...
    value          DOUBLE PRECISION,
    ci_low         DOUBLE PRECISION,
    ci_high        DOUBLE PRECISION,
    n              INTEGER NOT NULL,
    created_at     TEXT NOT NULL,
    PRIMARY KEY (validation_id, judge, subset, metric)
);
