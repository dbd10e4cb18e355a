-- 0.2.0 as an administrator sees it in psql: expiry, scopes, metadata,
-- rotation with a grace period, revocation by plaintext and the mk_keys
-- listing. Keys and times vary, so only what they mean is printed.
SET client_min_messages = warning;
\set bob '\'00000000-0000-0000-0000-0000020b0b02\''
\set carol '\'00000000-0000-0000-0000-0000020ca202\''

-- A key for CI: named, expiring in 30 days, read-only, with metadata.
SELECT id AS key_id, key FROM mk_issue_key(:bob, name => 'ci', expires_in => '30 days',
                                           scopes => '{read}', metadata => '{"team": "ops"}') \gset
SELECT name, expires_at - created_at AS lifetime, scopes, metadata
  FROM api_keys WHERE id = :'key_id';

-- Scopes: the one-argument mk_verify ignores them; the two-argument form checks them.
SELECT mk_verify(:'key') = :bob::uuid AS plain,
       mk_verify(:'key', '{read}') = :bob::uuid AS read,
       mk_verify(:'key', '{read,write}') AS read_write,
       mk_verify(:'key', '{}') = :bob::uuid AS no_requirement,
       mk_verify(:'key', NULL) AS unknown_requirement;
SELECT status, name, scopes, metadata, expires_at > now() AS expires_later, revoked_at
  FROM mk_verify_detail(:'key', '{write}');

-- Rotation with a grace period: both keys verify until it ends; the old
-- row's revoked_at is the end, so the new key is the one active key.
SELECT id AS new_id, key AS new_key FROM mk_rotate_key(:bob, grace => '1 hour') \gset
SELECT mk_verify(:'key') = :bob::uuid AS old_key_works, mk_verify(:'new_key') = :bob::uuid AS new_key_works;
SELECT status, revoked_at BETWEEN now() + interval '59 minutes' AND now() + interval '1 hour' AS ends_in_an_hour
  FROM mk_verify_detail(:'key');
SELECT id = :'new_id' AS is_new_key, scopes, metadata, expires_at - created_at AS lifetime
  FROM api_keys WHERE user_id = :bob AND revoked_at IS NULL;
SELECT name, status, revoked_at IS NOT NULL AS has_end FROM mk_keys WHERE user_id = :bob ORDER BY created_at;

-- A leaked key is revoked from its plaintext; junk and repeats answer false.
SELECT mk_revoke_key(:'new_key') AS revoked, mk_revoke_key(:'new_key') AS again,
       mk_revoke_key('mk_not_a_key') AS junk, mk_revoke_key(NULL) AS null_key;
SELECT status FROM mk_verify_detail(:'new_key');

-- Expiry: an expired key fails with status expired.
SELECT id AS carol_key_id, key AS carol_key FROM mk_issue_key(:carol, expires_in => '1 hour') \gset
UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE id = :'carol_key_id';
SELECT mk_verify(:'carol_key') AS verifies, status FROM mk_verify_detail(:'carol_key');
SELECT status FROM mk_keys WHERE id = :'carol_key_id';

-- Bad options.
SELECT mk_issue_key(:carol, expires_in => '-1 day');
SELECT mk_issue_key(:carol, scopes => '{read,NULL}');
SELECT mk_issue_key(:carol, scopes => '{"read write"}');
SELECT mk_issue_key(:carol, metadata => '["not", "an", "object"]');
SELECT mk_issue_key(:carol, metadata => jsonb_build_object('blob', repeat('x', 9000)));
SELECT mk_rotate_key(:carol, grace => '-5 minutes');
