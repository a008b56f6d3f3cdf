"""The results: every variant of the method scored the same way on the same validation records of
every task, as the paper's Tables 2, 3, 5 and 8 in miniature, then the adding-a-task experiment.

    python results.py                 # reads out/ as demo.py writes it; writes out/results/results.{md,json} + PNGs
    python results.py --records=500   # validation records per task (default 256)

demo.py trains the base once (out/base) and everything else once per seed (out/runs/seed<N>/:
experts/, moa/). Each run is scored on its own; with several seeds a cell is their mean ± standard
deviation. Each record is served as a request would be (evaluate.evaluate_tasks): its prompt first,
where routed rows route, then its response. Rows, and the routing behind each:

  base                                   no expert
  Single-LoRA (label given)              each task's stage-1 expert, picked by the task label
  one LoRA, mixed tasks (rank r)         one LoRA trained on all tasks, the same training samples as MoA in all
  one LoRA, mixed tasks (rank K r)       ... with as many parameters as the K experts
  MoE-LoRA (no label loss)               the stage-1 experts + routers trained with eta = 0: per token, top-2
  MoE-LoRA naive (random experts)        the same from random experts, all of MoA's samples in this one stage
  MoA, routers only                      stage-1 experts frozen, routers trained with L_cls; mode --mode
  MoA (joint)                            experts and routers trained together (the paper's MoA); mode --mode
  MoA experts alone (label given)        MoA (joint)'s experts, each picked by the task label (Table 8)
  Classifier + LoRAs                     stage-1 experts, picked by a classifier of the prompt (baselines.py)
  Arrow (no labels, no training)         stage-1 experts mixed per token by Arrow (baselines.py)

A variant whose files are missing is skipped. Losses are in nats per response token.

Read next: demo.py.
"""

import glob
import json
import math
import os
from dataclasses import dataclass

import torch

import fast
from baselines import Arrow, ClassifierRouted, PromptClassifier
from config import AT_LEAST_1, UserError, one_of, parse_config, run
from evaluate import evaluate_tasks, left_pad
from files import add_expert_file, fingerprint, load_base, load_bundle, load_expert, read_meta, write_text
from moa import MoA
from tokenizer import encode, get_tokenizer
from trainer import TaskData, pick_device

HAND_WRITTEN = {  # what a user might type, phrased unlike the generated prompts: (prompt, answer)
    "upper": [
        ("make this word uppercase: river\n", "RIVER"),
        ("Write forest in capital letters.\n", "FOREST"),
        ("caps lock on: music\n", "MUSIC"),
    ],
    "double": [
        ("Repeat each letter two times: cat\n", "ccaatt"),
        ("write every character twice: moon\n", "mmoooonn"),
        ("Stutter the word dog\n", "ddoogg"),
    ],
    "reverse": [
        ("please reverse: garden\n", "nedrag"),
        ("what is 'window' spelled backwards?\n", "wodniw"),
        ("Flip the letters of planet around.\n", "tenalp"),
    ],
    "arith": [("How much is 45 plus 7?\n", "52"), ("Calculate 81-6.\n", "75"), ("Add 30 and 9.\n", "39")],
    "count": [
        ("length of 'table'?\n", "5"),
        ("How long is the word sun?\n", "3"),
        ("number of letters in dragon\n", "6"),
    ],
}


@dataclass
class ResultsConfig:
    out: str = "out"  # where demo.py put base/ and runs/seed<N>/
    data_dir: str = "data/default"
    records: int = 256  # validation records per task
    batch_size: int = 64
    mode: str = "last"  # how the routed MoA rows route: last | vote | layer (decided from the prompt)
    added: str = ""  # the task added later, for the adding-a-task table; "": the data set's held-back task
    plots: bool = True  # PNG pictures (needs matplotlib)
    fast: bool = True  # fast.py's speed paths (False: the plain method of moa.py; the same numbers)
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps

    CHECKS = {"records": AT_LEAST_1, "batch_size": AT_LEAST_1, "mode": one_of("last", "vote", "layer")}


