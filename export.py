"""Interoperability: experts as PEFT LoRA adapters (both ways), models as Hugging Face GPT-2 folders.

    python export.py peft --expert=out/experts/python.safetensors --base=gpt2 --out=out/peft/python
    python export.py import-peft --peft=DIR --base=gpt2 --domain=NAME --out=out/experts/NAME.safetensors
    python export.py hf --base=out/base --out=out/hf/base                 # the base alone
    python export.py hf --base=gpt2 --expert=out/experts/python.safetensors --out=out/hf/python   # merged
    python export.py bundle --bundle=out/moa/moa.safetensors --base=gpt2 --out=out/peft/moa

model.py already uses GPT-2's module names, so only two things need translating:
- GPT-2's checkpoints store the four linear maps as Conv1D, weight (in, out); nn.Linear's is (out, in).
- PEFT names a tensor base_model.model.<module>.lora_A.weight. Its LoRA on a Conv1D has our shapes,
  A (r, in) and B (out, r); fan_in_fan_out=True makes it transpose the product B @ A when merging.
  Its scale is lora_alpha / r, as ours (not rsLoRA's alpha / sqrt(r)).
A bundle becomes one PEFT adapter per domain plus routers.json, what a server needs to route requests.
Nothing here imports transformers or peft; tests/test_export.py loads every output with both.

Read next: tests/test_export.py.
"""

import json
import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from config import A_NAME, UserError, parse_config, run
from files import (
    add_expert_file,
    base_files,
    expert_tensors,
    file_shapes,
    fingerprint,
    is_number,
    is_size,
    load_base,
    load_bundle,
    save_expert,
)
from moa import TARGETS, add_experts, lora_layers
from storage import atomic_write, check_outputs, check_weights, read_json, read_safetensors, write_safetensors

CONV1D = tuple(f"{t}.weight" for t in TARGETS)  # stored (in, out) in GPT-2's checkpoints
PEFT_PREFIX = "base_model.model."
# adapter_config.json settings a nanoMoA expert cannot express: each must be absent, empty or false
PEFT_UNSUPPORTED = (
    "rank_pattern",
    "alpha_pattern",
    "use_dora",
    "use_rslora",
    "lora_bias",
    "modules_to_save",
    "layers_to_transform",
    "layer_replication",
    "exclude_modules",
    "target_parameters",
    "trainable_token_indices",
)
COMMANDS = {
    "peft": ("expert", "out"),
    "import-peft": ("peft", "domain", "out"),
    "hf": ("out",),
    "bundle": ("bundle", "out"),
}  # each command's required flags


@dataclass
class ExportConfig:
    base: str = "out/base"  # a train_base.py output folder / ckpt.pt, or GPT-2 weights (gpt2, or a folder)
    expert: str = ""  # an expert file (train_lora.py); for hf, it is merged into the weights
    bundle: str = ""  # a MoA bundle (train_router.py)
    peft: str = ""  # a PEFT LoRA folder to import
    domain: str = ""  # the domain name of the imported expert
    out: str = ""  # the folder (or, for import-peft, the expert file) to write
    force: bool = False  # replace an existing output

    CHECKS = {"domain": A_NAME}


# ----------------------------------------------------------------------------------------------
# nanoMoA -> PEFT and Hugging Face


def load_with_expert(cfg):
    """The base, with --expert as its one expert (checked to be trained on this base)."""
    model, tokenizer = load_base(cfg.base)
    return model, add_expert_file(model, cfg.expert, tokenizer)


def write_peft(folder, tensors, meta, base):
    """One expert, {"transformer.h.0.attn.c_attn.lora_A": (r, in), ...}, as a PEFT LoRA folder."""
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": meta["rank"],
        "lora_alpha": meta["alpha"],
        "target_modules": list(meta["targets"]),  # suffixes: "attn.c_proj" never matches mlp.c_proj
        "fan_in_fan_out": True,
        "bias": "none",
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    write_safetensors(
        os.path.join(folder, "adapter_model.safetensors"),
        {f"{PEFT_PREFIX}{name}.weight": t for name, t in tensors.items()},
        {"format": "pt"},
    )


def export_peft(cfg, folder):
    model, meta = load_with_expert(cfg)
    write_peft(folder, expert_tensors(model, 0), meta, cfg.base)


def hf_state(gpt):
    """The GPT's weights under GPT-2's Hugging Face names, Conv1D weights (in, out); lm_head is tied to wte."""
    state = {}
    for name, t in gpt.state_dict().items():
        name = name.replace(".base.", ".")  # a LoRALinear's frozen nn.Linear -> the plain layer's name
        if "lora_" not in name and name != "lm_head.weight":
            state[name] = t.t().contiguous() if name.endswith(CONV1D) else t
    if not gpt.config.bias:  # GPT-2 always has biases; zero ones compute the same function
        for name, t in list(state.items()):
            if name.startswith(("transformer.h.", "transformer.ln_f.")):
                state[name.removesuffix("weight") + "bias"] = torch.zeros(t.shape[-1], dtype=t.dtype)
    return state


