"""`scripts/mutation_pass.py`: the instrument that asks whether the tests notice wrong code."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from scripts import mutation_pass

REPO = Path(__file__).resolve().parents[1]


def test_each_operator_makes_one_mutant_and_leaves_messages_alone():
    source = ('def f(x, n=0):\n    """doc 2"""\n    if x <= 1 and not n:\n        return -x * 2.5\n'
              '    raise ValueError(f"x={x + 1}")\n')
    tree = ast.parse(source)
    def made(lines=None):
        return sorted(mutation_pass.mutant(tree, *site)[1] for site in mutation_pass.sites(tree, lines))

    assert made() == sorted(["1", "x < 1", "2", "x <= 1 or not n", "n", "-x / 2.5", "x", "5.0"])
    assert made((4, 4)) == sorted(["-x / 2.5", "x", "5.0"])
    assert ast.unparse(tree) == ast.unparse(ast.parse(source)), "mutants are made on a copy"
    text, _ = mutation_pass.mutant(tree, *mutation_pass.sites(tree, (4, 4))[0])
    assert "return -x / 2.5" in text and "x <= 1 and (not n)" in text


@pytest.mark.slow
def test_a_guard_no_selected_test_reaches_survives_and_a_used_line_is_killed(tmp_path):
    """On `intrinsics` with only the field-of-view test: the default height (used) is checked,
    the size guard (never reached by it) is not; the module in the working tree stays as it was."""
    module = REPO / "mvdpp_core" / "cameras.py"
    before = module.read_text()
    guard = next(i for i, line in enumerate(before.splitlines(), 1) if "if width <= 0 or height <= 0" in line)
    proc = subprocess.run([sys.executable, "scripts/mutation_pass.py", "mvdpp_core/cameras.py", "--lines",
                           f"{guard - 1}-{guard}", "--", "tests/test_cameras.py", "-k", "fov_is_60"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    *survivors, summary = [json.loads(line) for line in proc.stdout.splitlines()]
    assert summary["sites"] == 6 and summary["killed"] == 1 and summary["survived"] == 5, summary
    assert {s["line"] for s in survivors} == {guard}
    assert {"before": "width <= 0 or height <= 0", "after": "width <= 0 and height <= 0"}.items() <= \
        next(s for s in survivors if s["kind"] == "operator").items()
    assert module.read_text() == before
