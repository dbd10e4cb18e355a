"""Instruction counts per call, the repeatable companion of bench.py.

Started by bench/callgrind.sh, which builds and installs the release build and
prepares a small database in a stopped cluster. Each case runs in a
single-user backend under `valgrind --tool=callgrind`: first a warm-up that
every case shares (caches, plans), then the case's statement COUNT times.
Instructions per call = (case - warm-up) / COUNT. Unlike timings, these
numbers do not move with the load of a shared machine, so small changes to a
hot path can be judged by them. They count instructions, not cache misses or
WAL flushes, so they complement the pgbench run and never replace it.

Under valgrind the sha2 crate and OpenSSL see no SHA extensions and hash in
software (a few thousand instructions per key more than on this CPU).
"""

import argparse
import os
import random
import pathlib
import re
import subprocess

from bench import SCRIPTS, SERVER_SIDE_SETTINGS, SERVER_SIDE_STATEMENTS

PG_BIN = pathlib.Path(os.environ.get("MK_PG_BIN", "/usr/lib/postgresql/15/bin"))


def pgbench_statement(script):
    """The SQL of a pgbench script of bench/scripts, with `:i` as `$1`."""
    lines = [line for line in (SCRIPTS / script).read_text().splitlines() if not line.startswith("\\")]
    return re.sub(r"(?<!:):i\b", "$1", " ".join(lines).strip().rstrip(";"))


SERVER_SIDE = dict(SERVER_SIDE_STATEMENTS)
# The key check and SHA-256 alone, to show what software hashing adds.
SERVER_SIDE["mk_hash_key"] = "SELECT count(mk_hash_key(key)) FROM bench.sample"
SETTINGS = [
    # Steady state: every sample key was stamped when the sample was made.
    "SET makima_keys.last_used_interval = 100000000",
    *SERVER_SIDE_SETTINGS,
    "PREPARE mk_issue AS " + pgbench_statement("mk_issue_key.sql"),
    "PREPARE diy_issue AS " + pgbench_statement("diy_issue_key.sql"),
    # One verification per transaction, as in the pgbench cases.
    "PREPARE mk_verify_txn(int) AS " + pgbench_statement("mk_verify.sql"),
    "PREPARE lookup_txn(int) AS " + pgbench_statement("lookup.sql"),
]


def as_postgres(cmd):
    return cmd if os.geteuid() != 0 else ["sudo", "-u", "postgres", "--"] + cmd


def instructions(args, name, statements):
    """Runs the statements in a single-user backend under callgrind; returns
    the instructions executed."""
    script = args.work / f"{name}.sql"
    script.write_text("".join(f"{sql};\n" for sql in statements))
    os.chmod(script, 0o644)
    out = args.work / f"{name}.callgrind"
    cmd = as_postgres(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                       str(PG_BIN / "postgres"), "--single", "-D", str(args.pgdata),
                       "-c", "synchronous_commit=off", "-c", "autovacuum=off", args.db])
    with script.open() as stdin:
        run = subprocess.run(cmd, stdin=stdin, capture_output=True, text=True)
    errors = [line for line in run.stdout.splitlines() if "ERROR" in line]
    if errors or run.returncode != 0:
        raise SystemExit(f"{name} failed (exit {run.returncode}):\n" + "\n".join(errors[:5])
                         + f"\n{run.stderr[-3000:]}")
    return int(re.search(r"Collected : (\d+)", run.stderr).group(1))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pgdata", type=pathlib.Path, required=True)
    parser.add_argument("--work", type=pathlib.Path, required=True)
    parser.add_argument("--db", default="cg")
    parser.add_argument("--issues", type=int, default=2000,
                        help="statements per case for the issue and one-call-per-transaction cases")
    parser.add_argument("--sample", type=int, required=True, help="keys in the sample table")
    args = parser.parse_args()

    # The same random keys for both one-call-per-transaction cases.
    rng = random.Random(1)
    keys = [rng.randint(1, args.sample) for _ in range(args.issues)]

    def transactions(statement):
        return [f"EXECUTE {statement}({i})" for i in keys]

    warm = (SETTINGS + ["EXECUTE mk_issue", "EXECUTE diy_issue"] * 300 + list(SERVER_SIDE.values())
            + transactions("mk_verify_txn")[:300] + transactions("lookup_txn")[:300])
    cases = {
        "mk_issue_key": ["EXECUTE mk_issue"] * args.issues,
        "diy_issue_key": ["EXECUTE diy_issue"] * args.issues,
        "mk_verify txn": transactions("mk_verify_txn"),
        "lookup txn": transactions("lookup_txn"),
    }
    cases.update({name: [sql] for name, sql in SERVER_SIDE.items()})
    base = instructions(args, "warm-up", warm)
    per_call = {}
    for name, statements in cases.items():
        calls = len(statements) if len(statements) > 1 else args.sample
        per_call[name] = (instructions(args, name, warm + statements) - base) / calls
        print(f"{name:15} {per_call[name]:10,.0f} instructions per call", flush=True)

    print()
    print(f"mk_issue_key / diy_issue_key      {per_call['mk_issue_key'] / per_call['diy_issue_key']:.3f}"
          "   (instructions per call; lower is cheaper)")
    print(f"mk_verify txn / bare lookup txn   {per_call['mk_verify txn'] / per_call['lookup txn']:.3f}"
          "   (one call per transaction, as in pgbench)")
    print(f"mk_verify / executor index probe  {per_call['mk_verify'] / per_call['index probe']:.3f}"
          "   (server side, one statement)")
    hashing = per_call["mk_hash_key"] - per_call["scan only"]
    print(f"  the same without the key check and hash ({hashing:,.0f} under valgrind)"
          f"  {(per_call['mk_verify'] - hashing) / per_call['index probe']:.3f}")
    print(f"mk_verify / diy_verify_ro         {per_call['mk_verify'] / per_call['diy_verify_ro']:.3f}")


if __name__ == "__main__":
    main()
