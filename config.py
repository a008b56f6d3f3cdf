"""How every nanoMoA script takes its settings and reports a user's mistake.

Each script declares its settings as a dataclass with typed defaults. `parse_config` fills one from
JSON config files (applied in order) and then `--key=value` flags (`--flag` alone switches a bool
on; a `list` field takes its flag once per item). An unknown key or a value of the wrong type is an
error that lists the valid keys. Every number must be finite (no nan or inf) and every int fit in 64 bits;
a class may also bound its fields in a `CHECKS = {field: bound}` mapping (AT_LEAST_1, FRACTION, one_of(...)
below), enforced once everything is parsed, before a script writes or deletes anything.
`run(main)` is how a script starts: a `UserError` (a mistake the user can fix: a bad flag, a missing file)
prints as one line `error: ...` and exits with status 1, and so does an OSError (a read-only folder, a full
disk, a folder where a file should be), naming its file. It also picks how many CPU threads torch uses
(`cpu_threads`).

Read next: model.py.
"""

import inspect
import json
import math
import os
import re
import sys
import time
from dataclasses import fields


class UserError(Exception):
    """A mistake the user can fix (a bad flag, a missing file...): printed as one line, exit status 1."""


def cpu_threads():
    """CPU threads for torch: OMP_NUM_THREADS if set, else one per core that is free now (the cores less those
    busy, at least one). On a 2-core machine that another job keeps busy, two OpenMP threads that spin while
    waiting for each other made every step 1.6-2x as slow as one thread, while on a quiet machine two threads
    take 0.57-0.61x of one's time (`python scripts/threads.py`; the README's "Threads")."""
    given = os.environ.get("OMP_NUM_THREADS", "")
    if given:
        return omp_threads(given)
    return max(1, (os.cpu_count() or 1) - round(busy_cores()))


def busy_cores(seconds=0.1):
    """The cores other processes keep busy now: the machine's busy share over `seconds` (Linux's /proc/stat),
    times its cores. Elsewhere the 1-minute load average, which lags: a job that just ended still counts."""

    def ticks():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # all, and idle + waiting for I/O

    try:
        (all0, idle0), _, (all1, idle1) = ticks(), time.sleep(seconds), ticks()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / max(all1 - all0, 1))


def omp_threads(given):
    """OMP_NUM_THREADS, checked: a whole number from 1 to the machine's cores (torch crashes on 100000 threads, and
    more threads than cores only wait for each other)."""
    cores = os.cpu_count() or 1
    if not (given.isascii() and given.isdigit() and 1 <= int(given) <= cores):
        raise UserError(f"OMP_NUM_THREADS={given!r}: use a whole number of threads from 1 to the {cores} cores here")
    return int(given)