def variants(cfg, K):
    """(row name, kind, file in the run folder, forward kwargs) of every main row, in the paper's order."""
    routed = {"mode": cfg.mode}
    return [
        ("base", "base", None, {}),
        ("Single-LoRA (label given)", "experts", None, {"mode": "label"}),
        ("one LoRA, mixed tasks (rank r)", "expert", "experts/all.safetensors", {}),
        (f"one LoRA, mixed tasks (rank {K}r)", "expert", f"experts/all_r{K}.safetensors", {}),
        ("MoE-LoRA (no label loss, token top-2)", "bundle", "moa/moe_lora.safetensors", {"mode": "token"}),
        ("MoE-LoRA naive (random experts)", "bundle", "moa/moe_lora_naive.safetensors", {"mode": "token"}),
        ("MoA, routers only", "bundle", "moa/moa_routers.safetensors", routed),
        ("MoA (joint)", "bundle", "moa/moa.safetensors", routed),
        ("MoA experts alone (label given)", "bundle", "moa/moa.safetensors", {"mode": "label"}),
        ("Classifier + LoRAs", "classifier", None, {}),
        ("Arrow (no labels, no training)", "arrow", None, {}),
    ]


def build(kind, path, run_dir, cfg, domains):
    """-> (model, parameters added to the base, training samples seen in all), or None if files are missing."""
    gpt, tokenizer = load_base(os.path.join(cfg.out, "base"))
    gpt.to(cfg.device)  # experts and routers are made on the base's device
    if kind == "base":
        return gpt, 0, 0
    if kind in ("experts", "classifier", "arrow"):  # the stage-1 experts side by side
        paths = [os.path.join(run_dir, "experts", f"{d}.safetensors") for d in domains]
        if not all(os.path.isfile(p) for p in paths):
            return None
        metas = [read_meta(p, "expert", gpt)[1] for p in paths]  # tensors checked: metas[0] sizes the MoA
        base = fingerprint(gpt)
        model = MoA(gpt, domains, metas[0]["rank"], metas[0]["alpha"], targets=metas[0]["targets"])
        for k, p in enumerate(paths):
            load_expert(p, model, k, base, tokenizer)
        samples = sum(m.get("samples", 0) for m in metas)
        added = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        if kind == "classifier":
            classifier = PromptClassifier(len(domains)).fit(TaskData(cfg.data_dir, ",".join(domains)))
            added += sum(p.numel() for p in classifier.parameters())
            model = ClassifierRouted(fast.enable(model, cfg.fast), classifier)
        elif kind == "arrow":
            model = Arrow(fast.enable(model, cfg.fast))
        return fast.enable(model, cfg.fast), added, samples
    path = os.path.join(run_dir, path)
    if not os.path.isfile(path):
        return None
    if kind == "expert":
        meta = add_expert_file(gpt, path, tokenizer)
        model = gpt
    else:
        model, meta = load_bundle(path, gpt, tokenizer)
    added = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n or n.startswith("routers."))
    return fast.enable(model, cfg.fast), added, meta.get("samples", 0)


def score(model, kwargs, data, cfg):
    """A variant's scores on the validation records; for routed models also their routing of the calib prompts
    (a phrasing no split trains on) and of the hand-written prompts, with the confidence they report there."""
    model.eval()
    row = evaluate_tasks(model, data, cfg.records, cfg.batch_size, **kwargs)
    if "route_mean" not in row:
        return row
    if all(data.count(d, "calib") for d in data.domains):
        row["unseen_mean"] = evaluate_tasks(model, data, cfg.records, cfg.batch_size, False, "calib", **kwargs)[
            "route_mean"
        ]
    enc = get_tokenizer(data.tokenizer)
    rows, truth = [], []
    for label, name in enumerate(data.domains):
        rows += [encode(enc, p) for p, _ in HAND_WRITTEN.get(name, [])]
        truth += [label] * len(HAND_WRITTEN.get(name, []))
    idx, mask = left_pad(rows, data.eot)
    model.routing = {}
    with torch.no_grad():
        model(idx.to(cfg.device), pad_mask=mask.to(cfg.device), **kwargs)
    right = model.routing["decision"].cpu() == torch.tensor(truth)
    row["hand_mean"] = right.float().mean().item()
    if "confidence" in model.routing:  # MoA's last router, at its calibrated temperature
        confidence = model.routing["confidence"].cpu()
        for key, which in (("hand_confidence_right", right), ("hand_confidence_wrong", ~right)):
            if which.any():
                row[key] = confidence[which].mean().item()
    return row


