-- One page of an asset's candles of one base, computed from its ticks in SQL with exact numeric
-- arithmetic: buckets of $2 ns starting in [$3, $4), at most $5; with the asset's write version, in
-- the same statement (one snapshot: the page holds exactly what that version announced). Always one
-- row at least: an empty page is one row with the version and NULL candle columns.
-- (Ticks are never before 1970, so event_time_ns - mod(event_time_ns, width) is the bucket start.)
WITH page AS (
SELECT start,
    (array_agg(event_time_ns ORDER BY event_time_ns, seq))[1] AS open_t,
    (array_agg(seq ORDER BY event_time_ns, seq))[1] AS open_seq,
    (array_agg(price::text ORDER BY event_time_ns, seq))[1] AS open_price,
    (array_agg(event_time_ns ORDER BY event_time_ns DESC, seq DESC))[1] AS close_t,
    (array_agg(seq ORDER BY event_time_ns DESC, seq DESC))[1] AS close_seq,
    (array_agg(price::text ORDER BY event_time_ns DESC, seq DESC))[1] AS close_price,
    -- of equal prices (1.5 and 1.50), the one of greater scale, as the Redis rollups keep it
    (array_agg(price::text ORDER BY price DESC, scale(price) DESC))[1] AS high,
    (array_agg(price::text ORDER BY price, scale(price) DESC))[1] AS low,
    coalesce(sum(size), 0)::text AS volume,
    coalesce(sum(price * size), 0)::text AS turnover,
    sum(price)::text AS price_sum,
    max(scale(price)) AS price_scale,
    count(*) AS count
FROM (
    SELECT event_time_ns - mod(event_time_ns, $2) AS start, event_time_ns, seq, price, size
    FROM ticks
    WHERE asset = $1 AND event_time_ns >= $3 AND event_time_ns < $4 + $2
) t
WHERE start >= $3 AND start < $4
GROUP BY start
ORDER BY start
LIMIT $5
)
SELECT coalesce((SELECT version FROM latest WHERE asset = $1), 0) AS version, page.*
FROM (VALUES (1)) AS one (x) LEFT JOIN page ON true
ORDER BY page.start