def run(main):
    """Runs main(sys.argv[1:]) on cpu_threads() threads and turns a UserError into `error: ...` on stderr with
    exit status 1."""
    import torch  # here, not at the top: data/prepare.py needs torch only for its C++ source

    try:
        torch.set_num_threads(cpu_threads())
        main(sys.argv[1:])
    except UserError as e:
        print(one_line(f"error: {e}"), file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # the file system's faults: read-only, full, a folder where a file should be...
        where = f"{e.filename}: " if e.filename else ""
        print(one_line(f"error: {where}{e.strerror or e}"), file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is intact; continue with --init_from=resume", file=sys.stderr)
        sys.exit(130)


def one_line(message):
    """The message on one line: a newline inside it (a file name may hold one) is written as \\n."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


# Bounds a config class may give its fields, as CHECKS = {field: bound}: (what the value must be, its test).
AT_LEAST_0 = (">= 0", lambda v: v >= 0)
AT_LEAST_1 = (">= 1", lambda v: v >= 1)  # sizes, steps, intervals, counts
POSITIVE = ("> 0", lambda v: v > 0)  # learning rates
PROBABILITY = ("in [0, 1]", lambda v: 0 <= v <= 1)
FRACTION = ("in [0, 1)", lambda v: 0 <= v < 1)  # dropout rates, Adam's betas


def one_of(*choices):
    return ("one of " + ", ".join(map(str, choices)), lambda v: v in choices)


NAME = re.compile(r"[A-Za-z0-9_-]+")  # a domain's, task's or corpus source's name: it names folders and files


def is_name(value):
    """A name that can be a folder's: letters, digits, _ and - only (no "/", "..", space or control character)."""
    return isinstance(value, str) and NAME.fullmatch(value) is not None


A_NAME = ("a name of letters, digits, _ and - (it names files)", lambda v: v == "" or is_name(v))  # "": not given
NAMES = (
    "names of letters, digits, _ and -, separated by commas",
    lambda v: all(is_name(n.strip()) for n in v.split(",") if n.strip()),
)
FILE_NAME = (  # an output's --name: a file in out_dir, never a path out of it
    "a file name of letters, digits, _, -, + and . that does not start with .",
    lambda v: v == "" or re.fullmatch(r"[A-Za-z0-9_+-][A-Za-z0-9_.+-]*", v) is not None,
)


def memory_bytes():
    """Bytes of memory a new job may take on this machine now: MemAvailable of /proc/meminfo (Linux), else all of
    the physical memory; None where neither can be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_memory(need, flags):
    """A UserError naming `flags` when `need` bytes, a lower bound of what they make a script allocate, are more than
    the machine has free: said before anything is allocated, not as a MemoryError minutes later, or the kernel's
    out-of-memory killer ending other jobs first."""
    have = memory_bytes()
    if have is not None and need > have:
        raise UserError(f"{flags} need at least {size(need)} of memory, more than the {size(have)} free here: use less")


def size(n):
    """Bytes as a reader wants them: 3.2 GiB, 512.0 MiB."""
    return f"{n / 2**30:,.1f} GiB" if n >= 2**29 else f"{n / 2**20:,.1f} MiB"


def setting(key, value, source):
    """A setting as an error names it: the flag as the user wrote it, or the key and value of a config file."""
    value = value if str(value).isprintable() else repr(value)  # a newline in a value must not break the line
    return f"--{key}={value}" if source == "the command line" else f"{key}={value!r} in {source}"


def parse_value(text, kind, key, source="the command line"):
    """A flag's text -> a value of the field's type (bool, int, float, str; a list item is a str)."""
    if kind is bool:
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise UserError(f"{setting(key, text, source)}: expected a bool (True/False)")
    if kind is list:
        return text
    try:
        return kind(text)
    except ValueError:
        raise UserError(f"{setting(key, text, source)}: expected {kind.__name__}") from None


def parse_config(cls, argv):
    """Builds cls() from argv: JSON config files (in order), then --key=value overrides (--flag for True).
    --help (or -h) prints every flag (help_text) and exits."""
    if "--help" in argv or "-h" in argv:
        print(help_text(cls))
        sys.exit(0)
    cfg = cls()
    kinds = {f.name: f.type for f in fields(cls)}
    given = set()  # list fields given on the command line: their first item replaces the default
    sources = {}  # key -> where its value came from, for the bound checks' messages

    def assign(key, value, source):
        if key not in kinds:
            raise UserError(f"unknown config key {key!r} in {source}; valid keys: {', '.join(kinds)}")
        kind = kinds[key]
        if kind is list and isinstance(value, str):  # one item of a list, from a flag
            value = (getattr(cfg, key) if key in given else []) + [value]
            given.add(key)
        elif isinstance(value, str):
            value = parse_value(value, kind, key, source)
        elif kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is list and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise UserError(f"{key}={value!r} in {source}: expected a list of strings")
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise UserError(f"{key}={value!r} in {source}: expected {kind.__name__}")
        setattr(cfg, key, value)
        sources[key] = source

    for arg in [a for a in argv if not a.startswith("--")]:  # files first, so flags always win
        try:
            with open(arg, encoding="utf-8") as f:
                overrides = json.load(f)
        except (OSError, ValueError, RecursionError) as e:  # RecursionError: JSON nested too deeply
            raise UserError(f"cannot read config file {arg}: {e}") from None
        if not isinstance(overrides, dict):
            raise UserError(f"config file {arg} must hold a JSON object of key: value")
        for key, value in overrides.items():
            assign(key, value, arg)
    for arg in [a for a in argv if a.startswith("--")]:
        key, eq, value = arg[2:].partition("=")
        if key not in kinds:
            raise UserError(f"unknown config key {key!r} on the command line; valid keys: {', '.join(kinds)}")
        if not eq and kinds[key] is bool:
            value = "true"  # a bare --flag switches a bool on
        elif not eq:
            raise UserError(f"{arg}: write --{key}=VALUE")
        assign(key, value, "the command line")
    check_bounds(cfg, sources)
    return cfg


def help_text(cls):
    """Every flag of a config dataclass: its default, its type and the comment written beside its field (in the
    class, or the class it extends), read from the source, so the dataclass is the one place they are written."""
    comments = {}
    for klass in reversed(cls.__mro__):
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):  # a class without source (object)
            continue
        for i, line in enumerate(lines):
            field = re.match(r"\s+(\w+): \w+ = .*?(?:  # (.*))?$", line)
            if field and field[2]:
                more = []
                for follow in lines[i + 1 :]:  # a comment carried on to the lines below the field
                    carried = re.match(r"\s+# (.*)$", follow)
                    if not carried:
                        break
                    more.append(carried[1])
                comments[field[1]] = " ".join([field[2], *more])
    doc = (sys.modules[cls.__module__].__doc__ or cls.__name__).strip().splitlines()[0]
    out = [doc, "", "Flags (--key=value; --flag alone switches a bool on; JSON config files as arguments too):"]
    for f in fields(cls):
        flag = f"  --{f.name}={getattr(cls(), f.name)}"
        out.append(f"{flag:<34} {f.type.__name__:<6}{comments.get(f.name, '')}".rstrip())
    return "\n".join(out)


def check_bounds(cfg, sources):
    """Every float finite, every int within 64 bits, and each field within the bound its class's CHECKS gives it
    (a subclass's CHECKS add to and override its bases')."""
    checks = {}
    for klass in reversed(type(cfg).__mro__):
        checks.update(vars(klass).get("CHECKS", {}))
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.type is float and not math.isfinite(value):
            what = "a finite number"
        elif f.type is int and not -(2**63) <= value < 2**63:
            what = "an integer of at most 64 bits"
        elif f.name in checks and not checks[f.name][1](value):
            what = checks[f.name][0]
        else:
            continue
        raise UserError(f"{setting(f.name, value, sources.get(f.name, 'the defaults'))}: must be {what}")
