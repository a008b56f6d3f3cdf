"""The results table: every variant of the method measured the same way on the same windows.

    python results.py            # reads out/, writes out/results/results.{json,md} and PNG pictures

A miniature of the paper's Tables 2, 3, 7 and 8 on the default data: per-domain validation loss and
perplexity with their average, router accuracy (on whole windows, and on their first 32 bytes as
prompts), exact-match accuracy on the arithmetic domain (greedy decoding, without a domain label for
routed variants), and parameters added to the base, for: the base; each domain's own stage-1
expert (label given); one LoRA on mixed data (rank r, and rank K*r: as many parameters as all K experts);
MoE-LoRA and MoE-LoRA naive; MoA with routers only; MoA joint; each expert alone after joint training.
Then the sequential domain adaptation table. A variant whose files are missing is skipped (demo.py
trains them all).

Read next: demo.py.
"""
import json
import math
import os
from dataclasses import dataclass

import torch

import fast
from config import UserError, parse_config, run
from data.prepare import arith_problems
from evaluate import domain_losses, exact_match, per_sample_loss, routed_losses
from files import add_expert_file, fingerprint, load_base, load_bundle, load_expert, read_meta
from moa import MoA
from tokenizer import get_tokenizer
from trainer import DomainData


@dataclass
class ResultsConfig:
    out: str = "out"  # where demo.py put base/, experts/, moa/
    data_dir: str = "data/default"
    block_size: int = 128
    windows: int = 64  # validation windows per domain
    problems: int = 200  # held-out arithmetic problems for exact match
    shots: int = 3  # solved problems before each one
    plots: bool = True  # PNG pictures (needs matplotlib)
    fast: bool = True  # fast.py's speed paths (False: the plain method of moa.py; the same numbers)


def variants(out, domains):
    """(row name, kind, file) of every variant the table can hold, in the paper's order."""
    K = len(domains)
    return [("base", "base", None),
            ("stage-1 experts (label given)", "stage1", None),
            ("one LoRA, mixed data (rank r)", "lora", f"{out}/experts/all.safetensors"),
            (f"one LoRA, mixed data (rank {K}r)", "lora", f"{out}/experts/all_r{K}.safetensors"),
            ("MoE-LoRA (eta=0, token top-2)", "bundle", f"{out}/moa/moe_lora.safetensors"),
            ("MoE-LoRA naive (random experts)", "bundle", f"{out}/moa/moe_lora_naive.safetensors"),
            ("MoA, routers only", "bundle", f"{out}/moa/moa_routers.safetensors"),
            ("MoA (joint)", "bundle", f"{out}/moa/moa.safetensors"),
            ("MoA (joint), each expert alone", "label", f"{out}/moa/moa.safetensors")]


def build_variant(kind, path, cfg, domains):
    """-> (model, forward kwargs for routing, parameters added to the base), or None if files are missing."""
    gpt, tokenizer = load_base(os.path.join(cfg.out, "base"))
    if kind == "base":
        return gpt, {}, 0
    if kind == "stage1":
        paths = [os.path.join(cfg.out, "experts", f"{d}.safetensors") for d in domains]
        if not all(os.path.isfile(p) for p in paths):
            return None
        meta = read_meta(paths[0], "expert")[1]
        base = fingerprint(gpt)
        model = MoA(gpt, domains, meta["rank"], meta["alpha"], targets=meta["targets"])
        for k, p in enumerate(paths):
            load_expert(p, model, k, base, tokenizer)
        kwargs = {"mode": "label"}
    elif not os.path.isfile(path):
        return None
    elif kind == "lora":
        add_expert_file(gpt, path, tokenizer)
        model, kwargs = gpt, {}
    else:
        model, meta = load_bundle(path, gpt, tokenizer)
        kwargs = {"mode": "label" if kind == "label" else "token" if meta.get("mode") == "token" else "layer"}
    routers = kind in ("bundle", "label")  # a bundle's routers count; stage-1 experts have none of their own
    added = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n or (routers and n.startswith("routers.")))
    return fast.enable(model, cfg.fast), kwargs, added


def measure(model, kwargs, data, enc, cfg):
    """Validation losses (+ router accuracy for routed MoA) and arithmetic exact match of one variant."""
    model.eval()
    mode = kwargs.get("mode")
    if isinstance(model, MoA):
        data = DomainData(cfg.data_dir, ",".join(model.domains), cfg.block_size)
        row = routed_losses(model, data, cfg.windows, 32, mode)
    else:
        row = domain_losses(lambda x, y, d: per_sample_loss(model(x)[0], y), data, cfg.windows, 32)
    if mode == "label":  # routers did not choose here; report their accuracy under routing only
        row = {k: v for k, v in row.items() if not k.startswith("route_")}
    if "arith" in data.domains:
        gen_kwargs = {"mode": "last"} if mode == "layer" else kwargs  # routed: one decision from the prompt
        arith = data.domains.index("arith")

        def generate(idx, mask, n):
            label = {"domain": torch.full((idx.size(0),), arith)} if mode == "label" else {}
            return model.generate(idx, n, temperature=0, pad_mask=mask, **gen_kwargs, **label)
        row["arith_exact_match"] = exact_match(generate, enc, arith_problems(cfg.problems, 1, test=True),
                                               arith_problems(cfg.shots, 2))
    return row


