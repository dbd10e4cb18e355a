\set i random(1, :ckeys)
SELECT mk_verify((SELECT key FROM bench.ckeys WHERE i = :i));
