"""The results table: every variant of the method measured the same way on the same windows.

    python results.py            # reads out/, writes out/results/results.{json,md} and PNG pictures

A miniature of the paper's Tables 2, 3, 7 and 8 on the default data: per-domain validation loss and
perplexity with their average, router accuracy per domain, exact-match accuracy on the arithmetic
domain (greedy decoding, without a domain label for routed variants), and parameters added to the
base, for: the base; each domain's own stage-1 expert (oracle); one LoRA on mixed data (rank r, and
rank K*r: as many parameters as all K experts); MoE-LoRA and MoE-LoRA naive; MoA with routers only;
MoA joint; each expert alone after joint training. Then the sequential domain adaptation table.
A variant whose files are missing is skipped (demo.py trains them all).

Read next: demo.py.
"""
import json
import math
import os
from dataclasses import dataclass

import torch

from data.prepare import arith_problems
from evaluate import domain_losses, exact_match, per_sample_loss, routed_losses
from moa import MoA, add_experts, base_fingerprint, load_bundle, load_expert, read_meta, set_route
from tokenizer import get_tokenizer
from train_base import load_base
from trainer import DomainData, UserError, parse_config, run


@dataclass
class ResultsConfig:
    out: str = "out"  # where demo.py put base/, experts/, moa/
    data_dir: str = "data/default"
    block_size: int = 128
    windows: int = 64  # validation windows per domain
    problems: int = 200  # held-out arithmetic problems for exact match
    shots: int = 3  # solved problems before each one
    plots: bool = True  # PNG pictures (needs matplotlib)


def variants(out, domains):
    """(row name, kind, file) of every variant the table can hold, in the paper's order."""
    K = len(domains)
    return [("base", "base", None),
            ("stage-1 experts (oracle)", "stage1", None),
            ("one LoRA, mixed data (rank r)", "lora", f"{out}/experts/all.safetensors"),
            (f"one LoRA, mixed data (rank {K}r)", "lora", f"{out}/experts/all_r{K}.safetensors"),
            ("MoE-LoRA (eta=0, token top-2)", "bundle", f"{out}/moa/moe_lora.safetensors"),
            ("MoE-LoRA naive (random experts)", "bundle", f"{out}/moa/moe_lora_naive.safetensors"),
            ("MoA, routers only", "bundle", f"{out}/moa/moa_routers.safetensors"),
            ("MoA (joint)", "bundle", f"{out}/moa/moa.safetensors"),
            ("MoA (joint), each expert alone", "oracle", f"{out}/moa/moa.safetensors")]


def build_variant(kind, path, cfg, domains):
    """-> (model, forward kwargs for routing, parameters added to the base), or None if files are missing."""
    base, tokenizer = load_base(os.path.join(cfg.out, "base"))
    fingerprint = base_fingerprint(base)
    if kind == "base":
        return base, {}, 0
    if kind == "stage1":
        paths = [os.path.join(cfg.out, "experts", f"{d}.safetensors") for d in domains]
        if not all(os.path.isfile(p) for p in paths):
            return None
        meta = read_meta(paths[0], "expert")[1]
        moa = MoA(base, domains, meta["rank"], meta["alpha"], targets=meta["targets"])
        for k, p in enumerate(paths):
            load_expert(p, moa, k, fingerprint, tokenizer)
        return moa, {"mode": "oracle"}, sum(p.numel() for n, p in moa.named_parameters() if "lora_" in n)
    if not os.path.isfile(path):
        return None
    if kind == "lora":
        meta = read_meta(path, "expert")[1]
        add_experts(base, 1, meta["rank"], meta["alpha"], 0.0, meta["targets"])
        load_expert(path, base, 0, fingerprint, tokenizer)
        set_route(base, 0)
        return base, {}, sum(p.numel() for n, p in base.named_parameters() if "lora_" in n)
    moa, meta = load_bundle(path, base, tokenizer, fingerprint)
    mode = "oracle" if kind == "oracle" else "token" if meta.get("routing") == "token" else "layer"
    return moa, {"mode": mode}, sum(p.numel() for n, p in moa.named_parameters() if "lora_" in n or n.startswith("routers."))


def measure(model, kwargs, data, enc, cfg):
    """Validation losses (+ router accuracy for routed MoA) and arithmetic exact match of one variant."""
    model.eval()
    mode = kwargs.get("mode")
    if isinstance(model, MoA):
        data = DomainData(cfg.data_dir, ",".join(model.domains), cfg.block_size)
        row = routed_losses(model, data, cfg.windows, 32, mode)
    else:
        row = domain_losses(lambda x, y, d: per_sample_loss(model(x)[0], y), data, cfg.windows, 32)
    if mode == "oracle":  # routers did not choose here; report their accuracy under routing only
        row = {k: v for k, v in row.items() if not k.startswith("route_")}
    if "arith" in data.domains:
        gen_kwargs = {"mode": "last"} if mode == "layer" else kwargs  # routed: one decision from the prompt
        arith = data.domains.index("arith")

        def generate(idx, mask, n):
            label = {"domain": torch.full((idx.size(0),), arith)} if mode == "oracle" else {}
            return model.generate(idx, n, temperature=0, pad_mask=mask, **gen_kwargs, **label)
        row["arith_exact_match"] = exact_match(generate, enc, arith_problems(cfg.problems, 1, test=True),
                                               arith_problems(cfg.shots, 2))
    return row


def markdown(rows, domains):
    cols = [f"val/{d}" for d in domains]
    head = "| variant | " + " | ".join(domains) + " | mean loss | mean ppl | router acc | arith EM | params |"
    lines = [head, "|" + "---|" * (len(domains) + 6)]
    for name, r in rows.items():
        acc = f"{100 * r['route_acc_mean']:.1f}%" if "route_acc_mean" in r else "-"
        em = f"{100 * r['arith_exact_match']:.1f}%" if "arith_exact_match" in r else "-"
        ppl = sum(math.exp(r[c]) for c in cols) / len(cols)
        lines.append(f"| {name} | " + " | ".join(f"{r[c]:.4f}" for c in cols) +
                     f" | {r['val_mean']:.4f} | {ppl:.3f} | {acc} | {em} | {r['params']:,} |")
    return "\n".join(lines)


def main(argv=None):
    cfg = parse_config(ResultsConfig, argv or [])
    data = DomainData(cfg.data_dir, "all", cfg.block_size)
    _, tokenizer = load_base(os.path.join(cfg.out, "base"))
    enc = get_tokenizer(tokenizer)
    rows = {}
    for name, kind, path in variants(cfg.out, data.domains):
        built = build_variant(kind, path, cfg, data.domains)
        if built is None:
            print(f"skipped {name}: {path} not found")
            continue
        model, kwargs, params = built
        rows[name] = {**measure(model, kwargs, data, enc, cfg), "params": params}
        print(f"{name}: mean val loss {rows[name]['val_mean']:.4f}")
    if not rows:
        raise UserError(f"nothing to measure in {cfg.out}: run `python demo.py` first")
    table = markdown(rows, data.domains)
    os.makedirs(os.path.join(cfg.out, "results"), exist_ok=True)
    with open(os.path.join(cfg.out, "results", "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(cfg.out, "results", "results.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    return rows


if __name__ == "__main__":
    run(main)
