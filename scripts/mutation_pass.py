"""Do the tests notice when the code is wrong? A mutation pass over one module.

  python scripts/mutation_pass.py mvdpp_core/cameras.py -- tests/test_cameras.py tests/test_geometry.py
  python scripts/mutation_pass.py train/diagnostics.py --lines 195-360 -- tests/test_diagnostics.py -k hull

Each mutant changes one thing in the module (a comparison flipped or loosened, ``+`` for ``-``,
``*`` for ``/``, ``and`` for ``or``, a minus sign or ``not`` dropped, a number moved, ``True`` for
``False``) and runs the given pytest arguments against it, stopping at the first failure. A
mutant the tests pass is a *survivor*: printed as one JSON line with the module's line and the
expression before and after. Some survivors are equivalent (``dim=-1`` for ``dim=1`` on a 2-D
tensor, a clamp that never binds) and need no test; the others name a property no test checks.
The last line is the summary (sites, killed, survived, timed out, seconds).

The module is mutated in a copy of the repository's tracked files (a temporary folder), never in
the working tree, and with the copy first on ``PYTHONPATH``. Mutants are written with
``ast.unparse``, so comments go and the module's lines move: survivors are reported at the
original line. Needs nothing beyond the test environment.
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SWAPS: dict[type, type] = {
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
    ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In,
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Mult,
    ast.Pow: ast.Mult, ast.And: ast.Or, ast.Or: ast.And,
}
Trail = tuple[tuple[str, int | None], ...]  # the field path from the module to a node


def _walk(node: ast.AST, trail: Trail = ()) -> Iterator[tuple[ast.AST, Trail]]:
    """Every node with its path, skipping annotations (they do not run) and f-strings (messages)."""
    yield node, trail
    for name, value in ast.iter_fields(node):
        if name in ("annotation", "returns") or isinstance(node, ast.JoinedStr):
            continue
        for i, child in enumerate(value) if isinstance(value, list) else [(None, value)]:
            if isinstance(child, ast.AST):
                yield from _walk(child, (*trail, (name, i)))


def _at(tree: ast.AST, trail: Trail) -> ast.AST:
    for name, i in trail:
        tree = getattr(tree, name) if i is None else getattr(tree, name)[i]
    return tree


def sites(tree: ast.Module, lines: tuple[int, int] | None = None) -> list[tuple[Trail, str, int]]:
    """(path, kind, operand index) of every mutation this pass makes in ``tree``."""
    found = []
    for node, trail in _walk(tree):
        line = getattr(node, "lineno", None)
        if lines and (line is None or not lines[0] <= line <= lines[1]):
            continue
        if isinstance(node, ast.Compare):
            found += [(trail, "compare", k) for k, op in enumerate(node.ops) if type(op) in SWAPS]
        elif isinstance(node, (ast.BinOp, ast.AugAssign, ast.BoolOp)) and type(node.op) in SWAPS:
            found.append((trail, "operator", 0))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
            found.append((trail, "drop", 0))
        elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
            found.append((trail, "bool", 0))
        elif isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            found.append((trail, "number", 0))
    return found


def mutant(tree: ast.Module, trail: Trail, kind: str, k: int) -> tuple[str, str]:
    """(the mutated module's source, the mutated expression)."""
    tree = copy.deepcopy(tree)
    node = _at(tree, trail)
    if kind == "compare":
        node.ops[k] = SWAPS[type(node.ops[k])]()
    elif kind == "operator":
        node.op = SWAPS[type(node.op)]()
    elif kind == "drop":  # -x -> x, not x -> x
        parent, (name, i) = _at(tree, trail[:-1]), trail[-1]
        if i is None:
            setattr(parent, name, node.operand)
        else:
            getattr(parent, name)[i] = node.operand
        node = node.operand
    elif kind == "bool":
        node.value = not node.value
    else:  # a number: 0 <-> 1, any other int + 1, a float doubled (0.0 -> 1.0)
        v = node.value
        node.value = (1 if v == 0 else v + 1) if isinstance(v, int) else (v * 2 if v else 1.0)
    return ast.unparse(ast.fix_missing_locations(tree)), ast.unparse(node)


def copy_repository(dest: Path) -> None:
    """The repository's tracked files (the whole tree less .git where git is not available)."""
    try:
        names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        for name in filter(None, names.decode().split("\0")):
            if (ROOT / name).is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, dest / name)
    except (OSError, subprocess.CalledProcessError):
        shutil.copytree(ROOT, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".git", "__pycache__"))


def run_tests(copy_root: Path, pytest_args: list[str], timeout: float) -> str:
    """'passed', 'failed' or 'timeout'."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(copy_root), os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *pytest_args],
                              cwd=copy_root, env=env, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout"
    return "passed" if proc.returncode == 0 else "failed"


def parse_lines(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split("-"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lines {text!r}: give a range like 100-140") from None
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"--lines {text!r}: give FIRST-LAST with 1 <= FIRST <= LAST")
    return lo, hi


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description="Mutate one module and report the mutants its tests pass.",
                                usage="%(prog)s MODULE [--lines A-B] [--timeout S] -- PYTEST_ARGS...")
    p.add_argument("module", type=Path, help="a Python file of this repository, e.g. mvdpp_core/cameras.py")
    p.add_argument("--lines", type=parse_lines, help="only mutate lines FIRST-LAST of the module")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds per test run; a mutant past it counts as killed (and timed out)")
    args = p.parse_args(argv[:split])
    pytest_args = argv[split + 1:]
    if not pytest_args:
        p.error("give the tests after --, e.g. -- tests/test_cameras.py")
    module = (ROOT / args.module).resolve()  # an absolute path stays itself
    if not module.is_file() or module.suffix != ".py" or ROOT not in module.parents:
        p.error(f"module {args.module}: give a .py file inside {ROOT}")
    source = module.read_text()
    tree = ast.parse(source)
    found = sites(tree, args.lines)
    counts = {"sites": len(found), "killed": 0, "survived": 0, "timed_out": 0}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        copy_root = Path(tmp)
        copy_repository(copy_root)
        target = copy_root / module.relative_to(ROOT)
        target.write_text(ast.unparse(tree))  # the unmutated module as the mutants are written
        if (baseline := run_tests(copy_root, pytest_args, args.timeout)) != "passed":
            raise SystemExit(f"error: the tests do not pass on the unmutated module ({baseline}); fix that first.")
        lines = source.splitlines()
        for trail, kind, k in found:
            text, after = mutant(tree, trail, kind, k)
            target.write_text(text)
            outcome = run_tests(copy_root, pytest_args, args.timeout)
            if outcome == "passed":
                counts["survived"] += 1
                node = _at(tree, trail)
                print(json.dumps({"line": node.lineno, "kind": kind, "before": ast.unparse(node), "after": after,
                                  "source": lines[node.lineno - 1].strip()}), flush=True)
            else:
                counts["killed"] += 1
                counts["timed_out"] += outcome == "timeout"
    print(json.dumps({"module": str(module.relative_to(ROOT)), **counts,
                      "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
