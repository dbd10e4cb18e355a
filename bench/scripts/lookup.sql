\set i random(1, :keys)
SELECT k.user_id FROM public.api_keys k
 WHERE k.key_hash = (SELECT hash FROM bench.keys WHERE i = :i) AND k.revoked_at IS NULL;