def hf_config(config, dtype):
    """config.json of a GPT2LMHeadModel with the architecture of our GPTConfig."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",  # tanh GELU, as model.py
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "tie_word_embeddings": True,
        "bos_token_id": config.vocab_size - 1,
        "eos_token_id": config.vocab_size - 1,  # <|endoftext|>: last id
        "dtype": str(dtype).removeprefix("torch."),
    }


def export_hf(cfg, folder):
    if cfg.expert:
        model = load_with_expert(cfg)[0]
        for layer in lora_layers(model):
            layer.merge(0)  # base.weight += B @ A * alpha / r
    else:
        model = load_base(cfg.base)[0]
    state = hf_state(model)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf_config(model.config, state["transformer.wte.weight"].dtype), f, indent=2)
    write_safetensors(os.path.join(folder, "model.safetensors"), state, {"format": "pt"})


def router_json(i, features, router, window=1):
    """Router i as routers.json has it: weight (K, n_embd or H), bias (K,), and its per-token features or None."""
    saved = {"hidden_state": i, "weight": router.weight.tolist(), "bias": router.bias.tolist(), "features": None}
    if not isinstance(features, nn.Identity):  # moa.router_features: LayerNorm, Linear(C, H), GELU
        norm, linear = features[0], features[1]
        saved["features"] = {
            "norm_weight": norm.weight.tolist(),
            "norm_bias": norm.bias.tolist(),
            "eps": norm.eps,
            "weight": linear.weight.tolist(),  # (H, window n_embd)
            "bias": linear.bias.tolist(),  # (H,)
            "window": window,
        }
    return saved


def export_bundle(cfg, folder):
    """One PEFT folder per domain, and routers.json: router i maps the pooled input of block i to K logits."""
    gpt, tokenizer = load_base(cfg.base)
    moa, meta = load_bundle(cfg.bundle, gpt, tokenizer)
    for k, domain in enumerate(moa.domains):
        write_peft(os.path.join(folder, domain), expert_tensors(moa, k), meta, cfg.base)
    routers = {
        "domains": moa.domains,
        "pooling": moa.pooling,  # domain k's adapter is the folder <domain k>/
        "reads": "router i: logits = weight @ pool(f(hidden_states[i])) + bias; hidden_states[i] as in "
        "transformers' output_hidden_states, the input of block i, pooled over real prompt tokens; f, per token: "
        "the identity where 'features' is null, else gelu(features.weight @ v + features.bias), v the "
        "concatenation of layer_norm(h) at this token and at each of the features.window - 1 tokens before it "
        "(this token's first; zeros for padding and before the prompt's first token), layer_norm with "
        "features.norm_weight, norm_bias and eps, gelu the exact (erf) one",
        "routers": [
            router_json(i, f, r, moa.router_window) for i, (f, r) in enumerate(zip(moa.router_features, moa.routers))
        ],
    }
    with open(os.path.join(folder, "routers.json"), "w") as f:
        json.dump(routers, f)


# ----------------------------------------------------------------------------------------------
# PEFT -> nanoMoA


def peft_targets(target_modules, model, where):
    """PEFT's target_modules (names or name suffixes, or one regex) -> our targets, e.g. ["attn.c_attn"]."""
    if target_modules == "all-linear":  # PEFT's shorthand: every linear map but the output layer
        return list(TARGETS)
    if not target_modules:
        raise UserError(f"{where} names no target_modules")
    if not isinstance(target_modules, str) and not (
        isinstance(target_modules, list) and all(isinstance(t, str) for t in target_modules)
    ):
        raise UserError(f"{where}: target_modules must be a string or a list of strings, got {target_modules!r}")
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as e:
            raise UserError(f"{where}: target_modules {target_modules!r} is not a valid regex ({e})") from None

    def chosen(name):  # PEFT's own rule
        if isinstance(target_modules, str):
            return re.fullmatch(target_modules, name)
        return any(name == t or name.endswith(f".{t}") for t in target_modules)

    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding)) and chosen(n)]
    targets = set()
    for name in names:
        block = re.fullmatch(r"transformer\.h\.\d+\.(.+)", name)  # "transformer.h.3.mlp.c_fc" -> "mlp.c_fc"
        if not block or block[1] not in TARGETS:
            raise UserError(f"{where}: LoRA on {name} is not supported; nanoMoA experts sit on {', '.join(TARGETS)}")
        targets.add(block[1])
    if not names or len(names) != len(targets) * model.config.n_layer:
        raise UserError(
            f"{where}: target_modules {target_modules!r} must choose some of {', '.join(TARGETS)} in "
            f"every block; here they choose {len(names)} layers"
        )
    return sorted(targets, key=TARGETS.index)


