//! In-server tests: one per row of the function table, every SQLSTATE included.
//! They run as a superuser in the extension's own database; privileges and
//! concurrency are tested through real client connections in tests/clients.

// pgrx places the test functions in the schema named after their module,
// and its harness calls them as tests.<name>().
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    /// Runs `sql` in a subtransaction and returns its SQLSTATE ("00000" on success),
    /// so one test can check several errors and keep going.
    fn sqlstate(sql: &str) -> String {
        Spi::run(
            "CREATE OR REPLACE FUNCTION pg_temp.sqlstate_of(stmt text) RETURNS text
             LANGUAGE plpgsql AS $$
             BEGIN EXECUTE stmt; RETURN '00000';
             EXCEPTION WHEN OTHERS THEN RETURN SQLSTATE; END $$",
        )
        .unwrap();
        Spi::get_one_with_args::<String>("SELECT pg_temp.sqlstate_of($1)", &[sql.into()])
            .unwrap()
            .unwrap()
    }

    /// The message of the error `sql` raises.
    fn error_message(sql: &str) -> String {
        Spi::run(
            "CREATE OR REPLACE FUNCTION pg_temp.message_of(stmt text) RETURNS text
             LANGUAGE plpgsql AS $$
             DECLARE m text; h text;
             BEGIN EXECUTE stmt; RETURN NULL;
             EXCEPTION WHEN OTHERS THEN
                 GET STACKED DIAGNOSTICS m = MESSAGE_TEXT, h = PG_EXCEPTION_HINT;
                 RETURN m || ' | ' || h; END $$",
        )
        .unwrap();
        Spi::get_one_with_args::<String>("SELECT pg_temp.message_of($1)", &[sql.into()])
            .unwrap()
            .unwrap()
    }

    /// Tests run concurrently, each in a transaction that is rolled back. One
    /// that changes api_keys (DROP INDEX, ALTER TABLE) takes its strongest lock
    /// first: upgrading a lock it already holds could deadlock with another test.
    fn lock_for_ddl() {
        Spi::run("LOCK TABLE public.api_keys IN ACCESS EXCLUSIVE MODE").unwrap();
    }

    fn new_user() -> pgrx::Uuid {
        Spi::get_one::<pgrx::Uuid>("SELECT gen_random_uuid()")
            .unwrap()
            .unwrap()
    }

    /// Issues a key; returns (key id, key).
    fn issue(user: pgrx::Uuid) -> (pgrx::Uuid, String) {
        let (id, key) = Spi::get_two_with_args::<pgrx::Uuid, String>(
            "SELECT id, key FROM mk_issue_key($1)",
            &[user.into()],
        )
        .unwrap();
        (id.unwrap(), key.unwrap())
    }

    fn verify(key: &str) -> Option<pgrx::Uuid> {
        Spi::get_one_with_args::<pgrx::Uuid>("SELECT mk_verify($1)", &[key.into()]).unwrap()
    }

    fn status(key: Option<&str>) -> String {
        Spi::get_one_with_args::<String>("SELECT status FROM mk_verify_detail($1)", &[key.into()])
            .unwrap()
            .unwrap()
    }

    #[pg_test]
    fn issue_returns_one_row_with_a_well_formed_key() {
        let user = new_user();
        let (id, key, prefix) = Spi::get_three_with_args::<pgrx::Uuid, String, String>(
            "SELECT id, key, key_prefix FROM mk_issue_key($1, 'ci')",
            &[user.into()],
        )
        .unwrap();
        let key = key.unwrap();
        assert_eq!(key.len(), 52);
        assert!(key.starts_with("mk_"));
        assert!(crate::key_format::is_well_formed(&key));
        assert_eq!(prefix.unwrap(), &key[..9]);
        // Stored: hash and prefix, never the key.
        let (hash, name) = Spi::get_two_with_args::<String, String>(
            "SELECT key_hash, name FROM api_keys WHERE id = $1",
            &[id.unwrap().into()],
        )
        .unwrap();
        assert_eq!(hash.unwrap(), crate::hashing::hash_key(&key));
        assert_eq!(name.as_deref(), Some("ci"));
        let leaked = Spi::get_one_with_args::<i64>(
            "SELECT count(*) FROM api_keys k WHERE k::text LIKE '%' || $1 || '%'",
            &[key[3..].into()],
        )
        .unwrap();
        assert_eq!(leaked, Some(0));
    }

    #[pg_test]
    fn issue_errors_have_their_sqlstates() {
        assert_eq!(sqlstate("SELECT mk_issue_key(NULL)"), "22004");
        let user = new_user();
        assert_eq!(
            sqlstate(&format!("SELECT mk_issue_key('{user}', repeat('x', 256))")),
            "22001"
        );
        // 255 characters, multibyte ones included, is allowed.
        assert_eq!(
            sqlstate(&format!("SELECT mk_issue_key('{user}', repeat('é', 255))")),
            "00000"
        );
        assert_eq!(sqlstate(&format!("SELECT mk_issue_key('{user}')")), "23505");
        let message = error_message(&format!("SELECT mk_issue_key('{user}')"));
        assert!(message.contains(&user.to_string()), "{message}");
        assert!(message.contains("mk_rotate_key"), "{message}");
        assert!(message.contains("mk_revoke"), "{message}");
    }

    #[pg_test]
    fn unknown_user_is_23503_when_users_table_exists() {
        // The test database has no users table at CREATE EXTENSION time, so
        // attach the foreign key the way the install script does.
        Spi::run(
            "CREATE TABLE users (id uuid PRIMARY KEY);
             ALTER TABLE api_keys ADD CONSTRAINT api_keys_user_id_fkey
                 FOREIGN KEY (user_id) REFERENCES users(id) ON DELETE CASCADE",
        )
        .unwrap();
        assert_eq!(sqlstate("SELECT mk_issue_key(gen_random_uuid())"), "23503");
        assert_eq!(sqlstate("SELECT mk_rotate_key(gen_random_uuid())"), "23503");
        let user = new_user();
        Spi::run_with_args("INSERT INTO users VALUES ($1)", &[user.into()]).unwrap();
        let (_, key) = issue(user);
        assert_eq!(verify(&key), Some(user));
        Spi::run_with_args("DELETE FROM users WHERE id = $1", &[user.into()]).unwrap();
        assert_eq!(verify(&key), None);
        assert_eq!(status(Some(&key)), "not_found");
    }

    #[pg_test]
    fn rotate_revokes_the_old_key_and_issues_a_new_one() {
        let user = new_user();
        // With no active key, rotate simply issues.
        let first =
            Spi::get_one_with_args::<String>("SELECT key FROM mk_rotate_key($1)", &[user.into()])
                .unwrap()
                .unwrap();
        assert_eq!(verify(&first), Some(user));
        let second = Spi::get_one_with_args::<String>(
            "SELECT key FROM mk_rotate_key($1, 'next')",
            &[user.into()],
        )
        .unwrap()
        .unwrap();
        assert_ne!(first, second);
        assert_eq!(verify(&first), None);
        assert_eq!(status(Some(&first)), "revoked");
        assert_eq!(verify(&second), Some(user));
        let active = Spi::get_one_with_args::<i64>(
            "SELECT count(*) FROM api_keys WHERE user_id = $1 AND revoked_at IS NULL",
            &[user.into()],
        )
        .unwrap();
        assert_eq!(active, Some(1));
        assert_eq!(sqlstate("SELECT mk_rotate_key(NULL)"), "22004");
        assert_eq!(
            sqlstate(&format!("SELECT mk_rotate_key('{user}', repeat('x', 300))")),
            "22001"
        );
    }

    #[pg_test]
    fn verify_returns_the_user_of_an_active_key_and_null_otherwise() {
        let user = new_user();
        let (id, key) = issue(user);
        assert_eq!(verify(&key), Some(user));
        let mut changed = key.clone().into_bytes();
        changed[10] = if changed[10] == b'a' { b'b' } else { b'a' };
        let changed = String::from_utf8(changed).unwrap();
        assert_eq!(verify(&changed), None);
        Spi::run_with_args("SELECT mk_revoke($1)", &[id.into()]).unwrap();
        assert_eq!(verify(&key), None);
    }

    #[pg_test]
    fn verify_never_raises_for_any_text() {
        let hostile = [
            "SELECT mk_verify(NULL)",
            "SELECT mk_verify('')",
            "SELECT mk_verify(repeat('a', 1024 * 1024))",
            "SELECT mk_verify(repeat('mk_', 400))",
            "SELECT mk_verify(E'mk_\\x01\\x02\\t\\n\\r')",
            "SELECT mk_verify('ключ-🔑-鍵')",
            "SELECT mk_verify('mk_' || repeat('A', 49))",
            "SELECT mk_verify(repeat('é', 26))",
            "SELECT mk_verify('''; DROP TABLE api_keys; --')",
        ];
        for sql in hostile {
            assert_eq!(sqlstate(sql), "00000", "{sql}");
            let detail = sql.replace("mk_verify(", "mk_verify_detail(");
            assert_eq!(sqlstate(&detail), "00000", "{detail}");
        }
        assert_eq!(verify(&"a".repeat(1024 * 1024)), None);
    }

    #[pg_test]
    fn verify_detail_reports_every_status() {
        assert_eq!(status(None), "malformed");
        assert_eq!(status(Some("")), "malformed");
        assert_eq!(status(Some(&"x".repeat(1025))), "malformed");
        // Our prefix and length with a bad checksum is malformed, not looked up.
        let user = new_user();
        let (id, key) = issue(user);
        let mut bad = key.clone().into_bytes();
        bad[51] = if bad[51] == b'0' { b'1' } else { b'0' };
        assert_eq!(
            status(Some(std::str::from_utf8(&bad).unwrap())),
            "malformed"
        );
        // Other formats are looked up by hash.
        assert_eq!(status(Some("not-a-makima-key")), "not_found");
        let well_formed_unknown = crate::key_format::generate(&mut rand::rngs::OsRng).unwrap();
        assert_eq!(status(Some(&well_formed_unknown)), "not_found");

        let (st, key_id, user_id, prefix, name) = Spi::connect(|c| {
            let row = c
                .select(
                    "SELECT status, key_id, user_id, key_prefix, name FROM mk_verify_detail($1)",
                    None,
                    &[key.as_str().into()],
                )
                .unwrap()
                .first();
            (
                row.get::<String>(1).unwrap(),
                row.get::<pgrx::Uuid>(2).unwrap(),
                row.get::<pgrx::Uuid>(3).unwrap(),
                row.get::<String>(4).unwrap(),
                row.get::<String>(5).unwrap(),
            )
        });
        assert_eq!(st.as_deref(), Some("valid"));
        assert_eq!(key_id, Some(id));
        assert_eq!(user_id, Some(user));
        assert_eq!(prefix.as_deref(), Some(&key[..9]));
        assert_eq!(name, None);

        Spi::run_with_args("SELECT mk_revoke($1)", &[id.into()]).unwrap();
        assert_eq!(status(Some(&key)), "revoked");
        let (key_id, user_id) = Spi::get_two_with_args::<pgrx::Uuid, pgrx::Uuid>(
            "SELECT key_id, user_id FROM mk_verify_detail($1)",
            &[key.as_str().into()],
        )
        .unwrap();
        assert_eq!((key_id, user_id), (Some(id), Some(user)));
        let nulls = Spi::get_one_with_args::<bool>(
            "SELECT key_id IS NULL AND user_id IS NULL AND key_prefix IS NULL AND name IS NULL
               FROM mk_verify_detail($1)",
            &["nope".into()],
        )
        .unwrap();
        assert_eq!(nulls, Some(true));
        let rows = Spi::get_one::<i64>("SELECT count(*) FROM mk_verify_detail(NULL)").unwrap();
        assert_eq!(rows, Some(1));
    }

    #[pg_test]
    fn revoke_reports_what_it_did() {
        let user = new_user();
        let (id, _) = issue(user);
        let first = Spi::get_one_with_args::<bool>("SELECT mk_revoke($1)", &[id.into()]).unwrap();
        let second = Spi::get_one_with_args::<bool>("SELECT mk_revoke($1)", &[id.into()]).unwrap();
        assert_eq!((first, second), (Some(true), Some(false)));
        assert_eq!(sqlstate("SELECT mk_revoke(gen_random_uuid())"), "P0002");
        assert_eq!(sqlstate("SELECT mk_revoke(NULL)"), "22004");
        // After a revoke the user may be issued a new key.
        issue(user);
    }

    #[pg_test]
    fn revoke_user_keys_counts_what_this_call_revoked() {
        let user = new_user();
        issue(user);
        let count = |u: pgrx::Uuid| {
            Spi::get_one_with_args::<i32>("SELECT mk_revoke_user_keys($1)", &[u.into()])
                .unwrap()
                .unwrap()
        };
        assert_eq!(count(user), 1);
        assert_eq!(count(user), 0);
        assert_eq!(count(new_user()), 0);
        assert_eq!(sqlstate("SELECT mk_revoke_user_keys(NULL)"), "22004");
    }

    #[pg_test]
    fn hash_key_matches_pgcrypto_free_sql() {
        let same = Spi::get_one::<bool>(
            "SELECT bool_and(mk_hash_key(k) = encode(sha256(convert_to(k, 'UTF8')), 'hex'))
               FROM (VALUES ('mk_abc'), (''), ('ключ 🔑'), (repeat('z', 5000))) v(k)",
        )
        .unwrap();
        assert_eq!(same, Some(true));
        assert_eq!(
            Spi::get_one::<String>("SELECT mk_hash_key(NULL)").unwrap(),
            None
        );
        let volatility = Spi::get_one::<String>(
            "SELECT provolatile::text || proisstrict::text || proparallel::text
               FROM pg_proc WHERE proname = 'mk_hash_key'",
        )
        .unwrap();
        assert_eq!(volatility.as_deref(), Some("itrues"));
    }

    #[pg_test]
    fn key_is_well_formed_checks_format_and_checksum_only() {
        let user = new_user();
        let (_, key) = issue(user);
        let check = |k: &str| {
            Spi::get_one_with_args::<bool>("SELECT mk_key_is_well_formed($1)", &[k.into()])
                .unwrap()
                .unwrap()
        };
        assert!(check(&key));
        assert!(check(
            "mk_abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQ4FLuWK"
        ));
        assert!(!check(
            "mk_abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQ4FLuWL"
        ));
        assert!(!check("mk_abc123"));
        assert!(!check(""));
        let immutable = Spi::get_one::<String>(
            "SELECT provolatile::text FROM pg_proc WHERE proname = 'mk_key_is_well_formed'",
        )
        .unwrap();
        assert_eq!(immutable.as_deref(), Some("i"));
    }

    /// pgrx runs every test inside a transaction block, where a verification
    /// must not take the row lock of a write (tests/clients/test_last_used.py
    /// covers the writes of verifications that are their own transaction).
    #[pg_test]
    fn a_verification_inside_a_transaction_block_writes_nothing() {
        let user = new_user();
        let (id, key) = issue(user);
        Spi::run("SET LOCAL makima_keys.last_used_interval = 0").unwrap();
        assert_eq!(verify(&key), Some(user));
        assert_eq!(status(Some(&key)), "valid");
        assert!(check(
            "SELECT last_used_at IS NULL AND xmax = 0 FROM api_keys WHERE id = $1",
            &[id.into()]
        ));
        assert_eq!(
            sqlstate("SET LOCAL makima_keys.last_used_interval = -1"),
            "22023"
        );
        // The prefix is reserved: a misspelt setting is an error, not a placeholder.
        assert_eq!(
            sqlstate("SET LOCAL makima_keys.last_used_intervall = 10"),
            "42602"
        );
    }

    #[pg_test]
    fn definer_functions_pin_search_path() {
        let unpinned = Spi::get_one::<i64>(
            "SELECT count(*) FROM pg_proc p JOIN pg_depend d
                 ON d.objid = p.oid AND d.classid = 'pg_proc'::regclass AND d.deptype = 'e'
               JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'makima_keys'
              WHERE p.prosecdef
                AND NOT coalesce(p.proconfig @> ARRAY['search_path=pg_catalog, pg_temp'], false)",
        )
        .unwrap();
        assert_eq!(unpinned, Some(0));
        let definers = Spi::get_one::<i64>(
            "SELECT count(*) FROM pg_proc WHERE prosecdef AND proname LIKE 'mk\\_%'",
        )
        .unwrap();
        // issue, rotate, the three revocations and mk_verify_detail.
        assert_eq!(definers, Some(6));
        // mk_verify is an invoker that switches rights only for the
        // statements it runs (store::with_owner_rights).
        let verify_invokers = Spi::get_one::<i64>(
            "SELECT count(*) FROM pg_proc
              WHERE proname = 'mk_verify' AND NOT prosecdef AND proconfig IS NULL",
        )
        .unwrap();
        assert_eq!(verify_invokers, Some(1));
    }

    #[pg_test]
    fn verify_runs_its_statements_as_the_owner_with_a_pinned_search_path() {
        lock_for_ddl();
        let user = new_user();
        let (_, key) = issue(user);
        Spi::run(
            "CREATE ROLE mk_test_verifier;
             GRANT EXECUTE ON FUNCTION mk_verify(text, text[], integer) TO mk_test_verifier;
             GRANT USAGE, CREATE ON SCHEMA public TO mk_test_verifier",
        )
        .unwrap();
        // The role can read nothing; its search path puts a look-alike first.
        Spi::run(
            "SET ROLE mk_test_verifier;
             CREATE TABLE pg_temp.api_keys (id uuid, user_id uuid, key_hash text, key_prefix text,
                                            name text, last_used_at timestamptz,
                                            created_at timestamptz, revoked_at timestamptz);
             SET search_path = pg_temp, public",
        )
        .unwrap();
        assert_eq!(sqlstate("SELECT count(*) FROM public.api_keys"), "42501");
        assert_eq!(verify(&key), Some(user));
        assert_eq!(scoped(&key, "'{}'"), Some(user));
        assert!(check("SELECT current_user = 'mk_test_verifier'", &[]));
        assert!(check(
            "SELECT current_setting('search_path') = 'pg_temp, public'",
            &[]
        ));
        Spi::run("RESET ROLE").unwrap();
        // The last_used_at write, which needs a verification that is its own
        // transaction, is checked the same way in tests/clients/test_last_used.py.
        // The SQL fallback runs its statement as the owner.
        Spi::run("DROP INDEX public.idx_api_keys_key_hash_unique").unwrap();
        Spi::run("SET ROLE mk_test_verifier").unwrap();
        assert_eq!(verify(&key), Some(user));
        assert!(check("SELECT current_user = 'mk_test_verifier'", &[]));
        Spi::run("RESET ROLE").unwrap();
    }

    #[pg_test]
    fn verification_falls_back_to_sql_without_the_hash_index() {
        lock_for_ddl();
        let user = new_user();
        let (id, key) = issue(user);
        // Without our unique index the direct probe is impossible; the answers
        // must not change.
        Spi::run("DROP INDEX idx_api_keys_key_hash_unique").unwrap();
        assert_eq!(verify(&key), Some(user));
        assert_eq!(status(Some(&key)), "valid");
        assert_eq!(status(Some("mk_unknown")), "not_found");
        Spi::run_with_args("SELECT mk_revoke($1)", &[id.into()]).unwrap();
        assert_eq!(verify(&key), None);
        assert_eq!(status(Some(&key)), "revoked");
    }

    // ---- 0.2.0: expiry, grace, scopes, metadata, revocation by plaintext, listing

    /// Runs a query that returns one boolean.
    fn check(sql: &str, args: &[pgrx::datum::DatumWithOid]) -> bool {
        Spi::get_one_with_args::<bool>(sql, args)
            .unwrap()
            .unwrap_or(false)
    }

    fn issue_with(user: pgrx::Uuid, options: &str) -> (pgrx::Uuid, String) {
        let (id, key) = Spi::get_two_with_args::<pgrx::Uuid, String>(
            &format!("SELECT id, key FROM mk_issue_key($1, {options})"),
            &[user.into()],
        )
        .unwrap();
        (id.unwrap(), key.unwrap())
    }

    fn scoped(key: &str, required: &str) -> Option<pgrx::Uuid> {
        Spi::get_one_with_args::<pgrx::Uuid>(
            &format!("SELECT mk_verify($1, {required})"),
            &[key.into()],
        )
        .unwrap()
    }

    fn scoped_status(key: &str, required: &str) -> String {
        Spi::get_one_with_args::<String>(
            &format!("SELECT status FROM mk_verify_detail($1, {required})"),
            &[key.into()],
        )
        .unwrap()
        .unwrap()
    }

    #[pg_test]
    fn issue_options_are_stored() {
        let user = new_user();
        let (id, _) = issue_with(
            user,
            "name => 'ci', expires_in => '30 days', scopes => '{read,write,read}',
             metadata => '{\"n\": 12345678901234567890.123456789012345678901, \"team\": \"ops\"}'",
        );
        assert!(check(
            "SELECT expires_at = created_at + interval '30 days'
                AND scopes = '{read,write}'
                AND metadata::text = '{\"n\": 12345678901234567890.123456789012345678901, \"team\": \"ops\"}'
                AND name = 'ci'
               FROM api_keys WHERE id = $1",
            &[id.into()],
        ));
        // Nothing given: the 0.1.0 row, with the new columns NULL.
        let (plain, _) = issue(new_user());
        assert!(check(
            "SELECT expires_at IS NULL AND scopes IS NULL AND metadata IS NULL FROM api_keys WHERE id = $1",
            &[plain.into()],
        ));
    }

    #[pg_test]
    fn issue_option_errors_have_their_sqlstates() {
        let user = new_user();
        let call = |options: &str| sqlstate(&format!("SELECT mk_issue_key('{user}', {options})"));
        assert_eq!(call("expires_in => '0'"), "22023");
        assert_eq!(call("expires_in => '-1 day'"), "22023");
        assert_eq!(call("expires_in => '1 month -40 days'"), "22023");
        assert_eq!(call("scopes => '{read,NULL}'"), "22004");
        assert_eq!(call("scopes => '{\"\"}'"), "22023");
        assert_eq!(call("scopes => '{\"read write\"}'"), "22023");
        assert_eq!(
            call(&format!("scopes => '{{{}}}'", "x".repeat(65))),
            "22023"
        );
        assert_eq!(
            call("scopes => (SELECT array_agg('s' || i) FROM generate_series(1, 65) i)"),
            "22023"
        );
        assert_eq!(call("metadata => '[1]'"), "22023");
        assert_eq!(call("metadata => '\"text\"'"), "22023");
        assert_eq!(call("metadata => 'null'"), "22023");
        assert_eq!(
            call("metadata => jsonb_build_object('x', repeat('a', 9000))"),
            "54000"
        );
        assert_eq!(
            sqlstate(&format!(
                "SELECT mk_rotate_key('{user}', grace => '-1 second')"
            )),
            "22023"
        );
        // No error left a row behind.
        assert!(check(
            "SELECT count(*) = 0 FROM api_keys WHERE user_id = $1",
            &[user.into()]
        ));
        // The message names the problem, not the value.
        let message = error_message(&format!(
            "SELECT mk_issue_key('{user}', scopes => '{{\"secret scope\"}}')"
        ));
        assert!(message.contains("scope 1"), "{message}");
        assert!(!message.contains("secret"), "{message}");
    }

    #[pg_test]
    fn expired_keys_fail_with_status_expired() {
        let user = new_user();
        let (id, key) = issue_with(user, "expires_in => '1 hour'");
        assert_eq!(verify(&key), Some(user));
        assert_eq!(status(Some(&key)), "valid");
        // Expiry is read from the clock, not from the transaction start.
        Spi::run_with_args(
            "UPDATE api_keys SET expires_at = clock_timestamp() + interval '50 ms' WHERE id = $1",
            &[id.into()],
        )
        .unwrap();
        assert_eq!(verify(&key), Some(user));
        Spi::run("SELECT pg_sleep(0.1)").unwrap();
        assert_eq!(verify(&key), None);
        assert_eq!(scoped(&key, "'{}'"), None);
        assert_eq!(status(Some(&key)), "expired");
        // Revoked beats expired.
        Spi::run_with_args("SELECT mk_revoke($1)", &[id.into()]).unwrap();
        assert_eq!(status(Some(&key)), "revoked");
        assert!(check(
            "SELECT status = 'revoked' FROM mk_keys WHERE id = $1",
            &[id.into()]
        ));
    }

    #[pg_test]
    fn rotation_with_grace_keeps_the_old_key_until_the_grace_ends() {
        let user = new_user();
        let (old_id, old_key) = issue(user);
        let (new_id, new_key) = Spi::get_two_with_args::<pgrx::Uuid, String>(
            "SELECT id, key FROM mk_rotate_key($1, grace => '1 hour')",
            &[user.into()],
        )
        .unwrap();
        let (new_id, new_key) = (new_id.unwrap(), new_key.unwrap());
        assert_eq!(verify(&old_key), Some(user));
        assert_eq!(verify(&new_key), Some(user));
        // The old row's revoked_at is the end of the grace period, so the seed's
        // one-active-key index sees one active key: the new one.
        assert!(check(
            "SELECT array_agg(id) = ARRAY[$2] FROM api_keys WHERE user_id = $1 AND revoked_at IS NULL",
            &[user.into(), new_id.into()],
        ));
        assert!(check(
            "SELECT status = 'valid' AND revoked_at = now() + interval '1 hour'
               FROM mk_verify_detail($1)",
            &[old_key.as_str().into()],
        ));
        // The grace period ends.
        Spi::run_with_args(
            "UPDATE api_keys SET revoked_at = clock_timestamp() WHERE id = $1",
            &[old_id.into()],
        )
        .unwrap();
        assert_eq!(verify(&old_key), None);
        assert_eq!(status(Some(&old_key)), "revoked");
        assert_eq!(verify(&new_key), Some(user));
    }

    #[pg_test]
    fn a_key_in_its_grace_period_can_still_be_revoked_at_once() {
        let user = new_user();
        let (old_id, old_key) = issue(user);
        Spi::run_with_args("SELECT mk_rotate_key($1, grace => '1 day')", &[user.into()]).unwrap();
        assert!(check("SELECT mk_revoke($1)", &[old_id.into()]));
        assert_eq!(verify(&old_key), None);
        assert!(!check("SELECT mk_revoke($1)", &[old_id.into()]));

        // A user-wide revoke ends the active key and the one in grace: 2.
        let (_, grace_key) = issue(new_user());
        let other = Spi::get_one_with_args::<pgrx::Uuid>(
            "SELECT user_id FROM api_keys WHERE key_hash = mk_hash_key($1)",
            &[grace_key.as_str().into()],
        )
        .unwrap()
        .unwrap();
        Spi::run_with_args(
            "SELECT mk_rotate_key($1, grace => '1 day')",
            &[other.into()],
        )
        .unwrap();
        let ended =
            Spi::get_one_with_args::<i32>("SELECT mk_revoke_user_keys($1)", &[other.into()])
                .unwrap();
        assert_eq!(ended, Some(2));
        assert_eq!(verify(&grace_key), None);

        // Rotating without grace ends a key still in grace, too.
        let third = new_user();
        let (_, first) = issue(third);
        Spi::run_with_args(
            "SELECT mk_rotate_key($1, grace => '1 day')",
            &[third.into()],
        )
        .unwrap();
        Spi::run_with_args("SELECT mk_rotate_key($1)", &[third.into()]).unwrap();
        assert_eq!(verify(&first), None);
        assert!(check(
            "SELECT count(*) = 1 FROM mk_keys WHERE user_id = $1 AND status = 'valid'",
            &[third.into()],
        ));
    }

    #[pg_test]
    fn rotation_never_widens_a_key() {
        let user = new_user();
        issue_with(
            user,
            "expires_in => '7 days', scopes => '{read}', metadata => '{\"team\": \"ops\"}'",
        );
        let (id, _) = Spi::get_two_with_args::<pgrx::Uuid, String>(
            "SELECT id, key FROM mk_rotate_key($1, 'next')",
            &[user.into()],
        )
        .unwrap();
        assert!(check(
            "SELECT scopes = '{read}' AND metadata = '{\"team\": \"ops\"}'
                AND expires_at = now() + interval '7 days' AND name = 'next'
               FROM api_keys WHERE id = $1",
            &[id.unwrap().into()],
        ));
        // Given options win.
        let (id, _) = Spi::get_two_with_args::<pgrx::Uuid, String>(
            "SELECT id, key FROM mk_rotate_key($1, scopes => '{write}', metadata => '{}', expires_in => '1 day')",
            &[user.into()],
        )
        .unwrap();
        assert!(check(
            "SELECT scopes = '{write}' AND metadata = '{}' AND expires_at = now() + interval '1 day'
               FROM api_keys WHERE id = $1",
            &[id.unwrap().into()],
        ));
    }

    #[pg_test]
    fn scopes_restrict_what_a_key_verifies_for() {
        let user = new_user();
        let (_, rw) = issue_with(user, "scopes => '{read,write}'");
        assert_eq!(scoped(&rw, "'{read}'"), Some(user));
        assert_eq!(scoped(&rw, "'{read,write}'"), Some(user));
        assert_eq!(scoped(&rw, "'{}'"), Some(user));
        assert_eq!(scoped(&rw, "'{admin}'"), None);
        assert_eq!(scoped(&rw, "'{read,admin}'"), None);
        assert_eq!(scoped(&rw, "'{READ}'"), None);
        assert_eq!(scoped(&rw, "NULL"), None);
        assert_eq!(scoped(&rw, "'{read,NULL}'"), None);
        assert_eq!(scoped_status(&rw, "'{admin}'"), "insufficient_scope");
        assert_eq!(scoped_status(&rw, "NULL"), "insufficient_scope");
        assert_eq!(scoped_status(&rw, "'{read}'"), "valid");
        // The one-argument forms do not look at scopes.
        assert_eq!(verify(&rw), Some(user));
        assert_eq!(status(Some(&rw)), "valid");

        // No scopes list: unrestricted. An empty list: holds nothing.
        let (_, unrestricted) = issue(new_user());
        assert!(scoped(&unrestricted, "'{admin,anything}'").is_some());
        let (_, nothing) = issue_with(new_user(), "scopes => '{}'");
        assert_eq!(scoped(&nothing, "'{read}'"), None);
        assert!(scoped(&nothing, "'{}'").is_some());

        // Malformed and unknown keys keep their statuses in the scoped form.
        assert_eq!(scoped_status("", "'{read}'"), "malformed");
        assert_eq!(scoped_status("not-ours", "'{read}'"), "not_found");

        // mk_verify_detail shows what the key holds.
        assert!(check(
            "SELECT scopes = '{read,write}' AND metadata IS NULL AND expires_at IS NULL AND revoked_at IS NULL
               FROM mk_verify_detail($1, '{admin}')",
            &[rw.as_str().into()],
        ));
    }

    #[pg_test]
    fn revoke_key_takes_the_plaintext_and_reveals_nothing_else() {
        let user = new_user();
        let (id, key) = issue(user);
        let (_, bystander) = issue(new_user());
        let mut near = key.clone().into_bytes();
        near[10] = if near[10] == b'a' { b'b' } else { b'a' };
        let near = String::from_utf8(near).unwrap();
        for junk in [
            "NULL".to_owned(),
            "''".to_owned(),
            format!("'{near}'"),
            format!("'{}'", &key[..51]),
            format!("repeat('x', {})", 5000),
            "'not-a-makima-key'".to_owned(),
        ] {
            assert_eq!(
                sqlstate(&format!("SELECT mk_revoke_key({junk})")),
                "00000",
                "{junk}"
            );
            assert!(
                !check(&format!("SELECT mk_revoke_key({junk})"), &[]),
                "{junk}"
            );
        }
        assert_eq!(verify(&key), Some(user));
        assert!(check("SELECT mk_revoke_key($1)", &[key.as_str().into()]));
        assert!(!check("SELECT mk_revoke_key($1)", &[key.as_str().into()]));
        assert_eq!(verify(&key), None);
        assert!(check(
            "SELECT revoked_at = now() FROM api_keys WHERE id = $1",
            &[id.into()]
        ));
        assert!(verify(&bystander).is_some());
    }

    #[pg_test]
    fn mk_keys_lists_keys_without_their_hashes() {
        let user = new_user();
        let (id, _) = issue_with(
            user,
            "name => 'ci', scopes => '{read}', metadata => '{\"a\": 1}'",
        );
        let columns = Spi::get_one::<String>(
            "SELECT string_agg(attname, ',' ORDER BY attnum) FROM pg_attribute
              WHERE attrelid = 'mk_keys'::regclass AND attnum > 0",
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            columns,
            "id,user_id,key_prefix,name,created_at,last_used_at,expires_at,revoked_at,scopes,metadata,status,credits,refill_amount,refill_every,refilled_at,rate_limit,rate_period"
        );
        assert!(check(
            "SELECT k.status = 'valid' AND k.name = 'ci' AND k.scopes = '{read}' AND k.metadata = '{\"a\": 1}'
                AND k.key_prefix = a.key_prefix
               FROM mk_keys k JOIN api_keys a USING (id) WHERE k.id = $1",
            &[id.into()],
        ));
        // Nobody but the owner may read it until granted.
        assert!(check(
            "SELECT NOT has_table_privilege('public', 'mk_keys', 'SELECT')",
            &[]
        ));
    }

    #[pg_test]
    fn the_sql_fallback_applies_expiry_grace_and_scopes_too() {
        lock_for_ddl();
        let user = new_user();
        let (_, key) = issue_with(user, "scopes => '{read}', metadata => '{\"a\": 1}'");
        let expiring_user = new_user();
        let (expiring_id, expiring) = issue(expiring_user);
        Spi::run("DROP INDEX idx_api_keys_key_hash_unique").unwrap();
        assert_eq!(scoped(&key, "'{read}'"), Some(user));
        assert_eq!(scoped(&key, "'{write}'"), None);
        assert_eq!(scoped_status(&key, "'{write}'"), "insufficient_scope");
        assert!(check(
            "SELECT scopes = '{read}' AND metadata = '{\"a\": 1}' FROM mk_verify_detail($1)",
            &[key.as_str().into()],
        ));
        Spi::run_with_args(
            "UPDATE api_keys SET expires_at = clock_timestamp() WHERE id = $1",
            &[expiring_id.into()],
        )
        .unwrap();
        assert_eq!(verify(&expiring), None);
        assert_eq!(status(Some(&expiring)), "expired");
        // A grace rotation through the fallback: the old key keeps verifying
        // until its revoked_at, and the new one inherits its scopes.
        let new_key = Spi::get_one_with_args::<String>(
            "SELECT key FROM mk_rotate_key($1, grace => '1 hour')",
            &[user.into()],
        )
        .unwrap()
        .unwrap();
        assert_eq!(verify(&key), Some(user));
        assert_eq!(status(Some(&key)), "valid");
        assert!(check(
            "SELECT revoked_at > now() FROM api_keys WHERE key_hash = mk_hash_key($1)",
            &[key.as_str().into()],
        ));
        assert_eq!(verify(&new_key), Some(user));
        assert_eq!(scoped(&new_key, "'{read}'"), Some(user));
        assert_eq!(scoped(&new_key, "'{write}'"), None);
    }

    #[pg_test]
    fn a_0_2_0_column_of_another_type_fails_closed() {
        lock_for_ddl();
        let user = new_user();
        let (id, key) = issue_with(user, "expires_in => '1 hour', scopes => '{read}'");
        Spi::run_with_args(
            "UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE id = $1",
            &[id.into()],
        )
        .unwrap();
        assert_eq!(verify(&key), None);
        // Someone changes the column's type: the key must not start verifying as
        // one that never expires. The call fails instead.
        Spi::run(
            "ALTER EXTENSION makima_keys DROP VIEW mk_keys;
             DROP VIEW mk_keys;
             DROP INDEX idx_api_keys_ends_at;
             ALTER TABLE api_keys ALTER COLUMN expires_at TYPE text",
        )
        .unwrap();
        // Not a NULL (a failed verification) and not a result: an error that
        // names the column. XX000, as any table the install did not make.
        for call in [
            format!("SELECT mk_verify('{key}')"),
            format!("SELECT mk_verify('{key}', '{{admin}}')"),
            format!("SELECT * FROM mk_verify_detail('{key}')"),
        ] {
            assert_eq!(sqlstate(&call), "XX000", "{call}");
            let message = error_message(&call);
            assert!(
                message.starts_with("api_keys.expires_at is not what makima_keys expects"),
                "{call}: {message}"
            );
            assert!(!message.contains(key.as_str()), "{message}");
        }
    }

    /// The issuing and detail functions return their one row in materialize
    /// mode: every way SQL can call a set-returning function gets exactly one
    /// row, and the function runs exactly once (one key written per call).
    #[pg_test]
    fn one_row_functions_answer_once_in_every_calling_context() {
        let keys_of = |user: pgrx::Uuid| {
            Spi::get_one_with_args::<i64>(
                "SELECT count(*) FROM api_keys WHERE user_id = $1",
                &[user.into()],
            )
            .unwrap()
            .unwrap()
        };

        // In FROM, as a LATERAL call per row, in the target list, as a field.
        let user = new_user();
        let rows =
            Spi::get_one_with_args::<i64>("SELECT count(*) FROM mk_issue_key($1)", &[user.into()]);
        assert_eq!(rows.unwrap(), Some(1));
        assert_eq!(keys_of(user), 1);

        let users: Vec<pgrx::Uuid> = (0..3).map(|_| new_user()).collect();
        let issued = Spi::get_one_with_args::<i64>(
            "SELECT count(mk_verify(k.key)) FROM unnest($1::uuid[]) u(id), LATERAL mk_issue_key(u.id) k",
            &[users.clone().into()],
        );
        assert_eq!(issued.unwrap(), Some(3));
        for user in &users {
            assert_eq!(keys_of(*user), 1);
        }

        let user = new_user();
        let key = Spi::get_one_with_args::<String>(
            "SELECT (mk_issue_key($1, 'tlist')).key",
            &[user.into()],
        )
        .unwrap()
        .unwrap();
        assert_eq!(verify(&key), Some(user));
        assert_eq!(keys_of(user), 1);
        let record =
            Spi::get_one_with_args::<String>("SELECT mk_rotate_key($1)::text", &[user.into()])
                .unwrap()
                .unwrap();
        assert!(record.starts_with('('), "a record: {record}");
        assert_eq!(verify(&key), None, "the rotation ended the old key");
        assert_eq!(keys_of(user), 2);

        // From PL/pgSQL (SELECT INTO, PERFORM, RETURN QUERY) and a SQL function.
        let user = new_user();
        Spi::run_with_args(
            "CREATE FUNCTION pg_temp.issue_and_check(u uuid) RETURNS text LANGUAGE plpgsql AS $$
             DECLARE r record;
             BEGIN
                 SELECT * INTO r FROM mk_issue_key(u);
                 PERFORM mk_verify_detail(r.key);
                 RETURN (SELECT status FROM mk_verify_detail(r.key, ARRAY[]::text[]));
             END $$",
            &[],
        )
        .unwrap();
        let checked =
            Spi::get_one_with_args::<String>("SELECT pg_temp.issue_and_check($1)", &[user.into()]);
        assert_eq!(checked.unwrap().as_deref(), Some("valid"));
        Spi::run(
            "CREATE FUNCTION pg_temp.rotate_in_sql(u uuid)
             RETURNS TABLE (id uuid, key text, key_prefix text, created_at timestamptz)
             LANGUAGE sql AS 'SELECT * FROM mk_rotate_key(u)'",
        )
        .unwrap();
        Spi::run(
            "CREATE FUNCTION pg_temp.rotate_in_plpgsql(u uuid)
             RETURNS TABLE (id uuid, key text, key_prefix text, created_at timestamptz)
             LANGUAGE plpgsql AS $$ BEGIN RETURN QUERY SELECT * FROM mk_rotate_key(u); END $$",
        )
        .unwrap();
        let (rotated, from_plpgsql) = Spi::get_two_with_args::<String, String>(
            "SELECT (SELECT key FROM pg_temp.rotate_in_sql($1)), (SELECT key FROM pg_temp.rotate_in_plpgsql($1))",
            &[user.into()],
        )
        .unwrap();
        assert_eq!(verify(&rotated.unwrap()), None, "rotated again right after");
        assert_eq!(verify(&from_plpgsql.unwrap()), Some(user));
        assert_eq!(keys_of(user), 3);

        // A scrollable cursor reads the row forwards and backwards.
        let user = new_user();
        Spi::run_with_args(
            "DECLARE one_row SCROLL CURSOR FOR SELECT key FROM mk_issue_key($1)",
            &[user.into()],
        )
        .unwrap();
        let forward = Spi::get_one::<String>("FETCH NEXT FROM one_row")
            .unwrap()
            .unwrap();
        let past_the_end = Spi::connect(|client| {
            client
                .select("FETCH NEXT FROM one_row", None, &[])
                .unwrap()
                .len()
        });
        assert_eq!(past_the_end, 0);
        let backward = Spi::get_one::<String>("FETCH PRIOR FROM one_row")
            .unwrap()
            .unwrap();
        assert_eq!(forward, backward);
        Spi::run("CLOSE one_row").unwrap();
        assert_eq!(verify(&forward), Some(user));
        assert_eq!(keys_of(user), 1);

        // Every column of a detail row, NULLs included, comes through.
        let (user, key) = {
            let user = new_user();
            (
                user,
                issue_with(user, "scopes => ARRAY['read'], metadata => '{\"a\": 1}'").1,
            )
        };
        let described = Spi::get_one_with_args::<String>(
            "SELECT (d.status, d.user_id = $2, d.name, d.scopes, d.metadata, d.revoked_at)::text
               FROM mk_verify_detail($1, ARRAY['read']) d",
            &[key.as_str().into(), user.into()],
        );
        assert_eq!(
            described.unwrap().as_deref(),
            Some("(valid,t,,{read},\"{\"\"a\"\": 1}\",)")
        );
        assert_eq!(status(Some("not a key")), "not_found");
        assert_eq!(status(None), "malformed");
    }

    /// 0.4.0 rate limits on a server that did not preload makima_keys (as
    /// `cargo pgrx test` runs it): argument errors first (22023), then the
    /// refusal to issue a limit that could not be kept (55000); an existing
    /// limited key fails closed; the statistics raise 55000.
    #[pg_test]
    fn rate_limits_without_preloading_fail_closed() {
        let user = new_user();
        let call = |options: &str| sqlstate(&format!("SELECT mk_issue_key('{user}', {options})"));
        assert_eq!(call("rate_limit => 10"), "22023");
        assert_eq!(call("rate_period => '1 minute'"), "22023");
        assert_eq!(call("rate_limit => 0, rate_period => '1 minute'"), "22023");
        assert_eq!(call("rate_limit => 10, rate_period => '0'"), "22023");
        assert_eq!(
            call("rate_limit => 10, rate_period => '1 day -1 hour'"),
            "22023"
        );
        assert_eq!(call("rate_limit => 10, rate_period => '1 minute'"), "55000");
        let (id, key) = issue(user);
        assert_eq!(
            sqlstate(&format!(
                "SELECT mk_rotate_key('{user}', rate_limit => 5, rate_period => '1 second')"
            )),
            "55000"
        );
        Spi::run_with_args(
            "UPDATE api_keys SET rate_limit = 5, rate_period = '1 minute' WHERE id = $1",
            &[id.into()],
        )
        .unwrap();
        assert_eq!(status(Some(&key)), "rate_limit_unavailable");
        assert_eq!(verify(&key), None);
        // A peek too: a limit that cannot be kept is never skipped.
        let peek = Spi::get_one_with_args::<String>(
            "SELECT status FROM mk_verify_detail($1, cost => 0)",
            &[key.as_str().into()],
        );
        assert_eq!(peek.unwrap().as_deref(), Some("rate_limit_unavailable"));
        // Half a limit written by hand is no limit that could pass, never
        // "unlimited".
        Spi::run_with_args(
            "UPDATE api_keys SET rate_period = NULL WHERE id = $1",
            &[id.into()],
        )
        .unwrap();
        assert_eq!(status(Some(&key)), "rate_limit_unavailable");
        assert_eq!(verify(&key), None);
        // A rotation inherits the limit, so it is refused too, and the old
        // key is not ended.
        assert_eq!(
            sqlstate(&format!("SELECT mk_rotate_key('{user}')")),
            "55000"
        );
        let live = Spi::get_one_with_args::<i64>(
            "SELECT count(*) FROM api_keys WHERE user_id = $1 AND revoked_at IS NULL",
            &[user.into()],
        );
        assert_eq!(live, Ok(Some(1)));
        assert_eq!(sqlstate("SELECT * FROM mk_key_stats"), "55000");
        assert_eq!(sqlstate("SELECT mk_key_stats_reset()"), "55000");
    }
}
