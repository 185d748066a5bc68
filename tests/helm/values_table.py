#!/usr/bin/env python3
"""Regenerates the values table at the end of helm/persistentkv/README.md from values.yaml.

Each value documented in values.yaml with a `# -- text` comment (continued by the following
`#` lines) becomes one row: key, type, default, text. Run after editing values.yaml:
    python3 tests/helm/values_table.py            # rewrite README.md's table
    python3 tests/helm/values_table.py --check    # exit 1 when the table is stale
"""
import json
import os
import re
import sys

import yaml

CHART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "helm", "persistentkv")
HEADER = "| Key | Type | Default | Description |"


def table(values_path):
    with open(values_path) as f:
        text = f.read()
    values = yaml.safe_load(text)
    stack, comment, docs = [], None, {}
    for line in text.splitlines():
        m = re.match(r"^\s*# -- (.*)$", line)
        if m:
            comment = [m.group(1)]
            continue
        if line.strip().startswith("#"):
            if comment is not None:
                comment.append(line.strip()[1:].strip())
            continue
        m = re.match(r"^(\s*)([A-Za-z0-9_]+):", line)
        if m:
            stack = stack[: len(m.group(1)) // 2] + [m.group(2)]
            if comment is not None:
                docs[".".join(stack)] = " ".join(comment)
            comment = None
    rows = [HEADER, "|---|---|---|---|"]
    for key, doc in docs.items():
        v = values
        for part in key.split("."):
            v = v[part]
        kind = {bool: "bool", int: "int", float: "float", str: "string", list: "list", dict: "object"}[type(v)]
        default = json.dumps(v)
        if len(default) > 60 and isinstance(v, (dict, list)):
            default = "(see values.yaml)"
        else:
            default = "`" + default.replace("|", "\\|") + "`"
        rows.append("| `%s` | %s | %s | %s |" % (key, kind, default, doc.replace("|", "\\|")))
    return "\n".join(rows) + "\n"


def main():
    readme_path = os.path.join(CHART, "README.md")
    with open(readme_path) as f:
        readme = f.read()
    if HEADER not in readme:
        sys.exit(f"{readme_path}: no values table header '{HEADER}'")
    updated = readme[: readme.index(HEADER)] + table(os.path.join(CHART, "values.yaml"))
    if "--check" in sys.argv[1:]:
        if updated != readme:
            print("README.md values table is stale: run python3 tests/helm/values_table.py")
            return 1
        return 0
    with open(readme_path, "w") as f:
        f.write(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
