"""Files: expert and bundle files, training checkpoints and the base model, written atomically and
checked when read. A first reading can skip this file: the method is in moa.py.

- Expert file (train_lora.py): one expert's A and B beside every adapted linear map, as .safetensors,
  named by the layer ("transformer.h.0.attn.c_attn.lora_A"), with JSON metadata under the key
  "nanomoa": kind "expert", domain, rank, alpha, targets, tokenizer, and the base's fingerprint.
- Bundle (train_router.py): every expert, the routers and the domain names in one .safetensors file.
- Checkpoint (trainer.py): the trainable weights, the optimizer and the loss scale, torch.save'd
  and read with weights_only=True, so no pickled code is ever executed.
- The base: a train_base.py checkpoint, or GPT-2 weights (a hub name, or a local folder).

Tensor files are read and written by the `safetensors` package (the format's own implementation);
whatever it refuses becomes a one-line UserError naming the file. Metadata is type-checked, and its
sizes checked against the stored tensors, before any model is built from it: a file cannot make us
allocate more than it holds. Every write goes to a temporary file first and is renamed into place: a
crash never leaves half a file, and what a killed run left behind is cleared by the next write there.
No output may replace an input (check_outputs), and a folder being trained into is locked (locked).

Read next: trainer.py.
"""

import hashlib
import io
import json
import math
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import asdict, fields

import torch

from config import UserError, is_name
from moa import ROUTER_INPUTS, TARGETS, LoRALinear, MoA, add_experts, lora_layers, set_route
from model import GPT, GPTConfig

# ----------------------------------------------------------------------------------------------
# Writing atomically, locking a run's folder, checking outputs against inputs


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


# ----------------------------------------------------------------------------------------------
# Reading and writing tensors


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


# ----------------------------------------------------------------------------------------------
# Checkpoints


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


# ----------------------------------------------------------------------------------------------
# The base


def fingerprint(model):
    """Identifies a base model: its config and a SHA-256 of its frozen weights (names without LoRA wrappers)."""
    assert all(layer.merged is None for layer in lora_layers(model)), "unmerge before fingerprinting"
    gpt = model.gpt if isinstance(model, MoA) else model
    digest = hashlib.sha256()
    for name, t in sorted(gpt.state_dict().items()):
        if "lora_" in name:
            continue
        digest.update(name.replace(".base.", ".").encode())
        digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return {"config": asdict(gpt.config), "sha256": digest.hexdigest()}


def base_checkpoint(path):
    """The checkpoint file of --base=path if it names a train_base.py checkpoint (ckpt.pt, or its folder), else None."""
    if path.endswith(".pt") or os.path.isfile(os.path.join(path, "ckpt.pt")):
        return path if path.endswith(".pt") else os.path.join(path, "ckpt.pt")
    return None


def base_files(path):
    """The files load_base(path) reads (for check_outputs): a checkpoint, or a GPT-2 folder's (none for a hub name)."""
    if base_checkpoint(path):
        return [base_checkpoint(path)]
    return (
        [os.path.join(path, f) for f in ("config.json", "model.safetensors", "pytorch_model.bin")]
        if os.path.isdir(path)
        else []
    )


def load_base(path):
    """The frozen base for later stages: a train_base.py checkpoint (ckpt.pt or its folder), or GPT-2
    weights (a hub name or a local folder). Returns (model, tokenizer name)."""
    ckpt_path = base_checkpoint(path)
    if ckpt_path:
        ckpt = load_checkpoint(ckpt_path)
        if ckpt["meta"].get("kind") != "base":
            raise UserError(f"{ckpt_path} is not a base checkpoint (kind: {ckpt['meta'].get('kind')})")
        if not isinstance(ckpt["meta"].get("tokenizer"), str):
            raise UserError(f"{ckpt_path} names no tokenizer: not a checkpoint written by train_base.py")
        model = GPT(gpt_config(ckpt["meta"].get("model"), ckpt["model"], ckpt_path))
        try:
            keys = model.load_state_dict(ckpt["model"], strict=False)
        except RuntimeError as e:  # a tensor of another shape
            raise UserError(f"{ckpt_path} does not match its own config: {str(e).splitlines()[-1].strip()}") from None
        if keys.missing_keys != ["lm_head.weight"]:  # lm_head is tied to wte, saved once
            raise UserError(f"{ckpt_path} does not match its own config: missing {keys.missing_keys[:3]}")
        if keys.unexpected_keys:  # e.g. biases in the file of a config with bias=False: they would be dropped
            raise UserError(f"{ckpt_path} does not match its own config: it holds {keys.unexpected_keys[0]}")
        return model, ckpt["meta"]["tokenizer"]
    try:
        return GPT.from_pretrained(path), path if os.path.isdir(path) else "gpt2"
    except ValueError as e:
        raise UserError(str(e)) from None