def import_peft(cfg):
    config_path = os.path.join(cfg.peft, "adapter_config.json")
    weights_path = os.path.join(cfg.peft, "adapter_model.safetensors")
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise UserError(
                f"{path} not found: a PEFT LoRA folder holds adapter_config.json and "
                "adapter_model.safetensors (save it with safe_serialization=True)"
            )
    pc = read_json(config_path)
    if pc.get("peft_type") != "LORA" or pc.get("bias", "none") != "none":
        raise UserError(f"{config_path}: only plain LoRA (peft_type LORA, bias none) can become a nanoMoA expert")
    for key in PEFT_UNSUPPORTED:
        if pc.get(key):
            raise UserError(
                f"{config_path}: {key}={pc[key]!r} is not supported: a nanoMoA expert is plain LoRA "
                "with one rank and alpha on every block"
            )
    rank, alpha = pc.get("r", 8), pc.get("lora_alpha", 8)  # PEFT's defaults
    if not is_size(rank) or not is_number(alpha):
        raise UserError(f"{config_path}: r must be an integer >= 1 and lora_alpha a number, got {rank!r}, {alpha!r}")
    model, tokenizer = load_base(cfg.base)
    base = fingerprint(model)
    targets = peft_targets(pc.get("target_modules"), model, config_path)
    theirs = {
        n.removeprefix(PEFT_PREFIX).removesuffix(".weight"): t  # -> our names, as expert_tensors
        for n, t in read_safetensors(weights_path)[0].items()
    }
    wanted = file_shapes(model, {"rank": rank, "targets": targets}, "expert")  # before allocating rank-r experts
    if set(theirs) != set(wanted):
        raise UserError(
            f"{weights_path} does not hold LoRA A and B for exactly the layers its config names "
            f"(e.g. {sorted(set(theirs) ^ set(wanted))[0]})"
        )
    for name, t in theirs.items():
        if tuple(t.shape) != wanted[name] or not t.is_floating_point():
            raise UserError(
                f"{weights_path}: {name} is {t.dtype} {tuple(t.shape)}, {cfg.base} with r={rank} wants "
                f"{wanted[name]}: another base, or another rank"
            )
    check_weights(theirs, weights_path)  # finite: a NaN would pass into every output
    add_experts(model, 1, rank, float(alpha), targets=targets)
    with torch.no_grad():
        for name, t in expert_tensors(model, 0).items():  # views of the new expert's parameters
            t.copy_(theirs[name])
    save_expert(cfg.out, model, 0, cfg.domain, tokenizer, base, {"imported_from": cfg.peft})


# ----------------------------------------------------------------------------------------------

EXPORTED = ("adapter_config.json", "config.json", "routers.json")  # one of them is in every folder export.py writes


def check_free(path, force, folder):
    """The output may be written: new, an empty folder, or with --force one export.py wrote (never another folder,
    which would be replaced whole)."""
    if not os.path.lexists(path) or (os.path.isdir(path) and not os.listdir(path)):
        return
    if not force:
        raise UserError(f"{path} already exists; pass --force to replace it")
    if folder != os.path.isdir(path) or folder and not any(os.path.isfile(os.path.join(path, f)) for f in EXPORTED):
        raise UserError(
            f"{path} is not {'a folder export.py wrote' if folder else 'a file'}: --force replaces only "
            f"those; remove it yourself or choose another --out"
        )


def main(argv=None):
    argv = list(argv or [])
    if argv and argv[0] in ("--help", "-h"):  # the flags of every command
        parse_config(ExportConfig, argv[:1])
    if not argv or argv[0] not in COMMANDS:
        raise UserError(f"say what to export: python export.py {'|'.join(COMMANDS)} --key=value ...")
    command, cfg = argv[0], parse_config(ExportConfig, argv[1:])
    missing = [key for key in COMMANDS[command] if not getattr(cfg, key)]
    if missing:
        raise UserError(f"export.py {command} needs " + " ".join(f"--{key}=..." for key in missing))
    inputs = (
        base_files(cfg.base)
        + [p for p in (cfg.expert, cfg.bundle) if p]
        + (
            [os.path.join(cfg.peft, "adapter_config.json"), os.path.join(cfg.peft, "adapter_model.safetensors")]
            if command == "import-peft"
            else []
        )
    )
    check_outputs([cfg.out], inputs)
    check_free(cfg.out, cfg.force, folder=command != "import-peft")
    if command == "import-peft":
        import_peft(cfg)
    else:
        export = {"peft": export_peft, "hf": export_hf, "bundle": export_bundle}[command]
        atomic_write(cfg.out, lambda tmp: export(cfg, tmp), folder=True)  # a crash never leaves half a folder
    print(f"wrote {cfg.out}")
    return cfg.out


if __name__ == "__main__":
    run(main)
