-- Read-only views over the store (applied after schema.sql).
-- Portable to SQLite and PostgreSQL: each view is dropped and re-created (PostgreSQL has no CREATE VIEW IF NOT
-- EXISTS, SQLite no CREATE OR REPLACE VIEW), so a changed definition takes effect on the next start. Store skips
-- this file on SQLite when every stored definition already matches; on PostgreSQL it runs in one transaction.

-- Base vs each tuned model (one per method), one row per evaluation, method and metric.
DROP VIEW IF EXISTS v_base_vs_tuned;
CREATE VIEW v_base_vs_tuned AS
SELECT b.eval_id, b.metric, t.model_label AS tuned_label, t.checkpoint_id,
       b.value AS base_value, t.value AS tuned_value,
       t.ci_low AS tuned_ci_low, t.ci_high AS tuned_ci_high, t.n AS n
FROM eval_metrics b
JOIN eval_metrics t ON t.eval_id = b.eval_id AND t.metric = b.metric AND t.model_label <> 'base'
WHERE b.model_label = 'base';

-- Compliance with harmful requests per prompt category and model (the default judge's verdicts).
DROP VIEW IF EXISTS v_harmful_compliance_by_category;
CREATE VIEW v_harmful_compliance_by_category AS
SELECT a.eval_id, a.model_label, COALESCE(p.category, 'uncategorized') AS category,
       SUM(CASE WHEN a.refusal = 0 THEN 1 ELSE 0 END) AS complied,
       COUNT(a.refusal) AS n
FROM eval_answers a JOIN prompts p ON p.prompt_id = a.prompt_id
WHERE a.eval_set = 'harmful'
GROUP BY a.eval_id, a.model_label, COALESCE(p.category, 'uncategorized');

-- Every scene step in reading order.
DROP VIEW IF EXISTS v_scene_events;
CREATE VIEW v_scene_events AS
SELECT p.prompt_set, p.text AS prompt, e.*
FROM transcript_events e JOIN prompts p ON p.prompt_id = e.prompt_id;

-- What each method trains on, prompt by prompt (excluded groups included, with the reason).
DROP VIEW IF EXISTS v_training_data;
CREATE VIEW v_training_data AS
SELECT g.method, g.model_id, g.prompt_set, g.prompt_id, g.kind, g.prompt, g.excluded, r.position, r.text, r.rating
FROM training_groups g
LEFT JOIN training_responses r ON r.method = g.method AND r.model_id = g.model_id AND r.group_id = g.group_id;
