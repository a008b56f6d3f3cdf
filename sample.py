"""Generates text from the base, the base + one expert, or a MoA bundle that routes each prompt.

    python sample.py --prompt="def main("                                  # the base alone
    python sample.py --adapter=out/experts/python.safetensors --prompt="def main("
    python sample.py --bundle=out/moa/moa.safetensors --prompt="def f(x):||#include <vector>||12+34="
    python sample.py --base=gpt2 --prompt=FILE:prompt.txt --max_new_tokens=100

Prompts are separated by "||" (or read from FILE:path) and "\\n" in a prompt is a newline. All
prompts and samples run together in one batch (left-padded); with a bundle, each prompt is routed
on its own at prefill, without a domain label, and the chosen domain and the router's confidence are
printed above each sample. Decoding uses the KV cache.

Read next: results.py.
"""
import os
from dataclasses import dataclass

import torch

from evaluate import left_pad
from moa import MODES, add_experts, base_fingerprint, load_bundle, load_expert, read_meta, set_route
from tokenizer import encode, get_tokenizer
from train_base import load_base
from trainer import UserError, parse_config, run


@dataclass
class SampleConfig:
    base: str = "out/base"
    adapter: str = ""  # one expert (.safetensors from train_lora.py)
    bundle: str = ""  # a MoA bundle (.safetensors from train_router.py)
    mode: str = "last"  # routing with a bundle: layer | last | vote | token | oracle (needs --domain)
    domain: str = ""  # the domain label for --mode=oracle
    prompt: str = "\\n"
    num_samples: int = 1  # samples per prompt
    max_new_tokens: int = 100
    temperature: float = 0.8
    top_k: int = 40  # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter
    seed: int = 1337
    device: str = "cpu"


def read_prompts(text):
    if text.startswith("FILE:"):
        path = text[len("FILE:"):]
        if not os.path.isfile(path):
            raise UserError(f"prompt file {path} not found")
        with open(path, encoding="utf-8") as f:
            text = f.read()
    prompts = [p.replace("\\n", "\n") for p in text.split("||")]
    if not all(prompts):
        raise UserError("empty prompt: give text, or several separated by ||")
    return prompts


def load_model(cfg):
    """The model to sample from, its tokenizer name, and the forward kwargs that select the routing."""
    model, tokenizer = load_base(cfg.base)
    if cfg.adapter and cfg.bundle:
        raise UserError("give --adapter or --bundle, not both")
    if cfg.adapter:
        meta = read_meta(cfg.adapter, "expert")[1]
        fingerprint = base_fingerprint(model)
        add_experts(model, 1, meta["rank"], meta["alpha"], 0.0, meta["targets"])
        load_expert(cfg.adapter, model, 0, fingerprint, tokenizer)
        set_route(model, 0)
        return model, tokenizer, {}
    if cfg.bundle:
        moa, meta = load_bundle(cfg.bundle, model, tokenizer)
        if cfg.mode not in MODES or cfg.mode == "label":
            raise UserError(f"--mode={cfg.mode}: choose layer, last, vote, token or oracle")
        if cfg.mode == "oracle" and cfg.domain not in moa.domains:
            raise UserError(f"--mode=oracle needs --domain=NAME, one of {', '.join(moa.domains)}")
        return moa, tokenizer, {"mode": cfg.mode}
    return model, tokenizer, {}


@torch.no_grad()
def main(argv=None):
    cfg = parse_config(SampleConfig, argv or [])
    prompts = read_prompts(cfg.prompt)
    model, tokenizer, kwargs = load_model(cfg)
    enc = get_tokenizer(tokenizer)
    model.eval().to(cfg.device)
    rows = [encode(enc, p) for p in prompts for _ in range(cfg.num_samples)]
    idx, mask = left_pad(rows, enc.eot_token)
    if idx.size(1) + cfg.max_new_tokens > model.config.block_size:
        raise UserError(f"prompt ({idx.size(1)} tokens) + max_new_tokens exceed the context of {model.config.block_size}")
    if kwargs.get("mode") == "oracle":
        kwargs["domain"] = torch.full((len(rows),), model.domains.index(cfg.domain), device=cfg.device)
    out = model.generate(idx.to(cfg.device), cfg.max_new_tokens, cfg.temperature, cfg.top_k or None,
                         cfg.top_p if cfg.top_p < 1 else None, pad_mask=mask.to(cfg.device),
                         generator=torch.Generator(cfg.device).manual_seed(cfg.seed), **kwargs)
    routing = getattr(model, "routing", {})
    for i, tokens in enumerate(out.tolist()):
        head = f"--- prompt {i // cfg.num_samples + 1}, sample {i % cfg.num_samples + 1}"
        if "decision" in routing:
            k = int(routing["decision"][i])
            head += f" -> expert {model.domains[k]!r} (last router's confidence {routing['confidence'][i]:.2f})"
        print(head)
        print(enc.decode(tokens[idx.size(1) - len(rows[i]):]))
    return out


if __name__ == "__main__":
    run(main)
