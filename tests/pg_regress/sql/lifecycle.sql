-- A key's life as an administrator sees it in psql. Keys are random, so
-- they are kept in psql variables and only their shape is printed.
SET client_min_messages = warning;
\set alice '\'00000000-0000-0000-0000-00000000a11c\''

SELECT id AS key_id, key, key_prefix FROM mk_issue_key(:alice, 'laptop') \gset
SELECT length(:'key') AS key_length,
       left(:'key', 3) AS starts_with,
       :'key_prefix' = left(:'key', 9) AS prefix_is_first_9,
       mk_key_is_well_formed(:'key') AS well_formed;

-- Only the hash is stored.
SELECT key_hash = mk_hash_key(:'key') AS hash_matches,
       key_hash = encode(sha256(convert_to(:'key', 'UTF8')), 'hex') AS same_as_sql,
       name, last_used_at IS NULL AS never_used, revoked_at IS NULL AS active
  FROM api_keys WHERE id = :'key_id';

SELECT mk_verify(:'key') = :alice::uuid AS verifies;
SELECT status, key_id = :'key_id' AS same_key, user_id, key_prefix = :'key_prefix' AS same_prefix, name
  FROM mk_verify_detail(:'key');
SELECT last_used_at IS NOT NULL AS used FROM api_keys WHERE id = :'key_id';

-- Rotation: the old key stops, the new one works, one active key remains.
SELECT id AS new_key_id, key AS new_key FROM mk_rotate_key(:alice, 'laptop 2') \gset
SELECT mk_verify(:'key') AS old_key_user, mk_verify(:'new_key') = :alice::uuid AS new_key_verifies;
SELECT status FROM mk_verify_detail(:'key');
SELECT count(*) FILTER (WHERE revoked_at IS NULL) AS active, count(*) AS total
  FROM api_keys WHERE user_id = :alice;

-- Revocation.
SELECT mk_revoke(:'new_key_id') AS revoked_now;
SELECT mk_revoke(:'new_key_id') AS revoked_again;
SELECT mk_verify(:'new_key') AS after_revoke;
SELECT status, user_id FROM mk_verify_detail(:'new_key');

-- Several users, then all of one user's keys at once.
SELECT count(*) AS issued
  FROM generate_series(1, 3) g,
       LATERAL mk_issue_key(('00000000-0000-0000-0000-00000000000' || g)::uuid);
SELECT mk_revoke_user_keys('00000000-0000-0000-0000-000000000002') AS revoked,
       mk_revoke_user_keys('00000000-0000-0000-0000-000000000002') AS revoked_again;

-- Statuses for input that is not a live key.
SELECT v.label, d.status, d.key_id IS NULL AS no_row
  FROM (VALUES ('null', NULL),
               ('empty', ''),
               ('too long', repeat('k', 1025)),
               ('bad checksum', left(:'new_key', 51) || CASE right(:'new_key', 1) WHEN 'A' THEN 'B' ELSE 'A' END),
               ('other format', 'sk_live_not_ours'),
               ('unknown key', 'mk_abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQ4FLuWK')) v(label, k),
       LATERAL mk_verify_detail(v.k) d
 ORDER BY v.label;