def runs(out):
    """The run folders demo.py wrote, out/runs/seed<N>, in seed order."""
    found = glob.glob(os.path.join(out, "runs", "seed*"))
    return sorted(found, key=lambda p: int(os.path.basename(p)[4:]) if os.path.basename(p)[4:].isdigit() else 0)


def aggregate(rows_per_run):
    """[{row: {metric: value}}] per run -> {row: {metric: (mean, std over runs, runs)}} (lists are kept from run 1)."""
    out = {}
    for name in rows_per_run[0]:
        values = [r[name] for r in rows_per_run if name in r]
        out[name] = {}
        for key, first in values[0].items():
            if isinstance(first, (int, float)):
                xs = [v[key] for v in values if key in v]
                mean = sum(xs) / len(xs)
                std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
                out[name][key] = (mean, std, len(xs))
            else:
                out[name][key] = first
    return out


def cell(stat, percent=False, digits=3):
    """(mean, std, n) -> "mean" or "mean ± std" (n > 1); a percentage with percent."""
    mean, std, n = stat
    scale, unit = (100, "%") if percent else (1, "")
    text = f"{scale * mean:.{1 if percent else digits}f}{unit}"
    return text + (f" ± {scale * std:.{1 if percent else digits}f}" if n > 1 else "")


def table(rows, domains, metric, percent=False, extra=()):
    """A markdown table of one metric: a row per variant, a column per task, then the mean and extra columns."""
    head = "| variant | " + " | ".join(domains) + " | mean" + "".join(f" | {h}" for h, _ in extra) + " |"
    lines = [head, "|" + "---|" * (len(domains) + 2 + len(extra))]
    for name, r in rows.items():
        if f"{metric}_mean" not in r:
            continue
        cells = [cell(r[f"{metric}/{d}"], percent) if f"{metric}/{d}" in r else "-" for d in domains]
        cells.append(cell(r[f"{metric}_mean"], percent))
        lines.append(f"| {name} | " + " | ".join(cells) + "".join(f" | {f(r)}" for _, f in extra) + " |")
    return "\n".join(lines)


def em_error(r, n_records, K):
    """The standard error of one run's mean exact match over K tasks of n_records each (binomial)."""
    p = [r[k][0] for k in r if k.startswith("em/")]
    return math.sqrt(sum(x * (1 - x) / n_records for x in p)) / K


def main_tables(rows, domains, cfg):
    K = len(domains)
    about = [
        ("params", lambda r: f"{int(r['params'][0]):,}"),
        ("samples trained", lambda r: f"{int(r['samples'][0]):,}"),
        ("routing", lambda r: r["routing"]),
    ]
    return "\n\n".join(
        [
            "Response loss (nats per token; perplexity is its exp):\n\n" + table(rows, domains, "loss", extra=about),
            "Exact match of the greedy answer (the last column: one run's standard error of the mean):\n\n"
            + table(rows, domains, "em", True, [("s.e.", lambda r: f"{100 * em_error(r, cfg.records, K):.1f}")]),
            "ROUGE-L of the greedy answer against the reference, over characters:\n\n"
            + table(rows, domains, "rouge", True),
            f"Routing accuracy from the prompt (validation prompts; mode {cfg.mode} for MoA), on prompts in a phrasing "
            f"no split trains on (calib), and on {sum(len(v) for v in HAND_WRITTEN.values()) // len(HAND_WRITTEN)} "
            "hand-written prompts per task, with the last router's mean confidence in right and wrong routes there:\n\n"
            + table(
                rows,
                domains,
                "route",
                True,
                [
                    ("unseen phrasing", lambda r: cell(r["unseen_mean"], True) if "unseen_mean" in r else "-"),
                    ("hand-written", lambda r: cell(r["hand_mean"], True)),
                    (
                        "confidence right / wrong",
                        lambda r: (
                            " / ".join(
                                f"{r[k][0]:.2f}" if k in r else "-"
                                for k in ("hand_confidence_right", "hand_confidence_wrong")
                            )
                            if "hand_confidence_right" in r or "hand_confidence_wrong" in r
                            else "-"
                        ),
                    ),
                ],
            ),
        ]
    )


