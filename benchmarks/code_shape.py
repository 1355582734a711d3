"""How the orchestration code reads, in numbers: lines per file, the longest functions and
classes, and the calls dispatched by a method-name string.

    python benchmarks/code_shape.py [--rev REV] [--out benchmarks/results/code-shape.json]

``--rev`` measures a git revision (read with ``git show``, nothing checked out) instead of the
working tree, so a before/after table comes from one command each. A string-dispatched call is
``.call("name", ...)`` or ``.remote("name", ...)`` with a literal method name: the calls no
editor or type checker can follow to their method.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The orchestration files of issue 18, and the package as a whole.
FOCUS = ("sftrl/trainer.py", "sftrl/run.py", "sftrl/configtools.py", "sftrl/config.py", "sftrl/cli.py")


def sources(rev: str | None) -> dict[str, str]:
    if rev is None:
        return {str(p.relative_to(REPO)): p.read_text() for p in sorted((REPO / "sftrl").rglob("*.py"))}
    names = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, "sftrl"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split()
    return {n: subprocess.run(["git", "show", f"{rev}:{n}"], cwd=REPO, check=True, capture_output=True,
                              text=True).stdout for n in names if n.endswith(".py")}


def measure(path: str, text: str) -> dict:
    tree = ast.parse(text)
    functions, classes, dispatched = [], [], []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            functions.append((node.end_lineno - node.lineno + 1, node.name))
        elif isinstance(node, ast.ClassDef):
            methods = sum(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in node.body)
            classes.append((node.end_lineno - node.lineno + 1, node.name, methods))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("call", "remote") and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            dispatched.append(node.args[0].value)
    longest_f = max(functions, default=(0, ""))
    longest_c = max(classes, default=(0, "", 0))
    return {
        "lines": len(text.splitlines()),
        "longest_function": {"name": longest_f[1], "lines": longest_f[0]},
        "longest_class": {"name": longest_c[1], "lines": longest_c[0], "methods": longest_c[2]},
        "string_dispatched_calls": dispatched,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", help="a git revision (default: the working tree)")
    parser.add_argument("--out", help="write JSON here")
    args = parser.parse_args()
    files = {path: measure(path, text) for path, text in sources(args.rev).items()}
    total = {
        "files": len(files),
        "lines": sum(f["lines"] for f in files.values()),
        "string_dispatched_calls": sum(len(f["string_dispatched_calls"]) for f in files.values()),
        "string_dispatched_outside_handles": sum(
            len(f["string_dispatched_calls"]) for p, f in files.items()
            if not p.endswith(("handles.py", "distributed/system.py"))),
    }
    result = {"rev": args.rev or "working tree", "total": total, "files": files}
    print(f"{'file':<34} {'lines':>6}  {'longest function':<38} {'longest class':<34} {'str calls':>9}")
    for path, f in files.items():
        if path in FOCUS or f["lines"] >= 250 or f["string_dispatched_calls"]:
            lf, lc = f["longest_function"], f["longest_class"]
            print(f"{path:<34} {f['lines']:>6}  {lf['name'][:28]:<28} {lf['lines']:>6}    "
                  f"{lc['name'][:22]:<22} {lc['lines']:>5}/{lc['methods']:<3} {len(f['string_dispatched_calls']):>9}")
    print(f"total: {total}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
