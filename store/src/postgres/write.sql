-- One batch write, one statement, one round trip: insert the new ticks (a redelivered tick conflicts
-- and is skipped), move `latest` forward, and announce the new ticks on the live channel, atomically
-- (NOTIFY is delivered on commit, so a failed write announces nothing).
-- $1..$6: the batch as arrays (asset, event time ns, flipped seq, price text, size text or NULL,
-- source); $7: the live channel.
WITH input AS (
    SELECT asset, event_time_ns, seq, price::numeric AS price, size::numeric AS size, source
    FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[], $5::text[], $6::text[])
        AS t(asset, event_time_ns, seq, price, size, source)
),
new AS (
    INSERT INTO ticks (asset, event_time_ns, seq, price, size, source)
    SELECT * FROM input
    ON CONFLICT DO NOTHING
    RETURNING asset, event_time_ns, seq, price, size, source,
        -- the tick's member text, as the Redis store spells it (store/src/member.rs)
        lpad(event_time_ns::text, 19, '0') || lpad((seq::numeric + 9223372036854775808)::text, 20, '0')
            || '|' || price::text || '|' || coalesce(size::text, '') || '|' || source AS member
),
-- Per asset with new ticks: latest moves to the newest of them if that is newer, and the version
-- goes up by one (an asset with nothing new is not touched).
moved AS (
    INSERT INTO latest AS l (asset, event_time_ns, seq, price, size, source, version)
    SELECT DISTINCT ON (asset) asset, event_time_ns, seq, price, size, source, 1 FROM new
    ORDER BY asset, event_time_ns DESC, seq DESC
    ON CONFLICT (asset) DO UPDATE SET
        event_time_ns = CASE WHEN (l.event_time_ns, l.seq) < (excluded.event_time_ns, excluded.seq)
            THEN excluded.event_time_ns ELSE l.event_time_ns END,
        seq = CASE WHEN (l.event_time_ns, l.seq) < (excluded.event_time_ns, excluded.seq)
            THEN excluded.seq ELSE l.seq END,
        price = CASE WHEN (l.event_time_ns, l.seq) < (excluded.event_time_ns, excluded.seq)
            THEN excluded.price ELSE l.price END,
        size = CASE WHEN (l.event_time_ns, l.seq) < (excluded.event_time_ns, excluded.seq)
            THEN excluded.size ELSE l.size END,
        source = CASE WHEN (l.event_time_ns, l.seq) < (excluded.event_time_ns, excluded.seq)
            THEN excluded.source ELSE l.source END,
        version = l.version + 1
    RETURNING asset, version
),
-- NOTIFY payloads are limited to 8000 bytes: members go out in chunks of at most ~7000 bytes of JSON;
-- a member whose JSON alone is over 3500 bytes (a huge `source`) is counted as skipped instead, and
-- the listener reports a gap for it.
sized AS (
    SELECT asset, member, octet_length(to_json(member)::text) > 3500 AS oversized,
        sum(octet_length(to_json(member)::text) + 1)
            OVER (PARTITION BY asset ORDER BY member COLLATE "C" ROWS UNBOUNDED PRECEDING) / 3500 AS chunk
    FROM new
),
notes AS (
    SELECT pg_notify($7, json_build_object(
        'a', sized.asset,
        'v', moved.version,
        'm', coalesce(json_agg(member ORDER BY member COLLATE "C") FILTER (WHERE NOT oversized), '[]'),
        'skipped', count(*) FILTER (WHERE oversized)
    )::text)
    FROM sized JOIN moved USING (asset) GROUP BY sized.asset, moved.version, chunk
)
SELECT (SELECT count(*) FROM new) AS inserted, (SELECT count(*) FROM notes) AS announced
