-- tickfleet PostgreSQL store, migration 1: ticks partitioned by day, latest per asset, partition upkeep.
-- Applied by the binaries (PostgresStore) inside the pipeline's schema, never by hand.

-- One row per tick. `seq` is the tick's u64 sequence number with its top bit flipped, so that bigint
-- order is u64 order. `identity` is the md5 of the payload's exact text (price|size|source, as the
-- Redis store's members spell it): two ticks are the same tick when asset, time, seq and identity are
-- equal, so `1.0` and `1.00` stay two ticks, as in Redis, and the unique index stays small whatever
-- the size of `source`.
CREATE TABLE ticks (
    asset text NOT NULL,
    event_time_ns bigint NOT NULL,
    seq bigint NOT NULL,
    price numeric NOT NULL,
    size numeric,
    source text NOT NULL,
    identity uuid GENERATED ALWAYS AS (
        md5(price::text || '|' || coalesce(size::text, '') || '|' || source)::uuid
    ) STORED,
    UNIQUE (asset, event_time_ns, seq, identity)
) PARTITION BY RANGE (event_time_ns);

-- The tick with the greatest (event time, seq) per asset, which only ever moves forward, and the
-- asset's write version: one more for every write that stored a new tick of it (late ones too), so a
-- candle page read at version V holds every live batch announced with a version <= V.
CREATE TABLE latest (
    asset text PRIMARY KEY,
    event_time_ns bigint NOT NULL,
    seq bigint NOT NULL,
    price numeric NOT NULL,
    size numeric,
    source text NOT NULL,
    version bigint NOT NULL
);

-- The day partitions of `ticks` ([lo, hi) in ns), kept by ensure_partitions and drop_partitions_before.
CREATE TABLE tick_partitions (
    name text PRIMARY KEY,
    lo bigint NOT NULL,
    hi bigint NOT NULL
);

-- Creates the partitions [lo, hi) that do not exist yet. Writers of one schema serialize on an advisory
-- lock here, so two creating the same day do not collide.
CREATE FUNCTION ensure_partitions(los bigint[], his bigint[]) RETURNS integer
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    i integer;
    made integer := 0;
    part text;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext(current_schema()), 1);
    FOR i IN 1 .. coalesce(array_length(los, 1), 0) LOOP
        part := 'ticks_' || to_char(to_timestamp(los[i] / 1000000000) AT TIME ZONE 'UTC', 'YYYYMMDD');
        IF NOT EXISTS (SELECT 1 FROM tick_partitions WHERE name = part) THEN
            EXECUTE format('CREATE TABLE %I PARTITION OF ticks FOR VALUES FROM (%s) TO (%s)', part, los[i], his[i]);
            INSERT INTO tick_partitions VALUES (part, los[i], his[i]);
            made := made + 1;
        END IF;
    END LOOP;
    RETURN made;
END $$;

-- Drops every partition that ends at or before `cutoff_ns` (retention: whole partitions, never rows).
CREATE FUNCTION drop_partitions_before(cutoff_ns bigint) RETURNS integer
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    part text;
    dropped integer := 0;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext(current_schema()), 1);
    FOR part IN SELECT name FROM tick_partitions WHERE hi <= cutoff_ns ORDER BY lo LOOP
        EXECUTE format('DROP TABLE %I', part);
        DELETE FROM tick_partitions WHERE name = part;
        dropped := dropped + 1;
    END LOOP;
    RETURN dropped;
END $$;
