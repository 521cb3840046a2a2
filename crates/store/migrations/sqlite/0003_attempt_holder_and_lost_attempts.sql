-- taskexec store, SQLite schema: who ran each attempt, and how many
-- attempts of a task were lost with their node. Independent of every other
-- migration (columns added to `tasks` only), so it applies in any order.
--
--   * attempt_node:  the node that claimed the current attempt (set by a
--                    claim, kept by a take-over: `node` is then the node
--                    recovering the task, not the one that ran it). NULL on
--                    rows claimed before this migration: `node` stands in.
--   * lost_attempts: attempts of this task taken over after their lease
--                    expired (their node died or was cut off), each counted
--                    once however many nodes take it over.
--   * lost_through:  the last attempt counted in lost_attempts.

ALTER TABLE tasks ADD COLUMN attempt_node TEXT;
ALTER TABLE tasks ADD COLUMN lost_attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN lost_through INTEGER NOT NULL DEFAULT 0;
