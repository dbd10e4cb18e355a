-- Hostile input to the functions that take a key: never an error, never a
-- crash, and the documented status. Keys are random, so only counts and
-- statuses are printed.
SET client_min_messages = warning;
SELECT key FROM mk_issue_key('00000000-0000-0000-0000-0000000000ff') \gset

SELECT v.label, d.status, mk_verify(v.k) IS NULL AS verify_is_null, mk_key_is_well_formed(v.k) AS well_formed
  FROM (VALUES ('01 null', NULL),
               ('02 empty', ''),
               ('03 one space', ' '),
               ('04 1024 bytes', repeat('k', 1024)),
               ('05 1025 bytes', repeat('k', 1025)),
               ('06 1 MB', repeat('k', 1048576)),
               ('07 100 MB', repeat('k', 104857600)),
               ('08 NUL escapes, literally', 'mk_\x00\000\u0000'),
               ('09 control characters', E'mk_\x01\x02\x1b[2J\r\n\t\x7f'),
               ('10 multibyte', 'mk_ключ🔑鍵'),
               ('11 multibyte, 52 bytes', 'mk_' || repeat('é', 24) || 'a'),
               ('12 key with a space', :'key' || ' '),
               ('13 key, upper case', upper(:'key')),
               ('14 key, truncated', left(:'key', 51)),
               ('15 key, doubled', :'key' || :'key'),
               ('16 SQL in the key', 'mk_''; DROP TABLE api_keys; --'),
               ('17 the key itself', :'key')) v(label, k),
       LATERAL mk_verify_detail(v.k) d
 ORDER BY v.label;

-- Every single-character change of a real key: inside the prefix it is
-- another format (not_found); anywhere else the checksum catches it.
SELECT d.status, count(*)
  FROM generate_series(1, 52) pos,
       LATERAL (SELECT overlay(:'key' PLACING CASE WHEN substr(:'key', pos, 1) = 'x' THEN 'y' ELSE 'x' END
                               FROM pos FOR 1) AS k) changed,
       LATERAL mk_verify_detail(changed.k) d
 GROUP BY d.status ORDER BY d.status;

-- The table is untouched and the key still works.
SELECT count(*) AS keys, mk_verify(:'key') IS NOT NULL AS still_verifies
  FROM api_keys WHERE user_id = '00000000-0000-0000-0000-0000000000ff';