def markdown(rows, domains, extra=()):
    """A markdown table: one row per variant, a loss column per domain, then summary columns.

    extra: (header, function of a row -> str) pairs for further columns; a missing value prints "-".
    """
    lines = ["| variant | " + " | ".join(domains) + "".join(f" | {h}" for h, _ in extra) + " |",
             "|" + "---|" * (len(domains) + len(extra) + 1)]
    for name, r in rows.items():
        cells = [f"{r[f'val/{d}']:.4f}" if f"val/{d}" in r else "-" for d in domains]
        lines.append(f"| {name} | " + " | ".join(cells) + "".join(f" | {f(r)}" for _, f in extra) + " |")
    return "\n".join(lines)


def percent(key):
    return lambda r: f"{100 * r[key]:.1f}%" if key in r else "-"


MAIN_COLUMNS = [("mean loss", lambda r: f"{r['val_mean']:.4f}"),
                ("mean ppl", lambda r: f"{sum(math.exp(v) for k, v in r.items() if k.startswith('val/')) / sum(k.startswith('val/') for k in r):.3f}"),
                ("router acc", percent("route_acc_mean")), ("32-byte prompts", percent("route_acc_prompt")),
                ("arith EM", percent("arith_exact_match")),
                ("params", lambda r: f"{r['params']:,}")]


def train_time(run_dir):
    """Seconds a run trained, from the last line of its log.jsonl."""
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return json.loads(f.readlines()[-1])["time_s"]


def adaptation(cfg, enc, old, new="unicode"):
    """Sequential domain adaptation: the old domains before and after adding `new`, against the two
    obvious alternatives (keep training the mixed-data LoRA; retrain the whole MoA on K+1 domains)."""
    ex, mo = os.path.join(cfg.out, "experts"), os.path.join(cfg.out, "moa")
    before, lora_before = "MoA before (K domains)", "mixed-data LoRA before"
    runs = [(before, "bundle", f"{mo}/moa.safetensors", f"{mo}/moa", None),
            (f"MoA + {new} (added: new router rows only)", "bundle", f"{mo}/moa+{new}.safetensors", f"{mo}/moa+{new}",
             before),
            (f"MoA + {new} (added: every router row retrained)", "bundle", f"{mo}/moa+{new}_allrows.safetensors",
             f"{mo}/moa+{new}_allrows", before),
            (f"{new} expert alone (stage 1)", "lora", f"{ex}/{new}.safetensors", f"{ex}/{new}", None),
            (lora_before, "lora", f"{ex}/all.safetensors", f"{ex}/all", None),
            (f"mixed-data LoRA, trained on {new}", "lora", f"{ex}/all+{new}.safetensors", f"{ex}/all+{new}", lora_before),
            ("MoA retrained on K+1 domains", "bundle", f"{mo}/moa5.safetensors", f"{mo}/moa5", before)]
    data = DomainData(cfg.data_dir, ",".join(old + [new]), cfg.block_size)
    rows = {}
    for name, kind, path, run_dir, reference in runs:
        built = build_variant(kind, path, cfg, data.domains)
        if built is None:
            return None
        model, kwargs, _ = built
        row = measure(model, kwargs, data, enc, cfg)
        row["old_mean"] = sum(row[f"val/{d}"] for d in old) / len(old)
        if "route_acc_mean" in row:
            row["old_route_acc"] = sum(row[f"route_acc/{d}"] for d in old) / len(old)
        if reference:  # the test: no old domain worse by more than 1%, old routing within 0.5 points
            ref = rows[reference]
            row["worst_old_change"] = max(row[f"val/{d}"] / ref[f"val/{d}"] - 1 for d in old)
            if "old_route_acc" in row:
                row["old_route_change"] = row["old_route_acc"] - ref["old_route_acc"]
        row["train_s"] = train_time(run_dir)
        rows[name] = row
    columns = [("old-domain mean", lambda r: f"{r['old_mean']:.4f}"),
               ("worst old domain", lambda r: f"{100 * r['worst_old_change']:+.1f}%" if "worst_old_change" in r else "-"),
               ("old routing acc", percent("old_route_acc")),
               ("change", lambda r: f"{100 * r['old_route_change']:+.1f} pt" if "old_route_change" in r else "-"),
               (f"{new} routing acc", percent(f"route_acc/{new}")), ("arith EM", percent("arith_exact_match")),
               ("training time", lambda r: f"{r['train_s']:.0f}s")]
    return rows, markdown(rows, data.domains, columns)


