"""The mutation check (tests/mutate.py) itself: the core's list applies to today's code, outside the course's
assignment regions, and the runner reports caught, surviving and broken mutants as it should.

The check proper (every mutant caught) takes about 45 minutes: `python tests/mutate.py`, not run here.
"""

import os

import pytest

import mutate
from assignments.make import BEGIN, END
from conftest import REPO_ROOT


def assignment_regions(text):
    """(first line, last line) of each `# BEGIN ASSIGNMENT N` ... `# END ASSIGNMENT N` region of text."""
    regions, start = [], None
    for number, line in enumerate(text.splitlines(), start=1):
        if BEGIN.match(line):
            start = number
        elif END.match(line):
            regions.append((start, number))
    return regions


def test_core_mutants_apply_outside_the_assignment_regions():
    """Every mutant of tests/mutants_core.py has its own id, a one-line description, test files that exist, and a
    find that occurs exactly once in its file, outside every assignment region, and whose patch still parses."""
    if os.environ.get("NANOMOA_MUTANT"):
        pytest.skip("inside a mutation run one find has been replaced on purpose")
    mutants = mutate.load_mutants(os.path.join(REPO_ROOT, "tests", "mutants_core.py"))
    assert len(mutants) >= 40 and len({m.id for m in mutants}) == len(mutants)
    for m in mutants:
        assert m.what and "\n" not in m.what, m.id
        for previous, arg in zip(("",) + tuple(m.tests), m.tests):
            if not arg.startswith("-") and previous != "-k":
                assert os.path.exists(os.path.join(REPO_ROOT, arg.split("::")[0])), (m.id, arg)
        text, why = mutate.patched(m, REPO_ROOT)
        assert why is None, f"{m.id}: {why}"
        with open(os.path.join(REPO_ROOT, m.file), encoding="utf-8") as f:
            original = f.read()
        first = original[: original.index(m.find)].count("\n") + 1
        last = first + m.find.count("\n")
        for begin, end in assignment_regions(original):
            assert last < begin or first > end, f"{m.id} changes {m.file}:{first}, inside the region at {begin}-{end}"


def test_assignment_variants_apply_inside_their_regions():
    """Every variant of assignments/mutants.py (wrong answers and correct alternatives) has its own id, is graded by
    its assignment's tests (-m assignmentN), and changes only lines inside a region of that assignment."""
    if os.environ.get("NANOMOA_MUTANT"):
        pytest.skip("inside a mutation run one find has been replaced on purpose")
    variants = mutate.load_mutants(os.path.join(REPO_ROOT, "assignments", "mutants.py"))
    assert len({m.id for m in variants}) == len(variants) and sum(m.correct for m in variants) >= 5
    for m in variants:
        n = int(m.id[1])  # "a3-..." belongs to assignment 3
        assert m.tests[-2:] == ("-m", f"assignment{n}"), m.id
        assert mutate.patched(m, REPO_ROOT)[1] is None, m.id
        with open(os.path.join(REPO_ROOT, m.file), encoding="utf-8") as f:
            original = f.read()
        first = original[: original.index(m.find)].count("\n") + 1
        last = first + m.find.rstrip("\n").count("\n")  # a find ending with a newline ends on its own line
        regions = [
            (b, e)
            for b, e in assignment_regions(original)
            if f"# BEGIN ASSIGNMENT {n}:" in original.splitlines()[b - 1]
        ]
        assert any(b < first and last < e for b, e in regions), f"{m.id}: lines {first}-{last} of {m.file}"


TOY_MUTANTS = '''from mutate import Mutant

MUTANTS = [
    Mutant("subtracts", "add subtracts", "calc.py", "a + b", "a - b", ("tests/test_calc.py",)),
    Mutant("commutes", "add adds in the other order: the same function", "calc.py", "a + b", "b + a"),
    Mutant("gone", "a find that is not in the file", "calc.py", "a * b", "a / b"),
]
'''


def test_runner_reports_caught_survived_and_broken(tmp_path, capsys):
    """On a toy repo, a mutant the tests notice is caught, one they cannot notice survives, one whose find is
    missing is broken; the run exits 1 unless every selected mutant is caught."""
    (tmp_path / "tests").mkdir()
    (tmp_path / "calc.py").write_text("def add(a, b):\n    return a + b\n")
    (tmp_path / "tests" / "test_calc.py").write_text(
        "from calc import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n"
    )
    (tmp_path / "mutants.py").write_text(TOY_MUTANTS)
    toy = ["--root", str(tmp_path), "--list", str(tmp_path / "mutants.py"), "--timeout", "120"]
    assert mutate.main(toy) == 1
    printed = capsys.readouterr().out
    assert "caught 1 of 3" in printed and "survived: commutes" in printed and "broken: gone" in printed
    assert mutate.main(toy + ["--only", "subtracts"]) == 0
    assert "caught 1 of 1" in capsys.readouterr().out
