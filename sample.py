"""Generates text from the base, the base + one expert, or a MoA bundle that routes each prompt.

    python sample.py --prompt="def main("                                  # the base alone
    python sample.py --expert=out/runs/seed1/experts/upper.safetensors --prompt="UPPERCASE: river\\n"
    python sample.py --bundle=out/runs/seed1/moa/moa.safetensors --temperature=0 \\
        --prompt="UPPERCASE: river\\n||Reverse the word: river\\n||57+8="
    python sample.py --base=gpt2 --prompt=FILE:prompt.txt --max_new_tokens=100
    python sample.py --base=out/mine/base --bundle=out/mine/runs/seed1/moa/moa.safetensors --template=alpaca \
        --temperature=0 --prompt="Convert to CamelCase\nread_text||initials please\nget_line_number"

Prompts are separated by "||" (or read from FILE:path) and "\\n" in a prompt is a newline. All
prompts and samples run together in one batch (left-padded); with a bundle, each prompt is routed
on its own at prefill, without a domain label, and the chosen domain and the router's confidence are
printed above each sample. Decoding uses the KV cache and stops at <|endoftext|>. With --template=alpaca,
each prompt is an instruction, then after its first newline the input (if any), written in the template
data/prepare.py gives Alpaca records, as your own tasks were trained.

With --trace=N (and a bundle), the prompts run greedily and the routing is printed step by step: at
prefill, each block's router's choice and probability per prompt and the routes kept in the KV cache;
then, for N decoding steps, the token each prompt gets and the route each block uses (read from the
cache: no router runs while decoding).

Read next: results.py.
"""

import os
from dataclasses import dataclass

import torch

import fast
from config import AT_LEAST_0, AT_LEAST_1, PROBABILITY, UserError, check_memory, one_of, parse_config, run
from data.prepare import alpaca_prompt
from evaluate import left_pad
from files import add_expert_file, load_base, load_bundle
from moa import MODES, SERVE_MODE
from tokenizer import encode, get_tokenizer
from trainer import pick_device


@dataclass
class SampleConfig:
    base: str = "out/base"  # the base: a train_base.py folder or ckpt.pt, or GPT-2 (gpt2, or a folder)
    expert: str = ""  # one expert (.safetensors from train_lora.py)
    bundle: str = ""  # a MoA bundle (.safetensors from train_router.py)
    mode: str = SERVE_MODE  # routing mode with a bundle: layer | last | vote | token | label (needs --domain)
    domain: str = ""  # the domain label for --mode=label
    prompt: str = "\\n"  # prompts separated by ||, or FILE:path; \\n is a newline
    num_samples: int = 1  # samples per prompt
    max_new_tokens: int = 0  # tokens to generate at most (an EOT ends a sample sooner); 0: 100, or the room left
    temperature: float = 0.8  # 0: greedy decoding
    top_k: int = 40  # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter
    seed: int = 1337  # the sampling's random draws follow from it
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    fast: bool = True  # fast.py's speed paths (False: the plain method of moa.py)
    trace: int = 0  # with a bundle: print each block's route at prefill and in this many greedy decoding steps
    newline: bool = True  # with an expert or bundle, end each prompt with a newline, as every task's prompt ends
    template: str = "none"  # alpaca: each prompt is "instruction\ninput" written in prepare.py's Alpaca template

    CHECKS = {
        "mode": one_of(*MODES),
        "num_samples": AT_LEAST_1,
        "max_new_tokens": AT_LEAST_0,
        "template": one_of("none", "alpaca"),
        "temperature": AT_LEAST_0,
        "top_k": AT_LEAST_0,
        "top_p": PROBABILITY,
        "trace": AT_LEAST_0,
    }


