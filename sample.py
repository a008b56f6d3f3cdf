"""Generates text from the base, the base + one expert, or a MoA bundle that routes each prompt.

    python sample.py --prompt="def main("                                  # the base alone
    python sample.py --expert=out/experts/python.safetensors --prompt="def main("
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

import fast
from config import AT_LEAST_0, AT_LEAST_1, PROBABILITY, UserError, one_of, parse_config, run
from evaluate import left_pad
from files import add_expert_file, load_base, load_bundle
from moa import MODES
from tokenizer import encode, get_tokenizer


@dataclass
class SampleConfig:
    base: str = "out/base"
    expert: str = ""  # one expert (.safetensors from train_lora.py)
    bundle: str = ""  # a MoA bundle (.safetensors from train_router.py)
    mode: str = "last"  # routing mode with a bundle: layer | last | vote | token | label (needs --domain)
    domain: str = ""  # the domain label for --mode=label
    prompt: str = "\\n"
    num_samples: int = 1  # samples per prompt
    max_new_tokens: int = 100
    temperature: float = 0.8
    top_k: int = 40  # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter
    seed: int = 1337
    device: str = "cpu"
    fast: bool = True  # fast.py's speed paths (False: the plain method of moa.py)

    CHECKS = {"mode": one_of(*MODES), "num_samples": AT_LEAST_1, "max_new_tokens": AT_LEAST_1,
              "temperature": AT_LEAST_0, "top_k": AT_LEAST_0, "top_p": PROBABILITY}


def read_prompts(text):
    if text.startswith("FILE:"):
        path = text[len("FILE:"):]
        if not os.path.isfile(path):
            raise UserError(f"prompt file {path} not found")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except ValueError:  # not UTF-8
            raise UserError(f"prompt file {path} is not UTF-8 text") from None
    prompts = [p.replace("\\n", "\n") for p in text.split("||")]
    if not all(prompts):
        raise UserError("empty prompt: give text, or several separated by ||")
    return prompts


def load_model(cfg):
    """The model to sample from, its tokenizer name, and the forward kwargs that select the routing."""
    model, tokenizer = load_base(cfg.base)
    if cfg.expert and cfg.bundle:
        raise UserError("give --expert or --bundle, not both")
    if cfg.expert:
        add_expert_file(model, cfg.expert, tokenizer)
    if cfg.bundle:
        model = load_bundle(cfg.bundle, model, tokenizer)[0]
        if cfg.mode == "label" and cfg.domain not in model.domains:
            raise UserError(f"--mode=label needs --domain=NAME, one of {', '.join(model.domains)}")
    return fast.enable(model, cfg.fast), tokenizer, {"mode": cfg.mode} if cfg.bundle else {}


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
    if kwargs.get("mode") == "label":
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
