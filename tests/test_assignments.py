"""The course kit (assignments/make.py): a student copy has every marked region replaced by a raise, still
imports and passes the tests that use no assignment, and fails the grading tests of an assignment left to do.

On the reference, the grading tests (`python -m pytest -q tests -m assignmentN`) run with the rest of the
suite and pass. The kit is left out of the student copy, so these tests only run on the reference.
"""

import ast
import os
import re
import subprocess
import sys

import pytest

from assignments.make import OPTIONAL, REQUIRED, blank, repo_files
from assignments.make import main as make_kit
from config import UserError
from conftest import ASSIGNMENTS, REPO_ROOT

# Every test marked assignmentN lives in these files; naming them spares each run collecting test_export.py,
# which imports transformers and peft (8 s).
GRADED = ["tests/test_lora.py", "tests/test_moa.py", "tests/test_adapt.py", "tests/test_fast.py"]
UNRELATED = [
    "tests/test_model.py",
    "tests/test_data.py",
    "tests/test_train.py",  # fast tests that need no assignment
    "-k",
    "not torchrun and not resume and not lowers and not cli_errors",
]


def run_in(folder, *args):
    """Runs `python *args` in folder on one thread -> the finished process."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_student_copy_blanks_every_region_and_still_runs(tmp_path):
    """The student copy (--assignments=all) has one raise per marked region of the reference, every .py parses, no
    marker or kit file is left, every script imports, and the tests that use no assignment pass; by default the
    optional assignment 6 stays solved."""
    out = tmp_path / "student"
    regions = make_kit([f"--out_dir={out}", "--assignments=all"])
    marked = 0
    for path in repo_files(REPO_ROOT):
        if path.endswith(".py"):
            with open(os.path.join(REPO_ROOT, path), encoding="utf-8") as f:
                marked += len(re.findall(r"^ *# BEGIN ASSIGNMENT \d+: ", f.read(), flags=re.MULTILINE))
    assert len(regions) == marked and {n for _, n, _ in regions} == set(ASSIGNMENTS) == set(REQUIRED + OPTIONAL)
    default = make_kit([f"--out_dir={tmp_path / 'default'}"])
    assert {n for _, n, _ in default} == set(REQUIRED)
    raises = 0
    for folder, _, names in os.walk(out):
        for name in (n for n in names if n.endswith(".py")):
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                text = f.read()
            ast.parse(text, name)
            assert not re.search(r"# (BEGIN|END) ASSIGNMENT", text), name
            raises += len(re.findall(r'^ *raise NotImplementedError\("Assignment \d+: ', text, flags=re.MULTILINE))
    assert raises == marked
    assert (out / "assignments" / "README.md").is_file()
    assert not (out / "assignments" / "make.py").exists() and not (out / "tests" / "test_assignments.py").exists()
    scripts = (
        "import moa, fast, files, model, evaluate, train_base, train_lora, train_router, sample, results, bench, "
        "export, demo"
    )
    imported = run_in(out, "-c", scripts)
    assert imported.returncode == 0, imported.stderr
    unrelated = run_in(out, "-m", "pytest", "-q", "-p", "no:cacheprovider", *UNRELATED)
    assert unrelated.returncode == 0, unrelated.stdout[-3000:]


@pytest.mark.parametrize("n", sorted(ASSIGNMENTS))
def test_grading_fails_without_the_assignment(n, tmp_path):
    """In a copy where only assignment n is left to do, its grading tests fail, on assignment n's raise."""
    make_kit([f"--out_dir={tmp_path}", f"--assignments={n}"])
    graded = run_in(tmp_path, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *GRADED, "-m", f"assignment{n}")
    assert graded.returncode == 1, graded.stdout[-3000:]
    assert f"NotImplementedError: Assignment {n}: " in graded.stdout, graded.stdout[-3000:]


def test_earlier_assignments_pass_without_later_ones(tmp_path):
    """With assignments 4, 5 and 6 left to do, the grading tests of 1 to 3 pass: training and evaluating a MoA never
    reaches the inference-time code of 4 (checked by hand for every n: 1 to n pass without n+1 to 6)."""
    make_kit([f"--out_dir={tmp_path}", "--assignments=4,5,6"])
    graded = run_in(
        tmp_path,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        *GRADED,
        "-m",
        "assignment1 or assignment2 or assignment3",
    )
    assert graded.returncode == 0, graded.stdout[-3000:]


def test_markers_must_pair_and_errors_are_one_line(tmp_path):
    """blank() replaces a region by a raise at its indentation, or keeps its code unmarked; a region without END, an
    END without BEGIN, nested regions and a BEGIN without a hint are errors naming file:line; make.py refuses a
    non-empty folder in one line, exit 1."""
    ok = "def f():\n    # BEGIN ASSIGNMENT 2: return one\n    return 1\n    # END ASSIGNMENT 2\n"
    assert blank(ok, "f.py") == ('def f():\n    raise NotImplementedError("Assignment 2: return one")\n', [(2, 2)])
    assert blank(ok, "f.py", todo={1}) == ("def f():\n    return 1\n", [])
    for bad, where in [
        (ok.replace("    # END ASSIGNMENT 2\n", ""), "f.py:2:"),
        (ok.replace("END ASSIGNMENT 2", "END ASSIGNMENT 3"), "f.py:4:"),
        (ok.replace("    return 1\n", "    # BEGIN ASSIGNMENT 2: again\n"), "f.py:3:"),
        (ok.replace(": return one", ""), "f.py:2:"),
    ]:
        with pytest.raises(UserError, match=where):
            blank(bad, "f.py")
    (tmp_path / "mine.txt").write_text("keep me")
    refused = run_in(REPO_ROOT, "assignments/make.py", f"--out_dir={tmp_path}")
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.startswith("error:") and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "not empty" in refused.stderr and os.listdir(tmp_path) == ["mine.txt"]