def gpt_config(values, tensors, where):
    """GPTConfig(**values) for values read from a file (a checkpoint's config, GPT-2's config.json), checked before
    any model is built from them: every field there and of its type, heads that divide the width, one block per
    block of the file, and no more parameters than the file's tensors hold: a file cannot make us allocate more
    than it holds."""
    names = [f.name for f in fields(GPTConfig)]
    if not isinstance(values, dict) or sorted(values) != sorted(names):
        raise UserError(f"{where}: its model config must have exactly the keys {', '.join(names)}")
    kinds = {
        "dropout": ("a number in [0, 1)", lambda v: is_number(v) and 0 <= v < 1),
        "bias": ("a bool", lambda v: isinstance(v, bool)),
    }
    for key in names:
        what, ok = kinds.get(key, ("an integer >= 1", is_size))
        if not ok(values[key]):
            raise UserError(f"{where}: {key} must be {what}, got {values[key]!r}")
    if values["n_embd"] % values["n_head"]:
        raise UserError(f"{where}: n_embd={values['n_embd']} is not a multiple of n_head={values['n_head']}")
    blocks = {int(m[1]) for m in (re.match(r"(?:transformer\.)?h\.(\d+)\.", name) for name in tensors) if m}
    if len(blocks) != values["n_layer"] or max(blocks, default=-1) != values["n_layer"] - 1:  # blocks 0..n_layer-1
        raise UserError(f"{where}: its config says {values['n_layer']} blocks, its weights hold {len(blocks)}")
    config = GPTConfig(**values)
    with torch.device("meta"):  # shapes only: nothing is allocated
        wanted = GPT(config).num_params()
    held = sum(t.numel() for t in tensors.values())
    if wanted > held:
        raise UserError(f"{where}: its config needs {wanted:,} parameters, its weights hold {held:,}")
    return config


def read_hf_weights(folder):
    """The tensors of a Hugging Face checkpoint folder, as a dict name -> tensor."""
    st, pt = os.path.join(folder, "model.safetensors"), os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(st):
        return read_safetensors(st)[0]
    if os.path.isfile(pt):
        try:
            state = torch.load(pt, map_location="cpu", weights_only=True)  # no pickled code is executed
        except Exception as e:
            raise UserError(f"cannot read {pt}: corrupt, or not a PyTorch state dict ({type(e).__name__})") from None
        if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
            raise UserError(f"{pt} does not hold a dict of tensors")
        return state
    raise ValueError(f"{folder} has neither model.safetensors nor pytorch_model.bin")


# ----------------------------------------------------------------------------------------------
# Expert files and bundles


