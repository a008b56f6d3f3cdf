"""The files nanoMoA writes, what each holds, and the checks each passes when read. A first reading can skip
this file: the method is in moa.py; how files are written and read, whatever they hold, is storage.py.

- Expert file (train_lora.py): one expert's A and B beside every adapted linear map, as .safetensors,
  named by the layer ("transformer.h.0.attn.c_attn.lora_A"), with JSON metadata under the key
  "nanomoa": kind "expert", domain, rank, alpha, targets, tokenizer, and the base's fingerprint.
- Bundle (train_router.py): every expert, the routers, the domain names and the routing settings in one
  .safetensors file.
- The base: a train_base.py checkpoint, or GPT-2 weights (a hub name, or a local folder: gpt2.py).

Metadata is type-checked, and its sizes checked against the stored tensors, before any model is built
from it: a file cannot make us allocate more than it holds. An expert or bundle loads only onto the base
it was trained on (its fingerprint: the base's config and the SHA-256 of its weights).

Read next: trainer.py.
"""

import hashlib
import json
import math
import os
from dataclasses import asdict

import torch

from config import UserError, is_name
from gpt2 import load_gpt2
from moa import ROUTER_INPUTS, TARGETS, LoRALinear, MoA, add_experts, added_by_moa, lora_layers, set_route
from model import GPT, checked_config
from storage import check_weights, load_checkpoint, read_safetensors, write_safetensors


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
        try:
            model = GPT(checked_config(ckpt["meta"].get("model"), ckpt["model"]))
        except ValueError as e:
            raise UserError(f"{ckpt_path}: {e}") from None
        try:
            keys = model.load_state_dict(ckpt["model"], strict=False)
        except RuntimeError as e:  # a tensor of another shape
            raise UserError(f"{ckpt_path} does not match its own config: {str(e).splitlines()[-1].strip()}") from None
        if keys.missing_keys != ["lm_head.weight"]:  # lm_head is tied to wte, saved once
            raise UserError(f"{ckpt_path} does not match its own config: missing {keys.missing_keys[:3]}")
        if keys.unexpected_keys:  # e.g. biases in the file of a config with bias=False: they would be dropped
            raise UserError(f"{ckpt_path} does not match its own config: it holds {keys.unexpected_keys[0]}")
        return model, ckpt["meta"]["tokenizer"]
    return load_gpt2(path), path if os.path.isdir(path) else "gpt2"


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
        "router_hidden": moa.router_hidden,
        "router_window": moa.router_window,
        "temperature": moa.temperature,
        **expert_meta(moa, tokenizer, base),
        **(extra or {}),
    }
    if "top_k" in meta:  # experts per token: top_k of fewer experts (one domain, or some removed) is all of them
        meta["top_k"] = min(meta["top_k"], len(moa.domains))
    tensors = {name: p for name, p in moa.named_parameters() if added_by_moa(name)}
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
        "router_hidden": ("an integer >= 0", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
        "router_window": ("an integer >= 1", is_size),
        "temperature": ("a positive number", lambda v: is_number(v) and v > 0),
    },
}

# what older bundles lack: uncalibrated, linear routers on blocks
OPTIONAL = {"temperature": 1.0, "router_input": "block", "router_hidden": 0, "router_window": 1}


def is_count(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


OPTIONAL_CHECKS = {  # keys some files have (train_router.py's settings, training records seen...)
    "top_k": ("an integer >= 1", is_size),
    "eta": ("a number >= 0", lambda v: is_number(v) and v >= 0),
    "mode": ("label, token or layer", lambda v: v in ("label", "token", "layer")),  # the routing it trained with
    "samples": ("an integer >= 0", is_count),
    "steps": ("an integer >= 0", is_count),
    "unit_steps": ("an object of integers >= 0", lambda v: isinstance(v, dict) and all(map(is_count, v.values()))),
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
    C, H, W = gpt.config.n_embd, meta.get("router_hidden", 0), meta.get("router_window", 1)
    for i in range(gpt.config.n_layer if kind == "bundle" else 0):
        shapes[f"routers.{i}.weight"], shapes[f"routers.{i}.bias"] = (K, H or C), (K,)
        if H:  # moa.router_features: LayerNorm (C), then a linear map W C -> H (W tokens side by side)
            features = f"router_features.{i}"
            shapes[f"{features}.0.weight"], shapes[f"{features}.0.bias"] = (C,), (C,)
            shapes[f"{features}.1.weight"], shapes[f"{features}.1.bias"] = (H, W * C), (H,)
    return shapes


def check_tensors(path, tensors, meta, kind, gpt):
    """The file holds exactly the floating-point tensors its metadata describes for `gpt`, each of its shape."""
    if meta["base"]["config"] != asdict(gpt.config):  # then the shapes differ: say why
        raise UserError(
            f"{path} was trained on another base model (config {meta['base']['config']}); use the base "
            f"it was trained on"
        )
    K, L = len(meta["domains"]) if kind == "bundle" else 1, gpt.config.n_layer
    routers = (2 + (4 if meta.get("router_hidden") else 0)) * L if kind == "bundle" else 0  # see file_shapes
    count = 2 * L * len(meta["targets"]) * K + routers
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


def load_bundle(path, gpt, tokenizer, base=None, eta=None):
    """A MoA built on `gpt` (a plain GPT) from the bundle at `path`, frozen, with every setting the bundle was saved
    with (eta: another weight of L_cls, to train it further); errors if it belongs to another base."""
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
        eta=meta.get("eta", 1.0) if eta is None else eta,
        top_k=meta.get("top_k", 1),
        router_input=meta["router_input"],
        temperature=meta["temperature"],
        router_hidden=meta["router_hidden"],
        router_window=meta["router_window"],
    )
    moa.load_state_dict(tensors, strict=False)
    for p in moa.parameters():
        p.requires_grad_(False)
    return moa, meta
