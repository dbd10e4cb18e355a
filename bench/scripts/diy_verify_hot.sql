SELECT diy.diy_verify((SELECT key FROM bench.keys WHERE i = 1));
