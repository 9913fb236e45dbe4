#!/usr/bin/env python3
"""Lists functions longer than LIMIT lines (default 120) in the given Rust
source dirs/files: `scripts/long-functions.py [--limit N] PATH...`. Exits 1
when there is one. A function runs from its `fn` line to the first line
holding only `}` at the same indentation (rustfmt's layout)."""
import os, re, sys

args = sys.argv[1:]
limit = 120
if args[:1] == ["--limit"]:
    limit, args = int(args[1]), args[2:]
FN = re.compile(r"^(\s*)(pub(\([^)]*\))? )?(const )?(async )?(unsafe )?fn (\w+)")
found = []
def scan(path):
    lines = open(path, encoding="utf-8").read().split("\n")
    for i, line in enumerate(lines):
        m = FN.match(line)
        if not m or line.rstrip().endswith(";"):
            continue
        indent = m.group(1)
        for j in range(i + 1, len(lines)):
            if lines[j] == indent + "}":
                if j - i + 1 > limit:
                    found.append((j - i + 1, path, i + 1, m.group(7)))
                break
for arg in args:
    if os.path.isfile(arg):
        scan(arg)
    for root, _, files in os.walk(arg):
        for f in files:
            if f.endswith(".rs"):
                scan(os.path.join(root, f))
for n, path, line, name in sorted(found, reverse=True):
    print(f"{n:5} lines  {path}:{line}  {name}")
sys.exit(1 if found else 0)
