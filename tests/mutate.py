"""The mutation check: does the suite fail when the code is wrong?

    python tests/mutate.py                                   # every mutant of tests/mutants_core.py (~45 min, 2 cores)
    python tests/mutate.py --only trainer-unshifted-targets,kvcache-growth-forgets
    python tests/mutate.py --list assignments/mutants.py     # the course kit's: wrong and correct variants
    python tests/mutate.py --tests="tests --ignore=tests/test_assignments.py"   # one selection for every mutant

A list module holds MUTANTS, each a plausible wrong variant of the code (a `Mutant`): a file, an
exact snippet `find` that must occur there exactly once, its `replace`, and the pytest arguments
that should catch it (default: the whole suite). Each mutant is patched into a fresh temporary copy
of the repo (the files git would commit: tracked, or untracked and not ignored), where
`python -m pytest -q -x -p no:cacheprovider <tests>` runs on one thread: the mutant is caught when
that run fails. A Mutant with correct=True is the other way round: a correct alternative (an
einsum for a matmul, a loop), which the tests must accept. First the unpatched copy runs each
distinct test selection once, which must pass. Prints a table and "caught N of M"; exits 1 if a
wrong variant survived, a correct one was rejected, or a variant did not apply.

Read next: tests/mutants_core.py, the list for the core (model, trainer, data, evaluation, export).
"""

import argparse
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
from assignments.make import repo_files  # noqa: E402  (the files git would commit: one definition, the kit's)

PYTEST = ["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
WHOLE_SUITE = ("tests",)


@dataclass(frozen=True)
class Mutant:
    id: str  # short and unique, e.g. "trainer-unshifted-targets"
    what: str  # the bug in one line, as a reader would describe it
    file: str  # relative to the repo root
    find: str  # exact text that occurs exactly once in file
    replace: str
    tests: tuple = ()  # pytest arguments that must catch it; empty: the whole suite
    correct: bool = False  # a correct alternative: the tests must pass on it


def load_mutants(path):
    """The MUTANTS of the list module at path (a file, relative to the current folder or the repo root)."""
    if not os.path.isfile(path):
        path = os.path.join(REPO_ROOT, path)
    spec = importlib.util.spec_from_file_location("mutant_list", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MUTANTS


def patched(mutant, root):
    """The text of mutant.file under root with the mutant applied -> (text, None), or (None, why it cannot apply)."""
    path = os.path.join(root, mutant.file)
    if not os.path.isfile(path):
        return None, f"{mutant.file} not found"
    with open(path, encoding="utf-8") as f:
        text = f.read()
    count = text.count(mutant.find)
    if count != 1:
        return None, f"find occurs {count} times in {mutant.file}, not once"
    if mutant.replace == mutant.find:
        return None, "replace equals find"
    text = text.replace(mutant.find, mutant.replace)
    if path.endswith(".py"):
        try:
            compile(text, path, "exec")
        except SyntaxError as e:
            return None, f"the patched {mutant.file} is not valid Python (line {e.lineno})"
    return text, None


def copy_repo(src, dst):
    for rel in repo_files(src):
        os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
        shutil.copy2(os.path.join(src, rel), os.path.join(dst, rel))


def run_tests(folder, tests, timeout, mutant_id=""):
    """Runs pytest in folder -> ("passed" | "failed" | "timeout" | "broken", its last output line)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", "NANOMOA_MUTANT": mutant_id}
    try:
        result = subprocess.run(
            [sys.executable, *PYTEST, *tests], cwd=folder, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return "timeout", f"no result after {timeout} s"
    last = (result.stdout.strip().splitlines() or result.stderr.strip().splitlines() or [""])[-1]
    if result.returncode in (4, 5):  # a usage error, or no test collected: the selection is wrong
        return "broken", last
    return ("passed" if result.returncode == 0 else "failed"), last


def main(argv=None):
    p = argparse.ArgumentParser(description="Patches each mutant into a copy of the repo; the tests must fail on each.")
    p.add_argument("--list", default="tests/mutants_core.py", help="the list module (a .py file holding MUTANTS)")
    p.add_argument("--only", default="", help="comma-separated mutant ids (default: all)")
    p.add_argument("--tests", default="", help="pytest arguments for every mutant, replacing each one's own")
    p.add_argument("--root", default=REPO_ROOT, help="the tree to copy and mutate (default: this repo)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per pytest run; a timeout counts as caught")
    args = p.parse_args(argv)
    mutants = load_mutants(args.list)
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - {m.id for m in mutants})
        if unknown:
            sys.exit(f"error: no mutant named {', '.join(unknown)} in {args.list}")
        mutants = [m for m in mutants if m.id in wanted]
    override = tuple(shlex.split(args.tests))
    selection = {m.id: override or tuple(m.tests) or WHOLE_SUITE for m in mutants}

    with tempfile.TemporaryDirectory(prefix="mutate-") as tmp:
        pristine = os.path.join(tmp, "pristine")
        copy_repo(args.root, pristine)
        for tests in dict.fromkeys(selection.values()):  # the unpatched code must pass every selection
            status, last = run_tests(pristine, tests, args.timeout)
            print(f"unmutated: {status:8} pytest {' '.join(tests)}: {last}", flush=True)
            if status != "passed":
                sys.exit("error: the tests fail without any mutant; fix that first")
        rows = []
        for i, m in enumerate(mutants):
            t0 = time.time()
            text, why = patched(m, pristine)
            if why:
                status, last = "broken", why
            else:
                folder = os.path.join(tmp, f"mutant{i}")
                shutil.copytree(pristine, folder)
                with open(os.path.join(folder, m.file), "w", encoding="utf-8") as f:
                    f.write(text)
                status, last = run_tests(folder, selection[m.id], args.timeout, m.id)
                shutil.rmtree(folder)
                verdicts = (
                    {"failed": "REJECTED", "timeout": "REJECTED", "passed": "accepted"}
                    if m.correct
                    else {"failed": "caught", "timeout": "caught", "passed": "SURVIVED"}
                )
                status = verdicts.get(status, status)
            rows.append((m, status))
            why = f"\n{'':16}{last}" if status == "broken" else ""
            print(f"{status:8} {time.time() - t0:5.0f}s  {m.id:32} {m.what}{why}", flush=True)

    wrong, right = [r for r in rows if not r[0].correct], [r for r in rows if r[0].correct]
    print(
        f"\ncaught {sum(s == 'caught' for _, s in wrong)} of {len(wrong)}"
        + (f"; accepted {sum(s == 'accepted' for _, s in right)} of {len(right)} correct variants" if right else "")
    )
    for label in ("SURVIVED", "REJECTED", "broken"):
        ids = [m.id for m, s in rows if s == label]
        if ids:
            print(f"{label.lower()}: {', '.join(ids)}")
    return 0 if all(s in ("caught", "accepted") for _, s in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
