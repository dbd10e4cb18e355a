-- makima_keys 0.4.0: rate limits, and the index the worker finds keys that
-- end by time with. makima_keys--0.3.0--0.4.0.sql runs the same block, so a
-- fresh install and an updated database end up with the same schema.
--
-- As in bootstrap.sql, the extension's schema is looked up by oid and quoted
-- with %I, and the search path holds only pg_catalog while this runs.

DO $schema_0_4_0$
DECLARE
    saved_search_path text := pg_catalog.current_setting('search_path');
    ext_schema text;
    api_keys_oid oid;
    -- Name and type of each new column, in order.
    new_columns text[] := ARRAY[
        'rate_limit', 'integer',
        'rate_period', 'interval'];
    found_type text;
    found_not_null boolean;
BEGIN
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);

    SELECT n.nspname INTO ext_schema
      FROM pg_catalog.pg_extension e
      JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
     WHERE e.extname = 'makima_keys';
    SELECT c.oid INTO api_keys_oid
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE n.nspname = ext_schema AND c.relname = 'api_keys';

    FOR i IN 1 .. pg_catalog.array_length(new_columns, 1) BY 2 LOOP
        found_type := NULL;
        SELECT pg_catalog.format_type(a.atttypid, a.atttypmod), a.attnotnull
          INTO found_type, found_not_null
          FROM pg_catalog.pg_attribute a
         WHERE a.attrelid = api_keys_oid AND a.attname = new_columns[i]
           AND a.attnum > 0 AND NOT a.attisdropped;
        IF found_type IS NULL THEN
            EXECUTE pg_catalog.format('ALTER TABLE %I.api_keys ADD COLUMN %I %s',
                                      ext_schema, new_columns[i], new_columns[i + 1]);
        ELSIF found_type <> new_columns[i + 1] OR found_not_null THEN
            -- A column of that name that the application added itself: its
            -- meaning is not ours to guess.
            RAISE EXCEPTION '%.api_keys already has a column % that is not a nullable %',
                    pg_catalog.quote_ident(ext_schema), new_columns[i], new_columns[i + 1]
                USING ERRCODE = 'invalid_table_definition',
                      DETAIL = pg_catalog.format('Found: %s%s', found_type,
                                                 CASE WHEN found_not_null THEN ' NOT NULL' ELSE '' END),
                      HINT = 'Rename that column, then run the command again.';
        ELSIF found_type IS NOT NULL THEN
            -- A nullable column of the right type that already holds values
            -- is the application's own: limiting every verification by it
            -- would change what its keys do.
            EXECUTE pg_catalog.format('SELECT EXISTS (SELECT FROM %I.api_keys WHERE %I IS NOT NULL)',
                                      ext_schema, new_columns[i])
               INTO found_not_null;
            IF found_not_null THEN
                RAISE EXCEPTION '%.api_keys already has a column % that holds values',
                        pg_catalog.quote_ident(ext_schema), new_columns[i]
                    USING ERRCODE = 'invalid_table_definition',
                          HINT = 'Rename that column, then run the command again.';
            END IF;
        END IF;
    END LOOP;

    EXECUTE pg_catalog.format($ddl$
        COMMENT ON COLUMN %1$I.api_keys.rate_limit IS 'NULL: no rate limit. Otherwise calls (of cost 1) per rate_period, for all of the user''s keys together';
        COMMENT ON COLUMN %1$I.api_keys.rate_period IS 'The period of rate_limit (months count as 30 days)';

        -- The flush worker announces keys that end by time: those whose
        -- earlier end (expiry, or a grace period's end) fell since its last
        -- round. Keys that never end are not in this index.
        CREATE INDEX IF NOT EXISTS idx_api_keys_ends_at
            ON %1$I.api_keys ((LEAST(expires_at, revoked_at)))
         WHERE expires_at IS NOT NULL OR revoked_at IS NOT NULL;

        CREATE OR REPLACE VIEW %1$I.mk_keys AS
        SELECT k.id, k.user_id, k.key_prefix, k.name, k.created_at, k.last_used_at,
               k.expires_at, k.revoked_at, k.scopes, k.metadata,
               CASE WHEN k.revoked_at <= pg_catalog.clock_timestamp() THEN 'revoked'
                    WHEN k.expires_at <= pg_catalog.clock_timestamp() THEN 'expired'
                    ELSE 'valid'
               END AS status,
               k.credits, k.refill_amount, k.refill_every, k.refilled_at,
               k.rate_limit, k.rate_period
          FROM %1$I.api_keys k
        $ddl$, ext_schema);

    PERFORM pg_catalog.set_config('search_path', saved_search_path, true);
END
$schema_0_4_0$;