def adaptation(cfg, run_dir, old, new):
    """Adding a task: the old tasks before and after, against the obvious alternatives -> rows, or None."""
    rows = {}
    data = TaskData(cfg.data_dir, ",".join(old + [new]))
    before, mixed = "MoA before", "mixed LoRA before"
    for name, path, kwargs, reference in [
        (before, "moa/moa.safetensors", {"mode": cfg.mode}, None),
        (f"MoA + {new} (new router row only)", f"moa/moa+{new}.safetensors", {"mode": cfg.mode}, before),
        (f"MoA + {new} (every router row retrained)", f"moa/moa+{new}_allrows.safetensors", {"mode": cfg.mode}, before),
        (f"{new} expert alone", f"experts/{new}.safetensors", {}, None),
        (mixed, "experts/all.safetensors", {}, None),
        (f"mixed LoRA, trained on {new}", f"experts/all+{new}.safetensors", {}, mixed),
        ("MoA retrained on K+1 tasks", "moa/moa_all.safetensors", {"mode": cfg.mode}, before),
    ]:
        built = build("expert" if path.startswith("experts") else "bundle", path, run_dir, cfg, data.domains)
        if built is None:
            return None
        model = built[0]
        if isinstance(model, MoA) and new not in model.domains:  # a K-task bundle scores the K old tasks
            row = evaluate_tasks(
                model.eval(), TaskData(cfg.data_dir, ",".join(old)), cfg.records, cfg.batch_size, **kwargs
            )
        else:
            row = evaluate_tasks(model.eval(), data, cfg.records, cfg.batch_size, **kwargs)
        row["old_loss"] = sum(row[f"loss/{d}"] for d in old) / len(old)
        row["old_em"] = sum(row[f"em/{d}"] for d in old) / len(old)
        if f"route/{old[0]}" in row:
            row["old_route"] = sum(row[f"route/{d}"] for d in old) / len(old)
        if reference:  # the targets: no old task's loss worse by more than 1%, old routing within 0.5 points
            ref = rows[reference]
            row["worst_old"] = max(row[f"loss/{d}"] / ref[f"loss/{d}"] - 1 for d in old)
            if "old_route" in row:
                row["old_route_change"] = row["old_route"] - ref["old_route"]
        rows[name] = row
    return rows


def adaptation_table(rows, domains, new):
    columns = [
        ("old tasks' loss", lambda r: cell(r["old_loss"])),
        ("worst old task", lambda r: cell(r["worst_old"], True) if "worst_old" in r else "-"),
        ("old EM", lambda r: cell(r["old_em"], True)),
        ("old routing", lambda r: cell(r["old_route"], True) if "old_route" in r else "-"),
        (
            "change (points)",
            lambda r: (
                cell(tuple(100 * v if i < 2 else v for i, v in enumerate(r["old_route_change"])), digits=1)
                if "old_route_change" in r
                else "-"
            ),
        ),
        (f"{new} routing", lambda r: cell(r[f"route/{new}"], True) if f"route/{new}" in r else "-"),
        (f"{new} EM", lambda r: cell(r[f"em/{new}"], True) if f"em/{new}" in r else "-"),
    ]
    return table(rows, domains, "loss", extra=columns)


