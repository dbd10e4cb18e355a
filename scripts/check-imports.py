#!/usr/bin/env python3
"""The import graph of src/: prints one line per module and fails on a loop
or an upward import (a module naming its own parent, or an ancestor).

Every path a module names (`use crate::a::b`, `super::x`, `crate::a::f()`
inline) is an edge to the module it lands in. Sibling edges (store::probe
-> store::row) are fine; an edge to an ancestor (store::probe -> store) is
not, and neither is any cycle."""
import re
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
TEST_ONLY = {"pg_tests", "frozen_scripts"}


def module_of(path: Path) -> tuple:
    parts = path.relative_to(SRC).with_suffix("").parts
    if parts[-1] == "mod":
        parts = parts[:-1]
    return () if parts == ("lib",) else tuple(parts)


modules = {module_of(p): p for p in SRC.rglob("*.rs")}


def resolve(current: tuple, path: list) -> tuple:
    """The longest known module that `path` (crate::/super::/self:: ...) names."""
    if path[0] == "crate":
        base, rest = (), path[1:]
    elif path[0] == "super":
        base, rest = current, path
        while rest and rest[0] == "super":
            base, rest = base[:-1], rest[1:]
    elif path[0] == "self":
        base, rest = current, path[1:]
    else:
        return None
    found = base
    for part in rest:
        if base + (part,) in modules:
            base = base + (part,)
            found = base
        else:
            break
    return found


edges = {m: set() for m in modules}
for module, path in modules.items():
    text = re.sub(r"//.*", "", path.read_text())
    for match in re.finditer(r"\b((?:crate|super|self)(?:::\w+)+)", text):
        target = resolve(module, match.group(1).split("::"))
        if target is not None and target != module and target != ():
            edges[module].add(target)

problems = []
for module, targets in sorted(edges.items()):
    for target in targets:
        if module[: len(target)] == target:
            problems.append(f"upward import: {'::'.join(module)} -> {'::'.join(target)}")


def cycle_from(start):
    stack, seen = [(start, [start])], set()
    while stack:
        node, trail = stack.pop()
        for nxt in edges[node]:
            if nxt == start:
                return trail + [start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, trail + [nxt]))
    return None


for module in sorted(edges):
    loop = cycle_from(module)
    if loop:
        problems.append("import loop: " + " -> ".join("::".join(m) or "lib" for m in loop))
        break

for module in sorted(edges):
    if module and module[0] not in TEST_ONLY:
        names = sorted("::".join(t) for t in edges[module])
        print(f"{'::'.join(module):18} -> {', '.join(names) or '(nothing of ours)'}")
for problem in problems:
    print(problem, file=sys.stderr)
sys.exit(1 if problems else 0)
