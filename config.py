"""How every nanoMoA script takes its settings and reports a user's mistake.

Each script declares its settings as a dataclass with typed defaults. `parse_config` fills one from
JSON config files (applied in order) and then `--key=value` flags (`--flag` alone switches a bool
on; a `list` field takes its flag once per item). An unknown key or a value of the wrong type is an
error that lists the valid keys. `run(main)` is how a script starts: a `UserError` (a mistake the
user can fix: a bad flag, a missing file) prints as one line `error: ...` and exits with status 1.
It also picks how many CPU threads torch uses (`cpu_threads`).

Read next: model.py.
"""

import json
import os
import sys
from dataclasses import fields


class UserError(Exception):
    """A mistake the user can fix (a bad flag, a missing file...): printed as one line, exit status 1."""


def cpu_threads():
    """CPU threads for torch: OMP_NUM_THREADS if set, else one per core that is free now (the cores less the
    load average, at least one). On a 2-core machine that another job keeps busy, two OpenMP threads that spin
    while waiting for each other made every step several times slower; one thread loses little on a quiet
    machine at nanoMoA's sizes (the README's "Speed" has both measured)."""
    given = os.environ.get("OMP_NUM_THREADS", "")
    if given.isdigit() and int(given) > 0:
        return int(given)
    return max(1, (os.cpu_count() or 1) - round(os.getloadavg()[0]))


def run(main):
    """Runs main(sys.argv[1:]) on cpu_threads() threads and turns a UserError into `error: ...` on stderr with
    exit status 1."""
    import torch  # here, not at the top: data/prepare.py needs torch only for its C++ source

    torch.set_num_threads(cpu_threads())
    try:
        main(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is intact; continue with --init_from=resume", file=sys.stderr)
        sys.exit(130)


def parse_value(text, kind, key):
    """A flag's text -> a value of the field's type (bool, int, float, str; a list item is a str)."""
    if kind is bool:
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise UserError(f"--{key}={text}: expected a bool (True/False)")
    if kind is list:
        return text
    try:
        return kind(text)
    except ValueError:
        raise UserError(f"--{key}={text}: expected {kind.__name__}") from None


def parse_config(cls, argv):
    """Builds cls() from argv: JSON config files (in order), then --key=value overrides (--flag for True)."""
    cfg = cls()
    kinds = {f.name: f.type for f in fields(cls)}
    given = set()  # list fields given on the command line: their first item replaces the default

    def assign(key, value, source):
        if key not in kinds:
            raise UserError(f"unknown config key {key!r} in {source}; valid keys: {', '.join(kinds)}")
        kind = kinds[key]
        if kind is list and isinstance(value, str):  # one item of a list, from a flag
            value = (getattr(cfg, key) if key in given else []) + [value]
            given.add(key)
        elif isinstance(value, str):
            value = parse_value(value, kind, key)
        elif kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is list and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise UserError(f"{key}={value!r} in {source}: expected a list of strings")
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise UserError(f"{key}={value!r} in {source}: expected {kind.__name__}")
        setattr(cfg, key, value)

    for arg in [a for a in argv if not a.startswith("--")]:  # files first, so flags always win
        try:
            with open(arg) as f:
                overrides = json.load(f)
        except (OSError, ValueError) as e:
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
    return cfg