def routing_ceiling(data, cfg, bins=2048, steps=300):
    """How well a window's domain can be told from its tokens alone, for comparison with the routers: a
    logistic regression on counts of tokens and of token pairs (hashed into `bins` each), trained on
    12,800 random training windows and scored on the validation windows the table uses."""
    def features(x):  # (B, T) ids -> (B, 2 * bins) frequencies
        f = torch.zeros(x.size(0), 2 * bins)
        f.scatter_add_(1, x % bins, torch.ones(x.shape))
        pairs = (x[:, :-1] * 1_000_003 + x[:, 1:]) % bins + bins
        f.scatter_add_(1, pairs, torch.ones(pairs.shape))
        return f / x.size(1)

    g = torch.Generator().manual_seed(0)
    batches = [data.batch(64, g) for _ in range(200)]
    X, labels = torch.cat([features(x) for x, _, _ in batches]), torch.cat([d for _, _, d in batches])
    classifier = torch.nn.Linear(2 * bins, len(data.domains))
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-2, weight_decay=1e-5)
    for _ in range(steps):  # full batch
        loss = torch.nn.functional.cross_entropy(classifier(X), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        right = sum((classifier(features(data.windows(name, "val", data.eval_starts(name, cfg.windows))[0])).argmax(1)
                     == k).sum().item() for k, name in enumerate(data.domains))
    return right / (cfg.windows * len(data.domains))


def pictures(cfg, rows):
    """Loss curves of every run, the MoA routers' confusion matrix and per-layer accuracy, as PNGs."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no pictures: `pip install matplotlib` for them")
        return
    folder = os.path.join(cfg.out, "results")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, stage in zip(axes, ("base", "experts", "moa")):
        root = os.path.join(cfg.out, stage)
        run_dirs = [root] if stage == "base" else sorted(os.path.join(root, d) for d in os.listdir(root))
        for run_dir in run_dirs:
            log = os.path.join(run_dir, "log.jsonl")
            if os.path.isfile(log):
                with open(log) as f:
                    points = [json.loads(line) for line in f]
                ax.plot([p["step"] for p in points], [p["val_mean"] for p in points], marker="o",
                        label=os.path.basename(run_dir))
        ax.set(title=f"{stage}: mean validation loss", xlabel="step", ylabel="loss (nats/token)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "loss_curves.png"), dpi=100)
    moa = rows.get("MoA (joint)")
    if moa and "route_confusion" in moa:
        domains = [k.split("/", 1)[1] for k in moa if k.startswith("val/")]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        a1.imshow(moa["route_confusion"], cmap="Blues")
        for i, row in enumerate(moa["route_confusion"]):
            for j, n in enumerate(row):
                a1.text(j, i, n, ha="center", va="center")
        a1.set(title="MoA: last router's choice (validation windows)", xticks=range(len(domains)),
               yticks=range(len(domains)), xticklabels=domains, yticklabels=domains, xlabel="routed to", ylabel="domain")
        for name in ("MoA (joint)", "MoA, routers only"):
            if name in rows and "route_acc_layers" in rows[name]:
                a2.plot(range(len(rows[name]["route_acc_layers"])), rows[name]["route_acc_layers"], marker="o", label=name)
        a2.set(title="routing accuracy per layer", xlabel="layer (router before block i)", ylabel="accuracy")
        a2.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(folder, "routing.png"), dpi=100)
    print(f"pictures in {folder}")


def main(argv=None):
    cfg = parse_config(ResultsConfig, argv or [])
    data = DomainData(cfg.data_dir, "all", cfg.block_size)
    if not os.path.isfile(os.path.join(cfg.out, "base", "ckpt.pt")):
        raise UserError(f"no base in {cfg.out}/base: run `python demo.py` first")
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
    table = markdown(rows, data.domains, MAIN_COLUMNS)
    results = {"variants": rows, "routing_ceiling": routing_ceiling(data, cfg)}
    table += (f"\n\nFrom its tokens alone (a logistic regression on token and token-pair counts), a window's domain "
              f"is told right {100 * results['routing_ceiling']:.1f}% of the time: the routers' ceiling, roughly.")
    adapted = adaptation(cfg, enc, data.domains)
    if adapted is not None:
        results["adaptation"], adapt_table = adapted
        table += "\n\nAdding a domain (unicode):\n\n" + adapt_table
    os.makedirs(os.path.join(cfg.out, "results"), exist_ok=True)
    with open(os.path.join(cfg.out, "results", "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(cfg.out, "results", "results.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    if cfg.plots:
        pictures(cfg, rows)
    return rows


if __name__ == "__main__":
    run(main)