def read_prompts(text):
    if text.startswith("FILE:"):
        path = text[len("FILE:") :]
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
def trace(moa, idx, mask, enc, steps, mode):
    """Prefill and `steps` greedy decoding steps of a MoA, printing each block's route at every step."""

    cache, names = moa.new_cache(), moa.domains
    logits, _ = moa(idx, pad_mask=mask, cache=cache, mode=mode)
    probs = torch.softmax(moa.routing["logits"].float(), dim=-1)  # (L, B, K)
    print(f"prefill ({idx.size(1)} positions, left-padded), mode {mode}: each block's router, its choice (probability)")
    for b in range(idx.size(0)):
        print(f"  prompt {b + 1} {enc.decode(idx[b][mask[b]].tolist())!r}")
        print(
            "    routers: "
            + "  ".join(
                f"block {i}: {names[k]} ({probs[i, b, k]:.2f})"
                for i, k in enumerate(moa.routing["predicted"][:, b].tolist())
            )
        )
        print("    kept:    " + "  ".join(f"block {i}: {names[k]}" for i, k in enumerate(cache.route[:, b].tolist())))
    for step in range(1, steps + 1):
        token = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1) greedy
        moa.routing = {}
        logits, _ = moa(token, pad_mask=torch.ones_like(token, dtype=torch.bool), cache=cache, mode=mode)
        assert not moa.routing, "a router ran while decoding"
        print(f"decoding step {step}: no router runs; block i uses cache.route[i]")
        for b in range(idx.size(0)):
            print(
                f"  prompt {b + 1} gets {enc.decode(token[b].tolist())!r}: "
                + "  ".join(f"block {i}: {names[k]}" for i, k in enumerate(cache.route[:, b].tolist()))
            )


def check_sample_memory(cfg, n_prompts, config):
    """--num_samples (times the prompts) and the new tokens against the free memory, before any batch is made: the
    KV cache alone holds 2 n_layer float32 (B, T, n_embd) tensors, B = prompts x samples and T at least the new
    tokens, and each step's logits (B, vocab)."""
    rows, steps = n_prompts * cfg.num_samples, cfg.trace or cfg.max_new_tokens
    need = 4 * rows * (2 * config.n_layer * steps * config.n_embd + config.vocab_size)
    check_memory(need, f"--num_samples={cfg.num_samples} (x {n_prompts} prompts) with {steps} new tokens")


@torch.no_grad()
def main(argv=None):
    cfg = parse_config(SampleConfig, argv or [])
    prompts = read_prompts(cfg.prompt)
    if cfg.template == "alpaca":  # instruction, then the input after the first newline
        prompts = [alpaca_prompt(*(p.split("\n", 1) + [""])[:2]) for p in prompts]
    elif cfg.newline and (cfg.expert or cfg.bundle):  # the answer follows on a line of its own
        prompts = [p if p.endswith("\n") else p + "\n" for p in prompts]
    device, _ = pick_device(cfg.device)
    model, tokenizer, kwargs = load_model(cfg)
    enc = get_tokenizer(tokenizer)
    model.eval().to(device)
    check_sample_memory(cfg, len(prompts), model.config)
    rows = [encode(enc, p) for p in prompts for _ in range(cfg.num_samples)]
    idx, mask = left_pad(rows, enc.eot_token)
    if not cfg.max_new_tokens:  # 100, or what the context leaves after the longest prompt (at least 1)
        cfg.max_new_tokens = max(1, min(100, model.config.block_size - idx.size(1)))
    steps = ("--trace", cfg.trace) if cfg.trace else ("--max_new_tokens", cfg.max_new_tokens)  # new tokens, either way
    if idx.size(1) + steps[1] > model.config.block_size:
        raise UserError(
            f"prompt ({idx.size(1)} tokens) + {steps[0]}={steps[1]} exceed the context of {model.config.block_size}"
        )
    if kwargs.get("mode") == "label":
        kwargs["domain"] = torch.full((len(rows),), model.domains.index(cfg.domain), device=device)
    if cfg.trace:
        if not cfg.bundle or cfg.mode not in ("layer", "last", "vote"):
            raise UserError("--trace needs --bundle and a routing mode that decides at prefill: layer, last or vote")
        return trace(model, idx.to(device), mask.to(device), enc, cfg.trace, cfg.mode)
    out = model.generate(
        idx.to(device),
        cfg.max_new_tokens,
        cfg.temperature,
        cfg.top_k or None,
        cfg.top_p if cfg.top_p < 1 else None,
        pad_mask=mask.to(device),
        stop_token=enc.eot_token,
        generator=torch.Generator(device).manual_seed(cfg.seed),
        **kwargs,
    )
    routing = getattr(model, "routing", {})
    for i, tokens in enumerate(out.tolist()):
        head = f"--- prompt {i // cfg.num_samples + 1}, sample {i % cfg.num_samples + 1}"
        if "decision" in routing:
            k = int(routing["decision"][i])
            head += f" -> expert {model.domains[k]!r} (last router's confidence {routing['confidence'][i]:.2f})"
        print(head)
        text = tokens[idx.size(1) - len(rows[i]) :]  # the prompt and its continuation, up to <|endoftext|>
        print(
            enc.decode(
                text[: text.index(enc.eot_token, len(rows[i]))] if enc.eot_token in text[len(rows[i]) :] else text
            )
        )
    return out


if __name__ == "__main__":
    run(main)
