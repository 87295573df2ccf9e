"""PostgreSQL: the message writer's batch as one function call, `cc_store_batch`.

Through the async driver every statement of the batch transaction was a round trip that
waited for a turn of the node's event loop (BEGIN, the lock-and-find SELECT, the writing
statement, COMMIT: four); this function is the same transaction in one statement, called
outside any transaction block, so a batch is one round trip and commits when it returns
(storage/pg_batch.py calls it, docs/design.md has the measurements). Other databases:
nothing to do.

Inside, in order, as in the generic path (storage/inbox.py):
1. lock the `inbox_state` rows of every recipient and acker, in user-id order (the lock
   order of every writer, so two nodes never deadlock);
2. find retried cmids, one primary-key probe each; forget those past their window;
3. one statement whose data-modifying CTEs take the block of message ids from the
   `counters` row (locked after the inbox rows, as everywhere), insert the messages, the
   inbox rows (the next seqs of each recipient, in batch order) and the cmids, and move
   each user's last and acked seq (acks never past the last seq from before the batch),
   returning one row per delivery (and one per send without deliveries) and one per
   retried cmid.

Its statements run with generic plans (`plan_cache_mode`), made once per connection, and
reach every row through a primary key whatever the tables' statistics: the lookups are
`LATERAL (… LIMIT 1)` probes (a plain LATERAL subquery is pulled up into a join, which a
generic plan made on a small table ran as a full scan), and the UPDATE repeats its join
condition as `user_id = ANY(…)`.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04 20:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STORE_BATCH = r"""
CREATE OR REPLACE FUNCTION cc_store_batch(
    p_ts BIGINT, p_window BIGINT,
    m_sender BIGINT[], m_to BIGINT[], m_group BIGINT[], m_lo BIGINT[], m_hi BIGINT[], m_text TEXT[],
    m_cmid TEXT[], r_send BIGINT[], r_user BIGINT[], a_user BIGINT[], a_seq BIGINT[])
RETURNS TABLE (o_send BIGINT, o_id BIGINT, o_ts BIGINT, o_duplicate BOOLEAN, o_user BIGINT, o_seq BIGINT)
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
AS $fn$
DECLARE
    known_send BIGINT[];
    known_id BIGINT[];
    known_ts BIGINT[];
    expired_sender BIGINT[];
    expired_cmid TEXT[];
BEGIN
    PERFORM 1 FROM inbox_state AS st
    WHERE st.user_id = ANY(r_user || a_user)
    ORDER BY st.user_id
    FOR UPDATE;

    SELECT coalesce(array_agg(k.j) FILTER (WHERE c.ts > p_ts - p_window), '{}'),
           coalesce(array_agg(c.message_id) FILTER (WHERE c.ts > p_ts - p_window), '{}'),
           coalesce(array_agg(c.ts) FILTER (WHERE c.ts > p_ts - p_window), '{}'),
           coalesce(array_agg(k.sender_id) FILTER (WHERE c.ts <= p_ts - p_window), '{}'),
           coalesce(array_agg(k.cmid) FILTER (WHERE c.ts <= p_ts - p_window), '{}')
    INTO known_send, known_id, known_ts, expired_sender, expired_cmid
    FROM unnest(m_sender, m_cmid) WITH ORDINALITY AS k(sender_id, cmid, j)
    CROSS JOIN LATERAL (
        SELECT mc.message_id, mc.ts FROM message_cmids AS mc
        WHERE mc.sender_id = k.sender_id AND mc.cmid = k.cmid
        LIMIT 1
    ) AS c
    WHERE k.cmid IS NOT NULL;

    FOR e IN 1 .. cardinality(expired_sender) LOOP
        DELETE FROM message_cmids AS mc WHERE mc.sender_id = expired_sender[e] AND mc.cmid = expired_cmid[e];
    END LOOP;

    RETURN QUERY
    WITH s AS (
        SELECT t.*, row_number() OVER (ORDER BY t.j) AS k
        FROM unnest(m_sender, m_to, m_group, m_lo, m_hi, m_text, m_cmid) WITH ORDINALITY
             AS t(sender_id, to_user_id, group_id, peer_lo, peer_hi, body, cmid, j)
        WHERE t.j <> ALL(known_send)
    ), c AS (
        UPDATE counters SET value = value + (SELECT count(*) FROM s)
        WHERE name = 'message_id' AND EXISTS (SELECT 1 FROM s)
        RETURNING value - (SELECT count(*) FROM s) AS base
    ), d AS (
        SELECT s.j, s.k, r.user_id,
               st.last_seq + row_number() OVER (PARTITION BY r.user_id ORDER BY s.k, r.n) AS seq
        FROM unnest(r_send, r_user) WITH ORDINALITY AS r(j, user_id, n)
        JOIN s ON s.j = r.j
        CROSS JOIN LATERAL (SELECT i.last_seq FROM inbox_state AS i WHERE i.user_id = r.user_id LIMIT 1) AS st
    ), m AS (
        INSERT INTO messages (id, sender_id, to_user_id, group_id, peer_lo, peer_hi, text, ts)
        SELECT c.base + s.k, s.sender_id, s.to_user_id, s.group_id, s.peer_lo, s.peer_hi, s.body, p_ts
        FROM c CROSS JOIN s
    ), ib AS (
        INSERT INTO inbox (user_id, seq, message_id)
        SELECT d.user_id, d.seq, c.base + d.k FROM c CROSS JOIN d
    ), x AS (
        INSERT INTO message_cmids (sender_id, cmid, message_id, ts)
        SELECT s.sender_id, s.cmid, c.base + s.k, p_ts FROM c CROSS JOIN s WHERE s.cmid IS NOT NULL
    ), last AS (
        SELECT d.user_id, max(d.seq) AS seq FROM d GROUP BY d.user_id
    ), acked AS (
        -- never past the last seq handed out before this batch (the snapshot's)
        SELECT a.user_id, max(LEAST(a.seq, st.last_seq)) AS seq
        FROM unnest(a_user, a_seq) AS a(user_id, seq)
        CROSS JOIN LATERAL (SELECT i.last_seq FROM inbox_state AS i WHERE i.user_id = a.user_id LIMIT 1) AS st
        GROUP BY a.user_id
    ), w AS (
        UPDATE inbox_state
        SET last_seq = GREATEST(inbox_state.last_seq, coalesce(v.last_seq, 0)),
            acked_seq = GREATEST(inbox_state.acked_seq, coalesce(v.acked_seq, 0))
        FROM (SELECT coalesce(last.user_id, acked.user_id) AS user_id, last.seq AS last_seq,
                     acked.seq AS acked_seq
              FROM last FULL JOIN acked ON acked.user_id = last.user_id) AS v
        WHERE inbox_state.user_id = v.user_id AND inbox_state.user_id = ANY(r_user || a_user)
    )
    SELECT s.j, c.base + s.k, p_ts, false, d.user_id, d.seq
    FROM c CROSS JOIN s LEFT JOIN d ON d.j = s.j
    UNION ALL
    SELECT known_send[n], known_id[n], known_ts[n], true, NULL::BIGINT, NULL::BIGINT
    FROM generate_subscripts(known_send, 1) AS n;
END
$fn$
"""

SIGNATURE = "cc_store_batch(BIGINT, BIGINT, BIGINT[], BIGINT[], BIGINT[], BIGINT[], BIGINT[], TEXT[], TEXT[], " \
            "BIGINT[], BIGINT[], BIGINT[], BIGINT[])"


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(STORE_BATCH)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP FUNCTION IF EXISTS {SIGNATURE}")
