-- Run by CREATE EXTENSION only, which removes \echo lines; psql stops here.
\echo Use "CREATE EXTENSION makima_keys" to load this file. \quit

-- makima_keys install, part 1: the api_keys table.
--
-- The table is the makima migration's (shared/seed) column for column and
-- index for index. When that migration already ran, its table is adopted
-- with its rows instead of being created.
--
-- The extension's schema is looked up by oid and only ever quoted with %I:
-- the schema placeholder is never used (CVE-2023-39417), and nothing
-- here trusts an object it did not create without checking owner and shape
-- (CVE-2022-2625).

DO $bootstrap$
DECLARE
    saved_search_path text := pg_catalog.current_setting('search_path');
    ext_namespace oid;
    ext_schema text;
    schema_owner oid;
    api_keys_oid oid;
    users_oid oid;
    previous_owner oid;
    -- The seed's columns, in order: name, type, NOT NULL.
    expected_columns text[] := ARRAY[
        'id uuid t', 'user_id uuid t', 'key_hash character varying(64) t',
        'key_prefix character varying(16) t', 'name character varying(255) f',
        'last_used_at timestamp with time zone f', 'created_at timestamp with time zone t',
        'revoked_at timestamp with time zone f'];
    actual_columns text[];
    -- The seed's indexes, then ours: name and definition after "ON schema.api_keys".
    wanted_indexes text[] := ARRAY[
        'idx_api_keys_key_hash', 'USING btree (key_hash) WHERE (revoked_at IS NULL)',
        'idx_api_keys_user_id', 'USING btree (user_id)',
        'idx_api_keys_key_prefix', 'USING btree (key_prefix)',
        'idx_api_keys_one_active_per_user', 'USING btree (user_id) WHERE (revoked_at IS NULL)',
        -- Ours: one row per hash, and lookups of revoked keys for mk_verify_detail.
        'idx_api_keys_key_hash_unique', 'USING btree (key_hash)'];
    unique_indexes text[] := ARRAY['idx_api_keys_one_active_per_user', 'idx_api_keys_key_hash_unique'];
    index_name text;
    index_tail text;
    found_definition text;
    adoption_notice text;
    code_found text[];
    grantee_name name;
    privilege text;
    no_foreign_key_notice text;
    saved_min_messages text;
