"""Storage: how nanoMoA writes and reads files, whatever they hold. Every write goes to a temporary file
that is renamed into place, so a crash never leaves half a file and what a killed run left behind is
cleared by the next write there (atomic_write); no output may replace an input (check_outputs); a
folder being trained into is locked (locked). Tensors are read and written by the `safetensors`
package (the format's own implementation) and checked finite; checkpoints are torch.save'd and read
with weights_only=True, so no pickled code is ever executed; JSON is checked when read. Whatever a
file gets wrong becomes a one-line UserError naming it. This file knows nothing of models: what the
files hold (experts, bundles, the base) is files.py.

Read next: files.py.
"""

import io
import json
import os
import re
import shutil
from contextlib import contextmanager

import torch

from config import UserError


def atomic_write(path, write, folder=False):
    """Calls write(tmp), then puts tmp in the place of path: readers see the old file (or folder) or
    the new one, never half of one. tmp is a file path, or with folder=True a fresh empty folder.
    A file-system fault (read-only, full, a folder in the way) is a UserError naming path."""
    path = os.path.normpath(path)
    tmp, old = f"{path}.tmp{os.getpid()}", f"{path}.old{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        clear_stale(os.path.dirname(os.path.abspath(path)), os.path.basename(path))
        if folder:
            os.makedirs(tmp)
        write(tmp)
        if folder and os.path.isdir(path):  # a folder is not replaced in one rename: the old one steps aside first
            os.replace(path, old)
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        for leftover in (tmp, old):
            remove(leftover)


def remove(path):
    """Deletes a file or a folder, if there."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def pid_alive(pid):
    """Whether process `pid` still runs: a lock or temporary file whose process is gone was left by a killed run."""
    if os.name == "nt":  # Windows has no harmless probe (os.kill ends the process): assume it runs
        return True
    try:
        os.kill(pid, 0)  # signal 0 only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def clear_stale(folder, name=None):
    """Removes what atomic_write calls of killed processes left in folder (of `name` only, if given):
    <name>.tmp<pid> half-written, and <name>.old<pid>, put back in place of <name> if <name> is missing (the kill
    came between the old one stepping aside and the new one moving in)."""
    for entry in sorted(os.listdir(folder)):
        stale = re.fullmatch(r"(.+)\.(tmp|old)(\d+)", entry)
        if not stale or (name is not None and stale[1] != name) or pid_alive(int(stale[3])):
            continue
        target = os.path.join(folder, stale[1])
        if stale[2] == "old" and not os.path.lexists(target):
            os.replace(os.path.join(folder, entry), target)
        else:
            remove(os.path.join(folder, entry))


@contextmanager
def locked(folder):
    """Holds folder/lock, holding this process's id, while a run writes into folder: a second run on the same
    folder refuses before it touches anything there. The lock of a killed run (its process gone) is taken over,
    and the temporary files it left are cleared."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "lock")
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # atomic: one of two runs creates it
            break
        except FileExistsError:
            try:
                with open(path, "rb") as f:
                    text = f.read().decode(errors="replace").strip()
            except FileNotFoundError:  # released meanwhile: try again
                continue
            owner = int(text) if text.isdigit() and int(text) > 0 else None
            if owner is None or pid_alive(owner):
                raise UserError(
                    f"{folder} is in use by process {owner or '(unknown)'}, whose lock is {path}: wait for "
                    f"that run to end, or delete the lock if no run is using {folder}"
                ) from None
            os.remove(path)  # its process is gone: a killed run's lock
    try:
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        clear_stale(folder)
        yield
    finally:
        if os.path.exists(path):
            os.remove(path)


def check_outputs(outputs, inputs):
    """No output (a file, or a folder that is replaced whole) is or holds one of the inputs, the paths compared
    after resolving links and "..": else a UserError, raised before anything is written."""
    for path in outputs:
        out = os.path.realpath(path)
        for given in inputs:
            if os.path.commonpath([out, os.path.realpath(given)]) == out:
                raise UserError(f"the output {path} would overwrite the input {given}: write it somewhere else")


def read_json(path):
    """The JSON object in the file at path; a missing, unreadable, non-UTF-8, empty or malformed file, or one that
    does not hold an object, is a UserError naming it."""
    if not os.path.isfile(path):
        raise UserError(f"{path} not found" if not os.path.exists(path) else f"{path} is not a file")
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, or nested too deeply
        raise UserError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} does not hold a JSON object")
    return value


def write_text(path, text):
    """Writes a text file (a results table, a JSON report) atomically."""

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def write_safetensors(path, tensors, metadata=None):
    """Writes {name: tensor} and metadata (values written as str) as a .safetensors file, atomically."""
    from safetensors.torch import save

    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    check_weights(tensors, f"not writing {path}", any_dtype=True)  # any tensor file; never a NaN or inf
    metadata = None if metadata is None else {str(k): str(v) for k, v in metadata.items()}
    data = save(tensors, metadata)  # in memory first: a full disk is then an OSError of our own write
    atomic_write(path, lambda tmp: write_bytes(tmp, data))


def write_bytes(path, data):
    with open(path, "wb") as f:
        f.write(data)


def check_weights(tensors, where, any_dtype=False):
    """Every tensor of {name: tensor} is floating-point (unless any_dtype) and finite, or a UserError naming `where`
    and the first that is not: an integer tensor would be cast silently on loading, and one NaN or inf weight makes
    every output NaN (a traceback in sampling, or NUL bytes at temperature 0), so neither is ever loaded or written."""
    for name, t in tensors.items():
        if not t.is_floating_point() and not any_dtype:
            raise UserError(f"{where}: {name} is {t.dtype}, not floating-point weights")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise UserError(f"{where}: {name} holds NaN or inf values")


def read_safetensors(path):
    """Reads a .safetensors file -> ({name: tensor}, metadata dict); anything malformed is a UserError."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise UserError(f"{path} not found" if not os.path.exists(path) else f"{path} is not a file")
    try:
        with safe_open(path, framework="pt") as f:  # the package checks every offset against the file's size
            return {name: f.get_tensor(name) for name in f.keys()}, f.metadata() or {}
    except Exception as e:  # SafetensorError, OSError, ...: one line naming the file
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot read {path} as safetensors: {reason}") from None


def save_checkpoint(path, state):
    """state: a dict of tensors, plain containers and JSON text (no objects to unpickle later)."""
    check_weights(state.get("model", {}), f"not writing {path}")
    buffer = io.BytesIO()
    torch.save(state, buffer)  # in memory first: a full disk is then an OSError of our own write, not torch's
    atomic_write(path, lambda tmp: write_bytes(tmp, buffer.getbuffer()))


def load_checkpoint(path):
    """Loads a checkpoint written by trainer.train (weights_only: no pickled code is executed): its "model"
    tensors by name and its "meta" JSON object, checked to be there."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} {'is not a file' if os.path.exists(path) else 'not found'}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        ckpt["meta"] = json.loads(ckpt["meta"])
    except Exception as e:
        raise UserError(f"checkpoint {path} is corrupt or not a nanoMoA checkpoint ({type(e).__name__})") from None
    model = ckpt.get("model")
    if (
        not isinstance(ckpt["meta"], dict)
        or not isinstance(model, dict)
        or not all(isinstance(t, torch.Tensor) for t in model.values())
    ):
        raise UserError(f"checkpoint {path} is not a nanoMoA checkpoint: no meta object or no model tensors")
    check_weights(model, f"checkpoint {path}")
    return ckpt
