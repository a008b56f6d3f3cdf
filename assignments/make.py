"""Writes the student edition of nanoMoA: a copy of the repo in which each region of code between
`# BEGIN ASSIGNMENT N: hint` and `# END ASSIGNMENT N` is replaced by
`raise NotImplementedError("Assignment N: hint")`, indented as the BEGIN line.

    python assignments/make.py --out_dir=../nanomoa-student                      # assignments 1 to 5 to do
    python assignments/make.py --out_dir=../nanomoa-student --assignments=3,4,5  # 1 and 2 handed out solved
    python assignments/make.py --out_dir=../nanomoa-student --assignments=all    # and the optional 6 (fast.py)
    python assignments/make.py --out_dir=../nanomoa-student --force              # write into a non-empty folder

The copy holds the files git would commit (tracked, or untracked and not ignored; without git: the
tree minus .git, out/, prepared data and virtual environments), minus the instructor's side (this script,
tests/test_assignments.py and the mutation check, tests/mutate.py). Marker lines never reach it: solved
regions keep their code, unmarked.
The handout is assignments/README.md; assignment N is graded by `python -m pytest -q tests -m assignmentN`.
"""

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
from config import UserError, parse_config, run  # noqa: E402  (needs the repo root on the path)

KIT = {
    "assignments/make.py",
    "assignments/mutants.py",
    "tests/test_assignments.py",  # the instructor's side: not
    "tests/mutate.py",
    "tests/mutants_core.py",
    "tests/test_mutants.py",
}  # in the student copy
REQUIRED, OPTIONAL = (1, 2, 3, 4, 5), (6,)  # 6: the speed paths of fast.py, an optional last chapter
BEGIN = re.compile(r"^(\s*)# BEGIN ASSIGNMENT (\d+): (.+)$")
END = re.compile(r"^\s*# END ASSIGNMENT (\d+)\s*$")


@dataclass
class KitConfig:
    out_dir: str = ""  # the folder to write the student copy into (outside this repo)
    assignments: str = ""  # comma-separated numbers to leave to the student (default 1-5; "all" adds 6)
    force: bool = False  # write into an existing, non-empty folder


def repo_files(root):
    """Paths, relative to root, of the files the student copy is made from: what git would commit, never a
    virtual environment (any folder holding a pyvenv.cfg, wherever it is and whatever its name)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\0")
        files = [p for p in listed if p and os.path.isfile(os.path.join(root, p))]  # skip deleted files
    except (OSError, subprocess.CalledProcessError):  # no git, or not a checkout
        files = []
        for folder, dirs, names in os.walk(root):
            rel = os.path.relpath(folder, root)
            dirs[:] = [
                d
                for d in dirs
                if rel != "data"
                and d not in (".git", "out", "__pycache__", ".pytest_cache")
                and not os.path.isfile(os.path.join(folder, d, "pyvenv.cfg"))
            ]  # data/<name>/: prepared data
            files += [os.path.normpath(os.path.join(rel, n)) for n in names if not n.endswith(".pyc")]
    venvs = tuple(os.path.dirname(p) + "/" for p in files if p.endswith("/pyvenv.cfg"))  # untracked, not ignored
    return sorted(p for p in files if not p.startswith(venvs))


def blank(text, path, todo=None):
    """text with each region of an assignment in `todo` (default: all) replaced by a raise
    -> (new text, [(assignment, line of its BEGIN)] of the regions replaced)."""
    out, regions, region = [], [], None  # region: (assignment, line of its BEGIN) while inside one
    for i, line in enumerate(text.splitlines(keepends=True), start=1):
        begin, end = BEGIN.match(line), END.match(line)
        if begin:
            if region:
                raise UserError(f"{path}:{i}: BEGIN inside the region opened at line {region[1]}; regions don't nest")
            region = (int(begin.group(2)), i)
            if todo is None or region[0] in todo:
                regions.append(region)
                message = f"Assignment {region[0]}: {begin.group(3).strip()}"
                out.append(f"{begin.group(1)}raise NotImplementedError({json.dumps(message, ensure_ascii=False)})\n")
        elif end:
            if not region or int(end.group(1)) != region[0]:
                raise UserError(f"{path}:{i}: END ASSIGNMENT {end.group(1)} has no matching BEGIN above it")
            region = None
        elif line.lstrip().startswith(("# BEGIN ASSIGNMENT", "# END ASSIGNMENT")):
            raise UserError(f"{path}:{i}: write markers as `# BEGIN ASSIGNMENT N: hint` and `# END ASSIGNMENT N`")
        elif region is None or region not in regions:  # outside a region, or in one kept solved
            out.append(line)
    if region:
        raise UserError(f"{path}:{region[1]}: BEGIN ASSIGNMENT {region[0]} has no END")
    return "".join(out), regions


def main(argv=None):
    """Writes the student copy; returns its blanked regions [(path, assignment, line of the BEGIN)]."""
    args = parse_config(KitConfig, argv or [])
    if not args.out_dir:
        raise UserError("say where to write the student copy: --out_dir=../nanomoa-student")
    out_dir = os.path.abspath(args.out_dir)
    if REPO_ROOT == out_dir or REPO_ROOT.startswith(out_dir + os.sep):
        raise UserError(f"{args.out_dir} holds the reference repo: choose a folder outside it, e.g. ../nanomoa-student")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not args.force:
        raise UserError(f"{args.out_dir} is not empty: choose a new folder, or add --force to write into it")
    try:
        todo = (
            set(REQUIRED + OPTIONAL)
            if args.assignments == "all"
            else {int(n) for n in args.assignments.split(",")}
            if args.assignments
            else set(REQUIRED)
        )
    except ValueError:
        raise UserError(f"--assignments={args.assignments}: write numbers separated by commas, e.g. 3,4,5") from None

    files = [p for p in repo_files(REPO_ROOT) if p not in KIT]
    texts, blanked = {}, []
    for path in (p for p in files if p.endswith(".py")):
        with open(os.path.join(REPO_ROOT, path), encoding="utf-8") as f:
            texts[path], regions = blank(f.read(), path, todo)
        try:
            ast.parse(texts[path], path)
        except SyntaxError as e:  # a region must be whole statements, so a raise can stand in for it
            raise UserError(f"{path}:{e.lineno}: the student copy does not parse ({e.msg}); move the markers") from None
        blanked += [(path, n, line) for n, line in regions]
    missing = todo - {n for _, n, _ in blanked}
    if missing:
        raise UserError(f"no region is marked for assignment {', '.join(map(str, sorted(missing)))}")

    for path in files:  # everything checked: now write
        target = os.path.join(out_dir, path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if path in texts:
            with open(target, "w", encoding="utf-8") as f:
                f.write(texts[path])
            shutil.copymode(os.path.join(REPO_ROOT, path), target)
        else:
            shutil.copy2(os.path.join(REPO_ROOT, path), target)
    done = sorted({n for _, n, _ in blanked})
    print(
        f"wrote {args.out_dir}: {len(files)} files; {len(blanked)} regions of assignments "
        f"{', '.join(map(str, done))} to implement (handout: assignments/README.md)"
    )
    return blanked


if __name__ == "__main__":
    run(main)
