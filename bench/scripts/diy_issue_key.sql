WITH u AS (INSERT INTO public.users DEFAULT VALUES RETURNING id)
SELECT diy.diy_issue_key(u.id) FROM u;