BEGIN
    -- Built-in operators and functions only, whatever the installer's path.
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);

    IF pg_catalog.getdatabaseencoding() <> 'UTF8' THEN
        RAISE EXCEPTION 'makima_keys needs a UTF8 database; this one is %', pg_catalog.getdatabaseencoding()
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'Keys are hashed as UTF-8 text. Create the database with ENCODING ''UTF8''.';
    END IF;

    SELECT e.extnamespace, n.nspname, n.nspowner
      INTO ext_namespace, ext_schema, schema_owner
      FROM pg_catalog.pg_extension e
      JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
     WHERE e.extname = 'makima_keys';

    SELECT c.oid, c.relowner INTO api_keys_oid, previous_owner
      FROM pg_catalog.pg_class c
     WHERE c.relnamespace = ext_namespace AND c.relname = 'api_keys';

    IF api_keys_oid IS NULL THEN
        EXECUTE pg_catalog.format($ddl$
            CREATE TABLE %1$I.api_keys (
                id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
                user_id UUID NOT NULL,
                -- SHA-256 hash of the key (never store plain key)
                key_hash VARCHAR(64) NOT NULL,
                -- First 8 chars of key for display/identification (e.g., "mk_abc123")
                key_prefix VARCHAR(16) NOT NULL,
                -- User-provided label for the key
                name VARCHAR(255),
                -- Tracking
                last_used_at TIMESTAMPTZ,
                created_at TIMESTAMPTZ NOT NULL DEFAULT NOW(),
                -- Null if active, timestamp if revoked
                revoked_at TIMESTAMPTZ
            )$ddl$, ext_schema);
        api_keys_oid := pg_catalog.format('%I.api_keys', ext_schema)::pg_catalog.regclass;

        EXECUTE pg_catalog.format($ddl$
            COMMENT ON TABLE %1$I.api_keys IS 'API keys for programmatic access. Max one active key per user.';
            COMMENT ON COLUMN %1$I.api_keys.key_hash IS 'SHA-256 hash of the full API key';
            COMMENT ON COLUMN %1$I.api_keys.key_prefix IS 'First 8 chars of key for identification (e.g., "mk_abc123")';
            COMMENT ON COLUMN %1$I.api_keys.revoked_at IS 'NULL if active, timestamp when revoked'
            $ddl$, ext_schema);
    ELSE
        -- Adoption: the makima migration ran before CREATE EXTENSION.
        IF (SELECT c.relkind FROM pg_catalog.pg_class c WHERE c.oid = api_keys_oid) <> 'r' THEN
            RAISE EXCEPTION '%.api_keys exists but is not a plain table', pg_catalog.quote_ident(ext_schema)
                USING ERRCODE = 'wrong_object_type',
                      HINT = 'makima_keys creates api_keys itself, or adopts the table of the makima migration.';
        END IF;

        -- Only a role the threat model trusts may hand us a table: a
        -- superuser, or a role with the rights of the schema's owner (the
        -- database owner only where it owns the schema, as through
        -- pg_database_owner for PostgreSQL 15's public). Any other role
        -- could have planted it, with code that would run with our rights.
        IF NOT ((SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.oid = previous_owner)
                OR pg_catalog.pg_has_role(previous_owner, schema_owner, 'MEMBER')) THEN
            RAISE EXCEPTION 'refusing to adopt %.api_keys: it is owned by role %, which is neither a superuser nor the schema''s owner',
                    pg_catalog.quote_ident(ext_schema), previous_owner::pg_catalog.regrole
                USING ERRCODE = 'insufficient_privilege',
                      HINT = 'Drop or rename that table, or have the schema owner create it, then run CREATE EXTENSION again.';
        END IF;

        SELECT pg_catalog.array_agg(a.attname || ' ' || pg_catalog.format_type(a.atttypid, a.atttypmod)
                                    || ' ' || CASE WHEN a.attnotnull THEN 't' ELSE 'f' END
                                    ORDER BY a.attnum)
          INTO actual_columns
          FROM pg_catalog.pg_attribute a
         WHERE a.attrelid = api_keys_oid AND a.attnum > 0 AND NOT a.attisdropped
           AND a.attname = ANY (ARRAY['id', 'user_id', 'key_hash', 'key_prefix', 'name',
                                      'last_used_at', 'created_at', 'revoked_at']);
        IF actual_columns IS DISTINCT FROM expected_columns
           OR EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                       WHERE a.attrelid = api_keys_oid AND a.attnum > 0 AND NOT a.attisdropped
                         AND a.attnotnull AND NOT a.atthasdef
                         AND a.attname <> ALL (ARRAY['user_id', 'key_hash', 'key_prefix']))
           OR (SELECT pg_catalog.pg_get_expr(d.adbin, d.adrelid)
                 FROM pg_catalog.pg_attrdef d JOIN pg_catalog.pg_attribute a
                   ON a.attrelid = d.adrelid AND a.attnum = d.adnum
                WHERE d.adrelid = api_keys_oid AND a.attname = 'id') IS DISTINCT FROM 'gen_random_uuid()'
           OR (SELECT pg_catalog.pg_get_expr(d.adbin, d.adrelid)
                 FROM pg_catalog.pg_attrdef d JOIN pg_catalog.pg_attribute a
                   ON a.attrelid = d.adrelid AND a.attnum = d.adnum
                WHERE d.adrelid = api_keys_oid AND a.attname = 'created_at') IS DISTINCT FROM 'now()'
           OR NOT EXISTS (SELECT 1 FROM pg_catalog.pg_index i
                           WHERE i.indrelid = api_keys_oid AND i.indisprimary
                             AND i.indkey::text = (SELECT a.attnum::text FROM pg_catalog.pg_attribute a
                                                    WHERE a.attrelid = api_keys_oid AND a.attname = 'id'))
        THEN
            RAISE EXCEPTION '%.api_keys does not have the shape of the makima migration', pg_catalog.quote_ident(ext_schema)
                USING ERRCODE = 'invalid_table_definition',
                      DETAIL = pg_catalog.format('Columns found: %s', actual_columns),
                      HINT = 'Compare the table with 20250110000003_create_api_keys_table.sql.';
        END IF;

        -- Nothing attached to the table may call a function: our functions
        -- write it with the extension owner's rights, and autovacuum's
        -- ANALYZE runs as its owner. Only the seed's two defaults, the
        -- seed's indexes and foreign key, and plain columns and indexes of
        -- built-in types with default collations and operator classes pass.
        SELECT pg_catalog.array_remove(ARRAY[
            CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t
                               WHERE t.tgrelid = api_keys_oid AND NOT t.tgisinternal) THEN 'triggers' END,
            CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_rewrite r WHERE r.ev_class = api_keys_oid) THEN 'rules' END,
            CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_inherits h
                               WHERE h.inhrelid = api_keys_oid OR h.inhparent = api_keys_oid) THEN 'inheritance' END,
            CASE WHEN c.relrowsecurity OR c.relforcerowsecurity
                      OR EXISTS (SELECT 1 FROM pg_catalog.pg_policy p WHERE p.polrelid = api_keys_oid)
                 THEN 'row security policies' END,
            CASE WHEN c.relam IS DISTINCT FROM (SELECT am.oid FROM pg_catalog.pg_am am WHERE am.amname = 'heap')
                 THEN 'a table access method other than heap' END,
            CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                               WHERE a.attrelid = api_keys_oid AND a.attnum > 0 AND NOT a.attisdropped
                                 AND a.atthasdef AND a.attname <> ALL (ARRAY['id', 'created_at']))
                 THEN 'column defaults other than the migration''s' END,
            CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                               WHERE a.attrelid = api_keys_oid AND a.attnum > 0 AND NOT a.attisdropped
                                 AND a.attgenerated <> '') THEN 'generated columns' END,
            CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                                JOIN pg_catalog.pg_type ty ON ty.oid = a.atttypid
                               WHERE a.attrelid = api_keys_oid AND a.attnum > 0 AND NOT a.attisdropped
                                 AND (ty.typtype = 'd' OR ty.typnamespace <> 'pg_catalog'::pg_catalog.regnamespace))
                 THEN 'columns of domains or of types outside pg_catalog' END,
            CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                                JOIN pg_catalog.pg_type ty ON ty.oid = a.atttypid
                               WHERE a.attrelid = api_keys_oid AND a.attnum > 0 AND NOT a.attisdropped
                                 AND a.attcollation <> ty.typcollation)
                 THEN 'columns with a non-default collation' END,
            CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_constraint k
                               WHERE k.conrelid = api_keys_oid
                                 AND k.contype NOT IN ('p', 'u', 'f', 'n'))
                 THEN 'CHECK, exclusion or trigger constraints' END,
            CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_constraint k
                               WHERE k.conrelid = api_keys_oid AND k.contype = 'f'
                                 AND NOT (k.conkey = ARRAY[(SELECT a.attnum FROM pg_catalog.pg_attribute a
                                                             WHERE a.attrelid = api_keys_oid AND a.attname = 'user_id')]
                                          AND k.confrelid = (SELECT u.oid FROM pg_catalog.pg_class u
                                                              WHERE u.relnamespace = ext_namespace AND u.relname = 'users')
                                          AND k.confkey = ARRAY[(SELECT a.attnum FROM pg_catalog.pg_attribute a
                                                                  WHERE a.attrelid = k.confrelid AND a.attname = 'id')]))
                 THEN 'foreign keys other than user_id to users(id)' END,
            CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_index x JOIN pg_catalog.pg_class ic ON ic.oid = x.indexrelid
                               WHERE x.indrelid = api_keys_oid
                                 AND (x.indexprs IS NOT NULL
                                      OR (x.indpred IS NOT NULL
                                          AND pg_catalog.pg_get_indexdef(x.indexrelid) IS DISTINCT FROM
                                              (SELECT pg_catalog.format('CREATE %sINDEX %I ON %I.api_keys %s',
                                                          CASE WHEN w.name = ANY (unique_indexes) THEN 'UNIQUE ' ELSE '' END,
                                                          w.name, ext_schema, w.tail)
                                                 FROM (SELECT wanted_indexes[n] AS name, wanted_indexes[n + 1] AS tail
                                                         FROM pg_catalog.generate_series(1, pg_catalog.array_length(wanted_indexes, 1), 2) n) w
                                                WHERE w.name = ic.relname))))
                 THEN 'expression or partial indexes other than the migration''s' END,
            CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_index x,
                                     LATERAL pg_catalog.unnest(x.indclass::pg_catalog.oid[]) AS oc(oid)
                                JOIN pg_catalog.pg_opclass o ON o.oid = oc.oid
                               WHERE x.indrelid = api_keys_oid
                                 AND (NOT o.opcdefault OR o.opcnamespace <> 'pg_catalog'::pg_catalog.regnamespace))
                   OR EXISTS (SELECT 1 FROM pg_catalog.pg_index x,
                                     LATERAL pg_catalog.unnest(x.indcollation::pg_catalog.oid[]) AS ic(oid)
                               WHERE x.indrelid = api_keys_oid
                                 AND ic.oid NOT IN (0, 'pg_catalog."default"'::pg_catalog.regcollation))
                 THEN 'indexes with non-default operator classes or collations' END,
            CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_statistic_ext st
                               WHERE st.stxrelid = api_keys_oid AND st.stxexprs IS NOT NULL)
                 THEN 'statistics on expressions' END
        ], NULL)
          INTO code_found
          FROM pg_catalog.pg_class c WHERE c.oid = api_keys_oid;
        IF pg_catalog.cardinality(code_found) > 0 THEN
            RAISE EXCEPTION 'refusing to adopt %.api_keys: code attached to it would run with the extension''s privileges',
                    pg_catalog.quote_ident(ext_schema)
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      DETAIL = pg_catalog.format('Found: %s.', pg_catalog.array_to_string(code_found, ', ')),
                      HINT = 'Remove it from the table first, then run CREATE EXTENSION again.';
        END IF;

        EXECUTE pg_catalog.format('ALTER EXTENSION makima_keys ADD TABLE %I.api_keys', ext_schema);
        -- Whoever owns the table can attach triggers to it, and our functions
        -- write to it as a superuser: the owner must be the extension's.
        EXECUTE pg_catalog.format('ALTER TABLE %I.api_keys OWNER TO %I', ext_schema, current_user);
        IF previous_owner <> (SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname = current_user) THEN
            EXECUTE pg_catalog.format('GRANT SELECT, INSERT, UPDATE, DELETE ON %I.api_keys TO %I',
                                      ext_schema, (SELECT r.rolname FROM pg_catalog.pg_roles r WHERE r.oid = previous_owner));
        END IF;
        adoption_notice := pg_catalog.format(
            'makima_keys adopted the existing table %s.api_keys with its rows; it now belongs to %I, and %s keeps SELECT, INSERT, UPDATE, DELETE on it',
            pg_catalog.quote_ident(ext_schema), current_user, previous_owner::pg_catalog.regrole);
    END IF;

    -- Indexes: create what is missing, insist that what exists means what we rely on.
    FOR i IN 1 .. pg_catalog.array_length(wanted_indexes, 1) BY 2 LOOP
        index_name := wanted_indexes[i];
        index_tail := wanted_indexes[i + 1];
        SELECT pg_catalog.pg_get_indexdef(x.indexrelid) INTO found_definition
          FROM pg_catalog.pg_index x JOIN pg_catalog.pg_class c ON c.oid = x.indexrelid
         WHERE x.indrelid = api_keys_oid AND c.relname = index_name;
        IF found_definition IS NULL THEN
            EXECUTE pg_catalog.format('CREATE %sINDEX %I ON %I.api_keys %s',
                CASE WHEN index_name = ANY (unique_indexes) THEN 'UNIQUE ' ELSE '' END,
                index_name, ext_schema, index_tail);
        ELSIF found_definition <> pg_catalog.format('CREATE %sINDEX %I ON %I.api_keys %s',
                CASE WHEN index_name = ANY (unique_indexes) THEN 'UNIQUE ' ELSE '' END,
                index_name, ext_schema, index_tail) THEN
            RAISE EXCEPTION 'index % on %.api_keys is not the one makima_keys expects', index_name,
                    pg_catalog.quote_ident(ext_schema)
                USING ERRCODE = 'invalid_table_definition',
                      DETAIL = pg_catalog.format('Found: %s', found_definition);
        END IF;
    END LOOP;

    -- user_id references users(id) when the application has a users table.
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint k
                    WHERE k.conrelid = api_keys_oid AND k.contype = 'f') THEN
        SELECT c.oid INTO users_oid
          FROM pg_catalog.pg_class c
          JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid
         WHERE c.relnamespace = ext_namespace AND c.relname = 'users' AND c.relkind IN ('r', 'p')
           AND a.attname = 'id' AND a.atttypid = 'pg_catalog.uuid'::pg_catalog.regtype AND NOT a.attisdropped;
        IF users_oid IS NULL THEN
            no_foreign_key_notice := pg_catalog.format(
                'makima_keys: there is no table %s.users with a uuid id column, so api_keys.user_id has no foreign key',
                pg_catalog.quote_ident(ext_schema));
        ELSE
            EXECUTE pg_catalog.format(
                'ALTER TABLE %1$I.api_keys ADD CONSTRAINT api_keys_user_id_fkey
                     FOREIGN KEY (user_id) REFERENCES %1$I.users(id) ON DELETE CASCADE', ext_schema);
        END IF;
    END IF;

    EXECUTE pg_catalog.format('REVOKE ALL ON TABLE %I.api_keys FROM PUBLIC', ext_schema);
    -- TRIGGER lets a role attach its own code to the table without owning
    -- it, and our functions write the table as the extension owner;
    -- TRUNCATE, REFERENCES and (from 17) MAINTAIN serve nobody here and let
    -- a role lock the table against every verification. Grants of them (the
    -- installer's default privileges, or the adopted table's old grants) go.
    FOR grantee_name, privilege IN
        SELECT DISTINCT r.rolname, a.privilege_type
          FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) a
          JOIN pg_catalog.pg_roles r ON r.oid = a.grantee
         WHERE c.oid = api_keys_oid AND a.grantee <> c.relowner
           AND a.privilege_type IN ('TRIGGER', 'TRUNCATE', 'REFERENCES', 'MAINTAIN')
    LOOP
        EXECUTE pg_catalog.format('REVOKE %s ON TABLE %I.api_keys FROM %I CASCADE',
                                  privilege, ext_schema, grantee_name);
    END LOOP;
    -- pg_dump then dumps the rows, and CREATE EXTENSION recreates the table.
    PERFORM pg_catalog.pg_extension_config_dump(api_keys_oid::pg_catalog.regclass, '');

    -- CREATE EXTENSION raises client_min_messages to WARNING while its script
    -- runs, which would swallow these notices. Show them if the session's own
    -- level (its reset value: server, role, database or connection setting)
    -- lets notices through.
    IF adoption_notice IS NOT NULL OR no_foreign_key_notice IS NOT NULL THEN
        saved_min_messages := pg_catalog.current_setting('client_min_messages');
        IF (SELECT s.reset_val FROM pg_catalog.pg_settings s WHERE s.name = 'client_min_messages')
               IN ('debug5', 'debug4', 'debug3', 'debug2', 'debug1', 'log', 'notice') THEN
            PERFORM pg_catalog.set_config('client_min_messages', 'notice', true);
        END IF;
        IF adoption_notice IS NOT NULL THEN
            RAISE NOTICE '%', adoption_notice;
        END IF;
        IF no_foreign_key_notice IS NOT NULL THEN
            RAISE NOTICE '%', no_foreign_key_notice
                USING HINT = 'Keys of deleted users are then not removed with them. README, section "Schema", shows how to add the foreign key later.';
        END IF;
        PERFORM pg_catalog.set_config('client_min_messages', saved_min_messages, true);
    END IF;

    PERFORM pg_catalog.set_config('search_path', saved_search_path, true);
END
$bootstrap$;
