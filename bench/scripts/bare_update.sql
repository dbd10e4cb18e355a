\set i random(1, :ckeys)
UPDATE public.api_keys SET last_used_at = now()
 WHERE key_hash = (SELECT hash FROM bench.ckeys WHERE i = :i);
