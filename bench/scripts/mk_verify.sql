\set i random(1, :keys)
SELECT mk_verify((SELECT key FROM bench.keys WHERE i = :i));
