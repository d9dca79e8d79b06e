#!/usr/bin/env python3
"""The published crates' minimum Rust: every crate they build with (all
features, dev-dependencies aside) declares a rust-version no newer than the
workspace's. Clippy's incompatible_msrv checks our own code against it; this
checks what the lockfile brings. Reads `cargo metadata` on stdin."""
import json
import sys

PUBLISHED = {"gratify-core", "gratify-cache", "gratify-scaling", "gratify"}


def version(text):
    return tuple(int(x) for x in text.split(".")[:2]) if text else (0, 0)


meta = json.load(sys.stdin)
packages = {p["id"]: p for p in meta["packages"]}
nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
roots = [i for i in meta["workspace_members"] if packages[i]["name"] in PUBLISHED]
declared = {version(packages[i].get("rust_version")) for i in roots}
if len(declared) != 1:
    sys.exit(f"the published crates declare different minimum Rust versions: {declared}")
msrv = declared.pop()
seen, stack = set(), list(roots)
while stack:
    node = stack.pop()
    if node in seen:
        continue
    seen.add(node)
    for dep in nodes[node]["deps"]:
        if all(k["kind"] == "dev" for k in dep["dep_kinds"]):
            continue
        stack.append(dep["pkg"])
newer = sorted(
    f"{packages[i]['name']} {packages[i]['version']} needs {packages[i]['rust_version']}"
    for i in seen
    if version(packages[i].get("rust_version")) > msrv
)
if newer:
    sys.exit("crates newer than the declared minimum Rust " + ".".join(map(str, msrv)) + ":\n  " + "\n  ".join(newer))
print(f"{len(seen)} crates, none needing more than Rust {'.'.join(map(str, msrv))}")
