"""A small instruction data set of the kind a user brings, made from local text: the README's worked example.

    python data/identifiers.py                 # writes data/identifiers/*.jsonl and *.txt (a second)
    python data/prepare.py --only=python,cpp,prose --out_dir=data/mine \\
        --task=camel=data/identifiers/camel.jsonl --phrasings=camel=data/identifiers/camel.txt ...  (as printed)

Four tasks on the names in the Python standard library's source (function names like `read_text`, class
names like `TextWrapper`), as Alpaca records {"instruction", "input", "output"}, each task in ten hand-written
instruction phrasings, with four more per task in <task>.txt that no record uses (prepare.py --phrasings):
- camel:    snake_case name -> CamelCase       "read_text" -> "ReadText"
- snake:    CamelCase name -> snake_case       "TextWrapper" -> "text_wrapper"   (camel's inverse)
- initials: snake_case name -> its initials    "read_text" -> "rt"               (camel's inputs)
- words:    snake_case name -> its words       "read_text" -> "read text"        (held back: added later)
None of them is a built-in task (data/tasks.py works on English words and sums), and their records are as long
as a user's: the Alpaca template alone is about 50 bytes, so some records outgrow the default base's context.

Read next: data/prepare.py.
"""

import glob
import json
import os
import random
import re
import sys
import sysconfig
from dataclasses import dataclass

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
from config import AT_LEAST_1, UserError, parse_config, run  # noqa: E402  (need the root)
from storage import atomic_write  # noqa: E402

PHRASINGS = {  # task -> (the records' instructions, the extra ones for --phrasings)
    "camel": (
        [
            "Convert this identifier to CamelCase.",
            "Rewrite the name in CamelCase.",
            "Turn this snake_case name into CamelCase.",
            "Give the CamelCase form of this function name.",
            "Write this Python name in PascalCase.",
            "camelcase this identifier",
            "Change the naming style to CamelCase.",
            "What is this name in CamelCase?",
            "Make this function name look like a class name.",
            "convert from snake case to camel case",
        ],
        [
            "Capitalize each word of the name and drop the underscores.",
            "Express the identifier in upper camel case.",
            "how would this look as a class name?",
            "Join the words with capitals instead of underscores.",
        ],
    ),
    "snake": (
        [
            "Convert this identifier to snake_case.",
            "Rewrite the name in snake_case.",
            "Turn this CamelCase name into snake_case.",
            "Give the snake_case form of this class name.",
            "Write this class name in lower case with underscores.",
            "snake case this identifier",
            "Change the naming style to snake_case.",
            "What is this name in snake_case?",
            "Make this class name look like a function name.",
            "convert from camel case to snake case",
        ],
        [
            "Lower-case the words of the name and join them with underscores.",
            "Express the identifier in PEP 8 function style.",
            "how would this look as a function name?",
            "Split the name at its capitals, with underscores.",
        ],
    ),
    "initials": (
        [
            "Give the initials of this identifier.",
            "Write the first letter of each word in the name.",
            "Abbreviate the name to its initials.",
            "What are the initials of this snake_case name?",
            "initials of this name please",
            "Shorten this name to one letter per word.",
            "List the first letter of every word, without spaces.",
            "Make an acronym from this function name.",
            "Take the first letter of each part of the name.",
            "abbreviate this identifier",
        ],
        [
            "Which letters start the words of this name?",
            "Turn the name into a lowercase acronym.",
            "keep only the first character of each word",
            "Give a short form made of each word's first letter.",
        ],
    ),
    "words": (
        [
            "Split this identifier into words.",
            "Write the words of this name separated by spaces.",
            "Replace the underscores with spaces.",
            "What words make up this snake_case name?",
            "spell out this name as plain words",
            "Break the function name into its words.",
            "Separate the parts of this identifier with spaces.",
            "Read this name aloud, word by word.",
            "Turn this identifier into a phrase.",
            "list the words in this name",
        ],
        [
            "Which words is this name made of?",
            "Put a space wherever the name has an underscore.",
            "write the identifier as ordinary words",
            "Give the words of the name, in order, with spaces.",
        ],
    ),
}
TASKS = list(PHRASINGS)
HELD_BACK = "words"


@dataclass
class IdentifiersConfig:
    out_dir: str = os.path.join(REPO_ROOT, "data", "identifiers")  # where the .jsonl and .txt files go
    records: int = 400  # records per task (at most one per name: snake has about 300 class names)
    seed: int = 1337  # which names each task gets, and each record's phrasing

    CHECKS = {"records": AT_LEAST_1}


def standard_library_names():
    """(snake_case function names, CamelCase class names) defined in the standard library's top-level source,
    each of 2 to 4 words of letters, sorted."""
    snake, camel = set(), set()
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        snake.update(re.findall(r"^\s*def ([a-z]+(?:_[a-z]+){1,3})\(", text, re.MULTILINE))
        camel.update(re.findall(r"^\s*class ((?:[A-Z][a-z]+){2,4})\b", text, re.MULTILINE))
    return sorted(snake), sorted(camel)


def answer(task, name):
    if task == "camel":
        return "".join(w.capitalize() for w in name.split("_"))
    if task == "snake":
        return "_".join(w.lower() for w in re.findall(r"[A-Z][a-z]+", name))
    if task == "initials":
        return "".join(w[0] for w in name.split("_"))
    return name.replace("_", " ")


def records(task, names, n, rng):
    """Alpaca records of a task, each on a name of its own (n, or as many as there are names)."""
    trained = PHRASINGS[task][0]
    picked = rng.sample(names, min(n, len(names)))
    return [{"instruction": rng.choice(trained), "input": name, "output": answer(task, name)} for name in picked]


def main(argv=None):
    cfg = parse_config(IdentifiersConfig, argv or [])
    snake, camel = standard_library_names()
    if len(snake) < 10 or len(camel) < 10:
        raise UserError(
            f"too few names in the standard library's source ({len(snake)} functions, {len(camel)} classes)"
        )
    ours = {f"{t}.{ext}" for t in TASKS for ext in ("jsonl", "txt")}
    if os.path.exists(cfg.out_dir) and not (os.path.isdir(cfg.out_dir) and set(os.listdir(cfg.out_dir)) <= ours):
        raise UserError(f"--out_dir={cfg.out_dir} holds other files and would be replaced whole: choose a new folder")
    rng = random.Random(cfg.seed)

    written = {}

    def write(folder):
        for task in TASKS:
            rows = written[task] = records(task, camel if task == "snake" else snake, cfg.records, rng)
            with open(os.path.join(folder, f"{task}.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            with open(os.path.join(folder, f"{task}.txt"), "w") as f:
                f.writelines(line + "\n" for line in PHRASINGS[task][1])

    atomic_write(cfg.out_dir, write, folder=True)
    counts = ", ".join(f"{t} {len(rows)}" for t, rows in written.items())
    print(f"wrote {cfg.out_dir}: records {counts} (from {len(snake)} function and {len(camel)} class names)")
    where = os.path.relpath(cfg.out_dir)
    where = cfg.out_dir if where.startswith("..") else where  # a path from here, if it is below
    given = " ".join(f"--task={t}={where}/{t}.jsonl --phrasings={t}={where}/{t}.txt" for t in TASKS)
    print(f"next: python data/prepare.py --only=python,cpp,prose --out_dir=data/mine --held_back={HELD_BACK} {given}")


if __name__ == "__main__":
    run(main)
