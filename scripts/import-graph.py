#!/usr/bin/env python3
"""Import graph between the top-level modules of a crate; fails on a cycle.

    scripts/import-graph.py [SRC_DIR]        (default: scheduler/src)

Reads every `.rs` file under SRC_DIR (not `bin/`), drops comments and
string literals, and takes an edge A -> B for each path that names top-level
module B from a file of module A: `crate::B`, `crate::{B, ..}` (nested
groups too), a `super::` chain that climbs to the crate root and then names
B, and `crate::item` where the crate root re-exports `item` from B
(`pub use B::item;` in lib.rs). Test modules count like any other code.

Prints each module's edges with one place each is made, then every cycle
(a strongly connected component of two or more modules) and every edge out
of a module that must import none of the others (`domain`). Exits 1 when
there is either, 0 otherwise.

Not handled: inline `mod x { .. }` blocks deepen `super::` chains (a
`super::super::B` inside one is read as climbing from the file); macros
that build paths.
"""

import os
import re
import sys
from collections import defaultdict

# Modules that may import none of the others.
LEAVES = {"domain"}


def strip(text):
    """The source with comments and string/char literals blanked (newlines
    kept, so line numbers stay)."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    out.append("\n" if text[i] == "\n" else "")
                    i += 1
        elif c == "r" and re.match(r'r#*"', text[i:]) and not (i and (text[i - 1].isalnum() or text[i - 1] == "_")):
            hashes = re.match(r'r(#*)"', text[i:]).group(1)
            end = text.find('"' + hashes, i + 2 + len(hashes))
            end = n if end < 0 else end + 1 + len(hashes)
            out.append('""' + "\n" * text.count("\n", i, end))
            i = end
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append('""' + "\n" * text.count("\n", i, j))
            i = j + 1
        elif c == "'":
            # A char literal ('x', '\n', '\u{1F600}') or a lifetime ('a).
            if i + 1 < n and text[i + 1] == "\\":
                j = text.find("'", i + 2)
                i = n if j < 0 else j + 1
                out.append("' '")
            elif i + 2 < n and text[i + 2] == "'":
                i += 3
                out.append("' '")
            else:
                out.append(c)
                i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def module_path(src, path):
    """The module path of a file: src/a.rs -> [a], src/a/mod.rs -> [a],
    src/a/b.rs -> [a, b]."""
    rel = os.path.relpath(path, src)[: -len(".rs")].split(os.sep)
    if rel[-1] == "mod":
        rel = rel[:-1]
    return rel


def group_heads(body):
    """Top-level names of a `{a, b::c, d::{e, f}}` group (without braces)."""
    heads, depth, cur = [], 0, ""
    for ch in body:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == "," and depth == 0:
            heads.append(cur)
            cur = ""
            continue
        if depth == 0:
            cur += ch
    heads.append(cur)
    names = []
    for h in heads:
        m = re.match(r"\s*([A-Za-z_][A-Za-z0-9_]*)", h)
        if m:
            names.append(m.group(1))
    return names


def braced(text, start):
    """The text inside the braces opening at `start`."""
    depth = 0
    for j in range(start, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : j]
    return text[start + 1 :]


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else "scheduler/src"
    lib = os.path.join(src, "lib.rs")
    if not os.path.exists(lib):
        sys.exit(f"{lib}: no crate root there")
    root = strip(open(lib).read())
    modules = set(re.findall(r"^\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+([a-z_][a-z0-9_]*)\s*;", root, re.M))
    # crate::item re-exported at the root from a module.
    reexport = {}
    for m in re.finditer(r"^\s*pub\s+use\s+([a-z_][a-z0-9_]*)::([^;]+);", root, re.M):
        owner, rest = m.group(1), m.group(2).strip()
        names = group_heads(rest[1:-1]) if rest.startswith("{") else [rest.split("::")[-1]]
        for name in names:
            alias = re.search(r"\bas\s+([A-Za-z_][A-Za-z0-9_]*)", name)
            reexport[alias.group(1) if alias else name.split()[0]] = owner

    edges = defaultdict(dict)  # from -> to -> first place

    def add(frm, to, place):
        if to in modules and to != frm:
            edges[frm].setdefault(to, place)

    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if not (dirpath == src and d == "bin"))
        for f in sorted(filenames):
            if not f.endswith(".rs") or (dirpath == src and f == "lib.rs"):
                continue
            path = os.path.join(dirpath, f)
            mpath = module_path(src, path)
            frm = mpath[0]
            text = strip(open(path).read())

            def line(pos):
                return f"{os.path.relpath(path)}:{text.count(chr(10), 0, pos) + 1}"

            def head(rest, pos):
                """Edges for what follows `crate::` (or a root-reaching super chain)."""
                rest = rest.lstrip()
                if rest.startswith("{"):
                    for name in group_heads(braced(rest, 0)):
                        add(frm, reexport.get(name, name), line(pos))
                    return
                m = re.match(r"([A-Za-z_][A-Za-z0-9_]*)", rest)
                if m:
                    name = m.group(1)
                    add(frm, reexport.get(name, name), line(pos))

            for m in re.finditer(r"(?<![A-Za-z0-9_:])crate\s*::", text):
                head(text[m.end() : m.end() + 4000], m.start())
            for m in re.finditer(r"(?<![A-Za-z0-9_:])((?:super\s*::\s*)+)", text):
                climbs = m.group(1).count("super")
                # From module path [a, b], one `super` reaches a; two, the root.
                if climbs >= len(mpath):
                    head(text[m.end() : m.end() + 4000], m.start())

    print(f"modules of {src}: {', '.join(sorted(modules))}")
    for frm in sorted(modules):
        tos = edges.get(frm, {})
        print(f"  {frm} -> {', '.join(sorted(tos)) or '(nothing)'}")

    # Tarjan's strongly connected components.
    index, low, stack, on, sccs = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, {})):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            sccs.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(modules):
        if v not in index:
            visit(v)

    bad = False
    for comp in sccs:
        if len(comp) < 2:
            continue
        bad = True
        print(f"CYCLE among {', '.join(comp)}:")
        for frm in comp:
            for to, place in sorted(edges.get(frm, {}).items()):
                if to in comp:
                    print(f"    {frm} -> {to}  ({place})")
    for leaf in sorted(LEAVES & modules):
        for to, place in sorted(edges.get(leaf, {}).items()):
            bad = True
            print(f"LEAF {leaf} imports {to}  ({place})")
    if bad:
        return 1
    print("no import cycles")
    return 0


if __name__ == "__main__":
    sys.exit(main())
