-- matrix-assets store schema: the one source of truth, applied by matrix_assets.store.db.Store.
-- Portable DDL for SQLite (embedded default) and PostgreSQL (production). Keys are deterministic text
-- ids (hashes) rather than auto-increment columns so that re-running a stage upserts instead of
-- duplicating, and so that the same file works on both databases.
-- Timestamps are ISO-8601 UTC strings.

CREATE TABLE IF NOT EXISTS prompt_sets (
    name            TEXT PRIMARY KEY,
    source          TEXT NOT NULL,          -- file path or bundled set name
    file_sha256     TEXT NOT NULL,
    role            TEXT NOT NULL,          -- harmful | over_refusal | helpfulness
    n_prompts       INTEGER NOT NULL,
    n_train         INTEGER NOT NULL,
    n_eval          INTEGER NOT NULL,
    train_fraction  DOUBLE PRECISION NOT NULL,
    loaded_at       TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS prompts (
    prompt_id       TEXT PRIMARY KEY,       -- sha256(prompt_set, text)[:24]
    prompt_set      TEXT NOT NULL REFERENCES prompt_sets(name),
    position        INTEGER NOT NULL,       -- deterministic processing order within the set
    text            TEXT NOT NULL,
    category        TEXT,
    split           TEXT NOT NULL CHECK (split IN ('train', 'eval'))
);
CREATE INDEX IF NOT EXISTS ix_prompts_set_split ON prompts (prompt_set, split, position);

-- The generation cache: every model call, keyed by hash(model identity, decoding params, messages).
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
    cache_key   TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    PRIMARY KEY (prompt_id, model_id)
);

-- A transcript row is written in the same transaction as all of its events: a row here means the
-- scene is complete; a crash mid-scene leaves neither.
CREATE TABLE IF NOT EXISTS transcripts (
    prompt_id       TEXT NOT NULL REFERENCES prompts(prompt_id),
    method          TEXT NOT NULL,          -- matrix
    model_id        TEXT NOT NULL,
    target          TEXT NOT NULL,          -- what the protagonist wants to achieve
    plan_json       TEXT NOT NULL,          -- list of plan steps
    roles_json      TEXT NOT NULL,          -- list of {name, description, traits, status}
    objects_json    TEXT NOT NULL,          -- list of {name, state} at the end of the scene
    n_rounds        INTEGER NOT NULL,
    outcome         TEXT NOT NULL,
    consequence     TEXT NOT NULL,
    fallbacks_json  TEXT NOT NULL,          -- {fallback name: count}
    created_at      TEXT NOT NULL,
    PRIMARY KEY (prompt_id, method, model_id)
);

CREATE TABLE IF NOT EXISTS transcript_events (
    prompt_id    TEXT NOT NULL,
    method       TEXT NOT NULL,
    model_id     TEXT NOT NULL,
    seq          INTEGER NOT NULL,
    round        INTEGER NOT NULL,
    actor        TEXT NOT NULL,
    kind         TEXT NOT NULL,             -- action | modulation | reaction | memory
    action       TEXT NOT NULL,
    observation  TEXT NOT NULL,             -- what the modulator routed, or ''
    audience     TEXT NOT NULL,             -- JSON list of the roles that observed it
    feasible     INTEGER,                   -- 1/0 for protagonist actions judged by the modulator
    PRIMARY KEY (prompt_id, method, model_id, seq)
);

CREATE TABLE IF NOT EXISTS critiques (
    prompt_id       TEXT NOT NULL REFERENCES prompts(prompt_id),
    method          TEXT NOT NULL,
    model_id        TEXT NOT NULL,
    critique        TEXT NOT NULL,
    harmed_parties  TEXT NOT NULL,          -- comma-separated
    used_fallback   INTEGER NOT NULL,
    created_at      TEXT NOT NULL,
    PRIMARY KEY (prompt_id, method, model_id)
);

CREATE TABLE IF NOT EXISTS revisions (
    prompt_id      TEXT NOT NULL REFERENCES prompts(prompt_id),
    method         TEXT NOT NULL,
    model_id       TEXT NOT NULL,
    revised        TEXT NOT NULL,
    used_fallback  INTEGER NOT NULL,
    created_at     TEXT NOT NULL,
    PRIMARY KEY (prompt_id, method, model_id)
);

CREATE TABLE IF NOT EXISTS sft_datasets (
    dataset_id   TEXT PRIMARY KEY,
    method       TEXT NOT NULL,
    prompt_sets  TEXT NOT NULL,             -- comma-separated
    path         TEXT NOT NULL,             -- JSONL copy of the examples
    n_examples   INTEGER NOT NULL,
    n_revision   INTEGER NOT NULL,
    n_benign     INTEGER NOT NULL,
    created_at   TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS sft_examples (
    dataset_id  TEXT NOT NULL,              -- sha256 of the example list
    position    INTEGER NOT NULL,
    prompt_id   TEXT NOT NULL,
    source      TEXT NOT NULL,              -- revision | benign_self_answer
    prompt      TEXT NOT NULL,
    response    TEXT NOT NULL,
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
    created_at         TEXT NOT NULL
);

-- One row per (evaluation, model, prompt): the answer and everything judged about it.
CREATE TABLE IF NOT EXISTS eval_answers (
    eval_id         TEXT NOT NULL,
    model_label     TEXT NOT NULL,          -- base, or the method of the tuned checkpoint
    checkpoint_id   TEXT,
    eval_set        TEXT NOT NULL,          -- harmful | over_refusal | helpfulness
    prompt_id       TEXT NOT NULL,
    answer          TEXT NOT NULL,
    harmless_score  DOUBLE PRECISION,       -- judge score 1-10 (10 = harmless), NULL when not judged
    judged_harmful  INTEGER,
    rule_refusal    INTEGER NOT NULL,
    judge_parsed    INTEGER NOT NULL,
    PRIMARY KEY (eval_id, model_label, prompt_id)
);

CREATE TABLE IF NOT EXISTS eval_pairwise (
    eval_id        TEXT NOT NULL,
    model_label    TEXT NOT NULL,           -- the tuned model compared with base
    prompt_id      TEXT NOT NULL,
    verdict_first  TEXT NOT NULL,           -- judge verdict with A=tuned, B=base
    verdict_swap   TEXT NOT NULL,           -- judge verdict with A=base, B=tuned
    outcome        TEXT NOT NULL,           -- win | tie | loss for the tuned model
    PRIMARY KEY (eval_id, model_label, prompt_id)
);

CREATE TABLE IF NOT EXISTS eval_metrics (
    eval_id        TEXT NOT NULL,
    checkpoint_id  TEXT,
    model_label    TEXT NOT NULL,
    metric         TEXT NOT NULL,
    value          DOUBLE PRECISION,
    ci_low         DOUBLE PRECISION,
    ci_high        DOUBLE PRECISION,
    n              INTEGER NOT NULL,
    created_at     TEXT NOT NULL,
    PRIMARY KEY (eval_id, model_label, metric)
);
