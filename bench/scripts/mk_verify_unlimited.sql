\set i random(1, :lkeys)
SELECT mk_verify((SELECT key FROM bench.ukeys WHERE i = :i));