def main(argv=None):
    cfg = parse_config(ResultsConfig, argv or [])
    cfg.device = pick_device(cfg.device)[0]  # auto -> the device; one that is not here: a one-line error
    if not os.path.isfile(os.path.join(cfg.out, "base", "ckpt.pt")):
        raise UserError(f"no base in {cfg.out}/base: run `python demo.py` first")
    run_dirs = runs(cfg.out)
    if not run_dirs:
        raise UserError(f"no runs in {cfg.out}/runs/: run `python demo.py` first")
    data = TaskData(cfg.data_dir, "all")
    new = cfg.added or (data.meta["held_back"] or [""])[0]
    per_run, adapted = [], []
    for run_dir in run_dirs:
        rows = {}
        for name, kind, path, kwargs in variants(cfg, len(data.domains)):
            built = build(kind, path, run_dir, cfg, data.domains)
            if built is None:
                print(f"{os.path.basename(run_dir)}: skipped {name}: files not found")
                continue
            model, params, samples = built
            rows[name] = {
                **score(model, kwargs, data, cfg),
                "params": params,
                "samples": samples,
                "routing": kwargs.get(
                    "mode", "classifier" if kind == "classifier" else "arrow" if kind == "arrow" else "none"
                ),
            }
            print(
                f"{os.path.basename(run_dir)}: {name}: loss {rows[name]['loss_mean']:.4f}, "
                f"exact match {100 * rows[name]['em_mean']:.1f}%"
            )
        per_run.append(rows)
        held_back = new in data.meta["tasks"] and new not in data.domains
        added = adaptation(cfg, run_dir, data.domains, new) if held_back else None
        if added is not None:
            adapted.append(added)
    rows = aggregate(per_run)
    text = (
        f"{len(per_run)} run(s): {', '.join(os.path.basename(r) for r in run_dirs)}; {cfg.records} validation "
        f"records per task.\n\n" + main_tables(rows, data.domains, cfg)
    )
    results = {"runs": run_dirs, "variants": per_run}
    if adapted:
        results["adaptation"] = adapted
        text += f"\n\nAdding the task {new} (loss per task; routing in mode {cfg.mode}):\n\n" + adaptation_table(
            aggregate(adapted), data.domains + [new], new
        )
    folder = os.path.join(cfg.out, "results")
    os.makedirs(folder, exist_ok=True)
    write_text(os.path.join(folder, "results.json"), json.dumps(results, indent=1))
    write_text(os.path.join(folder, "results.md"), text + "\n")
    print(text)
    if cfg.plots:
        pictures(cfg, rows, data.domains, run_dirs[0])
    return rows


def pictures(cfg, rows, domains, run_dir):
    """Per-task bars of the main rows, each expert's learning curve beside the mixed LoRA's, and MoA's routing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no pictures: `pip install matplotlib` for them")
        return
    folder = os.path.join(cfg.out, "results")
    main = [
        n
        for n in (
            "base",
            "Single-LoRA (label given)",
            "one LoRA, mixed tasks (rank r)",
            "MoA (joint)",
            "Classifier + LoRAs",
            "Arrow (no labels, no training)",
        )
        if n in rows
    ]
    fig, axes = plt.subplots(1, 2, figsize=(14, 4))
    for ax, metric, label in ((axes[0], "em", "exact match"), (axes[1], "loss", "response loss (nats/token)")):
        width = 0.8 / len(main)
        for i, name in enumerate(main):
            means = [rows[name][f"{metric}/{d}"][0] for d in domains]
            errs = [rows[name][f"{metric}/{d}"][1] for d in domains]
            ax.bar([j + i * width for j in range(len(domains))], means, width, yerr=errs, label=name)
        ax.set(
            xticks=[j + 0.4 - width / 2 for j in range(len(domains))],
            xticklabels=domains,
            ylabel=label,
            title=f"{label} per task",
        )
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "tasks.png"), dpi=100)

    fig, axes = plt.subplots(1, len(domains), figsize=(4 * len(domains), 3.5), squeeze=False)
    for ax, d in zip(axes[0], domains):
        for expert, label in ((d, f"{d} expert"), ("all", "mixed LoRA")):
            log = os.path.join(run_dir, "experts", expert, "log.jsonl")
            if os.path.isfile(log):
                with open(log) as f:
                    points = [json.loads(line) for line in f]
                ax.plot([p["step"] for p in points], [p[f"loss/{d}"] for p in points], marker="o", label=label)
        ax.set(title=f"{d}: loss on its validation records", xlabel="training step", ylabel="nats per token")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "learning.png"), dpi=100)

    moa = rows.get("MoA (joint)")
    if moa and "confusion" in moa:
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.imshow(moa["confusion"], cmap="Blues")
        for i, counts in enumerate(moa["confusion"]):
            for j, n in enumerate(counts):
                ax.text(j, i, n, ha="center", va="center")
        ax.set(
            title=f"MoA: where each task's prompts went (mode {cfg.mode})",
            xticks=range(len(domains)),
            yticks=range(len(domains)),
            xticklabels=domains,
            yticklabels=domains,
            xlabel="expert",
            ylabel="task",
        )
        fig.tight_layout()
        fig.savefig(os.path.join(folder, "routing.png"), dpi=100)
    print(f"pictures in {folder}")


if __name__ == "__main__":
    run(main)
