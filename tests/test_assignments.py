"""The course kit in a student's hands: assignments/make.py writes a student copy, and the handout's commands
(assignments/README.md), read from the handout and run as written there, do what it says.

One student copy per session, written by the handout's command. In it, before the first assignment, the
"before you start" tests pass; then, assignment by assignment as a student goes, the grading command fails while
the assignment is left to do (every one of its tests on that assignment's raise, with the later ones still to do)
and passes once it is filled in, here with the reference's code. Also: what make.py writes, its flags and errors.

The kit is left out of the student copy, so these tests only run on the reference, where the grading tests also
run with the rest of the suite.
"""

import ast
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from assignments.make import BEGIN, KIT, OPTIONAL, REQUIRED, KitConfig, blank, repo_files
from assignments.make import main as make_kit
from config import UserError, parse_config
from conftest import ASSIGNMENTS, REPO_ROOT

with open(os.path.join(REPO_ROOT, "assignments", "README.md"), encoding="utf-8") as f:
    HANDOUT = f.read()


def handout_command(comment):
    """The command on the handout's line whose comment starts with `comment`, split as the shell splits it, without
    the leading `python`."""
    for line in HANDOUT.splitlines():
        command, _, note = line.partition("  #")
        if note.strip().startswith(comment):
            argv = shlex.split(command)
            assert argv[0] == "python", line
            return argv[1:]
    raise AssertionError(f"no command of the handout is commented '# {comment}...'")


def grading_command(n):
    """The handout's grading command of assignment n: "grades assignment 1; likewise 2 to 6"."""
    argv = handout_command("grades assignment 1; likewise 2 to 6")
    assert argv[-2:] == ["-m", "assignment1"], argv
    return argv[:-1] + [f"assignment{n}"]


def run_in(folder, *args):
    """Runs `python *args` in folder on one thread -> the finished process."""
    return run_all([(folder, args)])[0]


def run_all(jobs):
    """Runs each (folder, args) of jobs as `python *args` in its folder, all at once, each on one thread -> the
    finished processes, in order. No bytecode is cached (the tests rewrite moa.py between runs, within a second)
    and the terminal is wide enough for pytest's summary to show each failure's whole message."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", "COLUMNS": "400"}
    procs = [
        subprocess.Popen(
            [sys.executable, *args], cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for folder, args in jobs
    ]
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def marked_files():
    """{path: text} of the reference's files that hold assignment regions (the kit's own files aside)."""
    found = {}
    for path in repo_files(REPO_ROOT):
        if path.endswith(".py") and path not in KIT:
            with open(os.path.join(REPO_ROOT, path), encoding="utf-8") as f:
                text = f.read()
            if any(BEGIN.match(line) for line in text.splitlines()):
                found[path] = text
    return found


def solve(folder, todo):
    """Leaves the assignments in `todo` to do in the student copy at folder, and fills in every other one with the
    reference's code, as a student who has done it has it."""
    for path, text in marked_files().items():
        with open(os.path.join(folder, path), "w", encoding="utf-8") as f:
            f.write(blank(text, path, todo)[0])


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """The folder of a student copy written by the handout's command for the student edition."""
    folder = tmp_path_factory.mktemp("kit") / "nanomoa-student"
    argv = handout_command("the student edition, 1 to 5 to do")
    made = run_in(REPO_ROOT, *[f"--out_dir={folder}" if a.startswith("--out_dir=") else a for a in argv])
    assert made.returncode == 0, made.stderr
    return folder


def test_before_you_start_the_given_tests_pass(student):
    """With every assignment still to do, the handout's "before you start" command passes."""
    solve(student, set(ASSIGNMENTS))
    result = run_in(student, *handout_command("before you start"))
    assert result.returncode == 0, result.stdout[-3000:]


@pytest.mark.parametrize("n", sorted(ASSIGNMENTS))
def test_grading_fails_while_to_do_and_passes_once_done(student, n, tmp_path):
    """In the student copy, assignment n's grading command fails while n and every later assignment are still to do:
    collection works, and every one of its tests fails on assignment n's NotImplementedError (none needs a later
    one); with n filled in, the same command passes, as many tests."""
    done = tmp_path / "done"  # the same copy with n filled in, graded beside it (one thread each)
    shutil.copytree(student, done)
    solve(student, {k for k in ASSIGNMENTS if k >= n})
    solve(done, {k for k in ASSIGNMENTS if k > n})
    failing, passing = run_all([(student, grading_command(n)), (done, grading_command(n))])
    assert failing.returncode == 1, failing.stdout[-3000:]  # 1: tests failed (2: a collection error, 5: no test)
    outcomes = [line for line in failing.stdout.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    wrong = [line for line in outcomes if f" - NotImplementedError: Assignment {n}: " not in line]
    assert outcomes and not wrong, "\n".join(wrong)
    assert passing.returncode == 0, passing.stdout[-3000:]
    assert re.search(r"\b(\d+) passed", passing.stdout).group(1) == str(len(outcomes)), passing.stdout[-300:]


def test_student_copy_blanks_every_region_and_still_runs(tmp_path):
    """The student copy (--assignments=all) has one raise per marked region of the reference, every .py parses, no
    marker or kit file is left, and every script imports; by default the optional assignment 6 stays solved."""
    out = tmp_path / "student"
    regions = make_kit([f"--out_dir={out}", "--assignments=all"])
    texts = marked_files().values()
    marked = sum(len(re.findall(r"^ *# BEGIN ASSIGNMENT \d+: ", t, flags=re.MULTILINE)) for t in texts)
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
    assert not any((out / path).exists() for path in KIT)
    scripts = (
        "import moa, fast, files, model, evaluate, train_base, train_lora, train_router, sample, results, bench, "
        "export, demo"
    )
    imported = run_in(out, "-c", scripts)
    assert imported.returncode == 0, imported.stderr


def test_shipped_tests_import_nothing_of_the_kit():
    """No file of the student copy imports a module the copy lacks (make.py, the mutant lists, the mutation check,
    these tests), at its top or inside a function, where collection would not see it."""
    kit_modules = {os.path.splitext(path)[0].replace("/", ".") for path in KIT}
    kit_modules |= {m.rsplit(".", 1)[1] for m in kit_modules if m.startswith("tests.")}  # tests/ is on the path
    for path in repo_files(REPO_ROOT):
        if path.endswith(".py") and path not in KIT:
            with open(os.path.join(REPO_ROOT, path), encoding="utf-8") as f:
                tree = ast.parse(f.read(), path)
            for node in ast.walk(tree):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                assert not kit_modules & set(names), f"{path}:{node.lineno} imports {kit_modules & set(names)}"


def test_kit_flags_are_checked():
    """make.py's flags are checked as every script's are (tests/test_flags.py, which ships in the student copy, checks
    the others): its defaults pass, each bound names one of its fields, and --force=maybe is a one-line UserError
    naming the flag."""
    parse_config(KitConfig, [])
    assert set(vars(KitConfig).get("CHECKS", {})) <= set(KitConfig.__dataclass_fields__)
    with pytest.raises(UserError, match="--force=") as e:
        parse_config(KitConfig, ["--force=maybe"])
    assert "\n" not in str(e.value)


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
