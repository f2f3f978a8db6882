"""The package's shape, measured from its syntax tree (issue 29's yardsticks).

    python benchmarks/code_shape.py            # table; writes benchmarks/results/code_shape.json
    python benchmarks/code_shape.py --quiet    # only the summary line

Reports modules over 600 lines, functions over 80 lines and functions over 8 parameters
(``self``/``cls`` not counted, ``*args``/``**kwargs`` counted once each), and the private names of
the package that the tests touch (``monkeypatch.setattr(module, "_name", ...)`` or ``module._name``).
"""

from __future__ import annotations

import argparse
import ast
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "svision_big"
MAX_MODULE, MAX_FUNCTION, MAX_PARAMS = 600, 80, 8


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = fn.args
    names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
    n = len([p for p in names if p not in ("self", "cls")])
    return n + (a.vararg is not None) + (a.kwarg is not None)


def measure() -> dict:
    modules, functions = [], []
    for path in sorted(PKG.rglob("*.py")):
        text = path.read_text()
        rel = str(path.relative_to(ROOT))
        modules.append({"module": rel, "lines": len(text.splitlines())})
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append(
                    {
                        "function": f"{rel}:{node.name}",
                        "lines": node.end_lineno - node.lineno + 1,
                        "params": _params(node),
                    }
                )
    private = set()
    for path in sorted((ROOT / "tests").glob("*.py")):
        text = path.read_text()
        private |= set(re.findall(r"\b(?:[a-z_]+)\._[a-zA-Z]\w*", text))
        private |= {f"setattr:{m}" for m in re.findall(r"setattr\([^,]+,\s*\"(_\w+)\"", text)}
    private = {p for p in private if not p.split(".")[-1].startswith("__")}
    return {
        "modules": sorted(modules, key=lambda m: -m["lines"]),
        "long_modules": [m for m in modules if m["lines"] > MAX_MODULE],
        "long_functions": sorted([f for f in functions if f["lines"] > MAX_FUNCTION], key=lambda f: -f["lines"]),
        "many_params": sorted([f for f in functions if f["params"] > MAX_PARAMS], key=lambda f: -f["params"]),
        "private_names_in_tests": sorted(private),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "code_shape.json"))
    args = p.parse_args()
    m = measure()
    if not args.quiet:
        print(f"modules over {MAX_MODULE} lines:")
        for r in m["long_modules"]:
            print(f"  {r['lines']:5d}  {r['module']}")
        print(f"functions over {MAX_FUNCTION} lines:")
        for r in m["long_functions"]:
            print(f"  {r['lines']:5d}  {r['function']}")
        print(f"functions over {MAX_PARAMS} parameters:")
        for r in m["many_params"]:
            print(f"  {r['params']:5d}  {r['function']}")
        print(f"private names the tests touch: {len(m['private_names_in_tests'])}")
    total = sum(r["lines"] for r in m["modules"])
    print(
        f"{len(m['modules'])} modules, {total} lines; {len(m['long_modules'])} over {MAX_MODULE} lines, "
        f"{len(m['long_functions'])} functions over {MAX_FUNCTION} lines, {len(m['many_params'])} over "
        f"{MAX_PARAMS} parameters, {len(m['private_names_in_tests'])} private names in tests"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(m, indent=1) + "\n")


if __name__ == "__main__":
    main()