def expert_tensors(model, k):
    """Expert k of every LoRALinear -> {"transformer.h.0.attn.c_attn.lora_A": (r, in), ...}."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            name = name.removeprefix("gpt.")
            out[f"{name}.lora_A"], out[f"{name}.lora_B"] = m.lora_A[k].detach(), m.lora_B[k].detach()
    return out


def expert_targets(model):
    """The linear maps that carry experts, e.g. ["attn.c_attn", "mlp.c_fc"], in TARGETS' order."""
    names = [n.removeprefix("gpt.") for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    return sorted(
        {n.split(".", 3)[3] for n in names}, key=TARGETS.index
    )  # "transformer.h.0.attn.c_attn" -> "attn.c_attn"


def expert_meta(model, tokenizer, base):
    """What every expert and bundle file says about its experts and the base they belong to."""
    layer = lora_layers(model)[0]
    return {
        "rank": layer.rank,
        "alpha": layer.alpha,
        "targets": expert_targets(model),
        "tokenizer": tokenizer,
        "base": base,
    }


def save_expert(path, model, k, domain, tokenizer, base, extra=None):
    """Writes expert k of `model` as one .safetensors file; `base` is the base's fingerprint."""
    meta = {"kind": "expert", "domain": domain, **expert_meta(model, tokenizer, base), **(extra or {})}
    write_safetensors(path, expert_tensors(model, k), {"nanomoa": json.dumps(meta)})


def save_bundle(path, moa, tokenizer, base, extra=None):
    """Writes every expert, the routers and the domain names of `moa` as one .safetensors file."""
    meta = {
        "kind": "bundle",
        "domains": moa.domains,
        "pooling": moa.pooling,
        "router_input": moa.router_input,
        "temperature": moa.temperature,
        **expert_meta(moa, tokenizer, base),
        **(extra or {}),
    }
    if "top_k" in meta:  # experts per token: top_k of fewer experts (one domain, or some removed) is all of them
        meta["top_k"] = min(meta["top_k"], len(moa.domains))
    tensors = {name: p for name, p in moa.named_parameters() if "lora_" in name or name.startswith("routers.")}
    write_safetensors(path, tensors, {"nanomoa": json.dumps(meta)})


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_size(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


META_CHECKS = {  # key -> (what it must be, the check), for both kinds of file
    "rank": ("an integer >= 1", is_size),
    "alpha": ("a finite number", is_number),
    "targets": (
        f"a non-empty list of {', '.join(TARGETS)}",
        lambda v: isinstance(v, list) and v and all(t in TARGETS for t in v) and len(set(v)) == len(v),
    ),
    "tokenizer": ("a string", lambda v: isinstance(v, str)),
    "base": (
        "a fingerprint {config, sha256}",
        lambda v: isinstance(v, dict) and isinstance(v.get("config"), dict) and isinstance(v.get("sha256"), str),
    ),
}
KIND_CHECKS = {
    "expert": {"domain": ("a name of letters, digits, _ and -", is_name)},
    "bundle": {
        "domains": (  # export.py makes a folder of each name: never a path out of --out
            "a list of distinct names of letters, digits, _ and -",
            lambda v: isinstance(v, list) and v and all(map(is_name, v)) and len(set(v)) == len(v),
        ),
        "pooling": ("mean or last", lambda v: v in ("mean", "last")),
        "router_input": ("block or base", lambda v: v in ROUTER_INPUTS),
        "temperature": ("a positive number", lambda v: is_number(v) and v > 0),
    },
}
OPTIONAL = {"temperature": 1.0, "router_input": "block"}  # what older bundles lack: uncalibrated, routers on blocks
OPTIONAL_CHECKS = {  # keys some files have (train_router.py's settings, training records seen...)
    "top_k": ("an integer >= 1", is_size),
    "eta": ("a number >= 0", lambda v: is_number(v) and v >= 0),
    "mode": ("label, token or layer", lambda v: v in ("label", "token", "layer")),  # the routing it trained with
    "samples": ("an integer >= 0", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
    "steps": ("an integer >= 0", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
}


def read_meta(path, kind, gpt=None):
    """Reads an expert or bundle file -> (tensors, metadata), its metadata checked key by key; given the GPT it is
    for, also its tensors (check_tensors), so that the metadata can size a model."""
    tensors, meta = read_safetensors(path)
    if "nanomoa" not in meta:
        raise UserError(f"{path} has no nanoMoA metadata: not an expert or bundle written by nanoMoA")
    try:
        meta = json.loads(meta["nanomoa"])
    except (ValueError, RecursionError):
        raise UserError(f"{path}: its nanoMoA metadata is not valid JSON") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path}: its nanoMoA metadata is not a JSON object")
    if meta.get("kind") != kind:
        raise UserError(
            f"{path} is a {meta.get('kind')!r} file, not an {kind}"
            if kind == "expert"
            else f"{path} is a {meta.get('kind')!r} file, not a {kind}"
        )
    meta = {**OPTIONAL, **meta} if kind == "bundle" else meta
    for key, (what, ok) in {**META_CHECKS, **KIND_CHECKS[kind]}.items():
        if key not in meta or not ok(meta[key]):
            raise UserError(f"{path}: metadata {key!r} must be {what}, got {meta.get(key)!r}")
    for key, (what, ok) in OPTIONAL_CHECKS.items():
        if key in meta and not ok(meta[key]):
            raise UserError(f"{path}: metadata {key!r} must be {what}, got {meta[key]!r}")
    if kind == "bundle" and meta.get("top_k", 1) > len(meta["domains"]):
        raise UserError(f"{path}: metadata 'top_k' is {meta['top_k']}, more than its {len(meta['domains'])} experts")
    check_weights(tensors, path)
    if gpt is not None:
        check_tensors(path, tensors, meta, kind, gpt)
    return tensors, meta


def check_base(path, meta, base, tokenizer):
    """The file's experts were trained on this base (fingerprint) with this tokenizer, or a UserError."""
    if meta["tokenizer"] != tokenizer:
        raise UserError(f"{path} was trained with tokenizer {meta['tokenizer']!r}, this base uses {tokenizer!r}")
    if meta["base"] != base:
        raise UserError(
            f"{path} was trained on another base model (fingerprint {meta['base']['sha256'][:12]} "
            f"!= {base['sha256'][:12]}); use the base it was trained on"
        )


def file_shapes(gpt, meta, kind):
    """{tensor name: shape} that an expert or bundle file with this metadata must hold for `gpt`,
    computed without allocating anything (a file's metadata could claim any rank)."""
    shapes, K = {}, len(meta["domains"]) if kind == "bundle" else 1
    for i, block in enumerate(gpt.transformer.h):
        for t in meta["targets"]:
            parent, name = t.split(".")
            linear = getattr(getattr(block, parent), name)
            linear = getattr(linear, "base", linear)  # a LoRALinear's frozen map
            A, B = (meta["rank"], linear.in_features), (linear.out_features, meta["rank"])
            layer = f"transformer.h.{i}.{t}"
            if kind == "expert":
                shapes[f"{layer}.lora_A"], shapes[f"{layer}.lora_B"] = A, B
            for k in range(K if kind == "bundle" else 0):
                shapes[f"gpt.{layer}.lora_A.{k}"], shapes[f"gpt.{layer}.lora_B.{k}"] = A, B
    for i in range(gpt.config.n_layer if kind == "bundle" else 0):
        shapes[f"routers.{i}.weight"], shapes[f"routers.{i}.bias"] = (K, gpt.config.n_embd), (K,)
    return shapes


def check_tensors(path, tensors, meta, kind, gpt):
    """The file holds exactly the floating-point tensors its metadata describes for `gpt`, each of its shape."""
    if meta["base"]["config"] != asdict(gpt.config):  # then the shapes differ: say why
        raise UserError(
            f"{path} was trained on another base model (config {meta['base']['config']}); use the base "
            f"it was trained on"
        )
    K, L = len(meta["domains"]) if kind == "bundle" else 1, gpt.config.n_layer
    count = 2 * L * len(meta["targets"]) * K + (2 * L if kind == "bundle" else 0)
    expected = file_shapes(gpt, meta, kind) if len(tensors) == count else {}  # counted first: names cost memory
    if set(tensors) != set(expected):
        what = f"{K} experts and routers" if kind == "bundle" else "an expert"
        odd = sorted(set(tensors) ^ set(expected))[0] if expected else f"{len(tensors)} tensors, not {count}"
        raise UserError(f"{path} does not hold {what} for this model as its metadata says (e.g. {odd})")
    for name, t in tensors.items():
        if tuple(t.shape) != expected[name] or not t.is_floating_point():
            raise UserError(f"{path}: {name} is {t.dtype} {tuple(t.shape)}, its metadata says {expected[name]}")


def load_expert(path, model, k, base, tokenizer):
    """Copies the expert file at `path` into expert slot k of `model`; returns its metadata."""
    tensors, meta = read_meta(path, "expert")
    check_base(path, meta, base, tokenizer)
    gpt = model.gpt if isinstance(model, MoA) else model
    check_tensors(path, tensors, meta, "expert", gpt)
    layer = lora_layers(model)[0]
    if (meta["rank"], meta["targets"]) != (layer.rank, expert_targets(model)):
        raise UserError(
            f"{path} holds a rank-{meta['rank']} expert on {', '.join(meta['targets'])}; the model's "
            f"experts are rank {layer.rank} on {', '.join(expert_targets(model))}"
        )
    with torch.no_grad():
        for name, t in expert_tensors(model, k).items():
            t.copy_(tensors[name])
    return meta


def add_expert_file(model, path, tokenizer, dropout=0.0):
    """The base plus one expert: puts the expert file at `path` beside `model` (a plain GPT) as its only
    expert, every sample routed to it. Returns the file's metadata."""
    base = fingerprint(model)
    tensors, meta = read_meta(path, "expert")
    check_base(path, meta, base, tokenizer)
    check_tensors(path, tensors, meta, "expert", model)  # before add_experts allocates what meta says
    add_experts(model, 1, meta["rank"], meta["alpha"], dropout, meta["targets"])
    load_expert(path, model, 0, base, tokenizer)
    set_route(model, 0)
    return meta


def load_bundle(path, gpt, tokenizer, base=None):
    """A MoA built on `gpt` (a plain GPT) from the bundle at `path`, frozen; errors if it belongs to another base."""
    tensors, meta = read_meta(path, "bundle")
    check_base(path, meta, base or fingerprint(gpt), tokenizer)
    check_tensors(path, tensors, meta, "bundle", gpt)  # before MoA allocates what meta says
    moa = MoA(
        gpt,
        meta["domains"],
        meta["rank"],
        meta["alpha"],
        targets=meta["targets"],
        pooling=meta["pooling"],
        eta=meta.get("eta", 1.0),
        top_k=meta.get("top_k", 1),
        router_input=meta["router_input"],
    )
    moa.load_state_dict(tensors, strict=False)
    moa.temperature = meta["temperature"]
    for p in moa.parameters():
        p.requires_grad_(False)
    return moa, meta
