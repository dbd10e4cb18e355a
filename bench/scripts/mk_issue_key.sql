WITH u AS (INSERT INTO public.users DEFAULT VALUES RETURNING id)
SELECT k.key FROM u, LATERAL mk_issue_key(u.id) k;
