"""The results: every variant scored the same way on the same validation records of every task, then the
comparisons the README draws, each under a control it names.

    python results.py                 # reads out/ as demo.py writes it; writes out/results/results.{md,json} + PNGs
    python results.py --records=500   # validation records per task (default 256)
    python results.py --out=out/mine --data_dir=data/mine   # your own tasks, as demo.py --data_dir=... ran them

demo.py trains the base once (out/base) and everything else once per seed (out/runs/seed<N>/). Each run is
scored on its own; with several seeds a cell is their mean ± standard deviation over seeds. Each record is
served as a request would be (evaluate.evaluate_tasks): its prompt first, where routed rows route, then its
response. The tables:

- Main rows, each model at its plateau (the same stopping rule for every one): response loss, exact match
  and ROUGE-L per task; the routing from the prompt on validation prompts, on the unseen phrasing family (your
  tasks: prepare.py --phrasings) and on the hand-written prompts (data/tasks.py), with exact match there too,
  and the confidence MoA reports on right and on wrong routes of each.
- The controls: MoA against the shared LoRAs at equal training records, at equal optimizer updates (for each
  budget of demo.py --budgets) and at each one's plateau.
- The transfer matrix (demo.py --full): task i from a LoRA trained on i alone against one trained on i and
  j, with the same records of i.
- Adding a task; the imbalanced variant; the regime (a base that saw the skills, or not).

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
from batches import TaskData
from config import AT_LEAST_1, UserError, one_of, parse_config, run
from data.tasks import HAND_WRITTEN
from evaluate import answers, evaluate_tasks
from files import add_expert_file, fingerprint, load_base, load_bundle, load_expert, read_meta
from moa import SERVE_MODE, MoA, added_by_moa
from storage import write_text
from tokenizer import encode, get_tokenizer
from trainer import pick_device


@dataclass
class ResultsConfig:
    out: str = "out"  # where demo.py put base/ and runs/seed<N>/
    data_dir: str = "data/default"  # the data set the runs were trained on
    records: int = 256  # validation records per task
    batch_size: int = 64  # records scored at once
    mode: str = SERVE_MODE  # how the routed MoA rows route: last | vote | layer (decided from the prompt)
    budgets: str = ""  # demo.py's --budgets ("": found from the files)
    added: str = ""  # the task added later, for the adding-a-task table; "": the data set's held-back task
    plots: bool = True  # PNG pictures (needs matplotlib)
    fast: bool = True  # fast.py's speed paths (False: the plain method of moa.py; the same numbers)
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps

    CHECKS = {"records": AT_LEAST_1, "batch_size": AT_LEAST_1, "mode": one_of("last", "vote", "layer")}


# ----------------------------------------------------------------------------------------------
# Building and scoring one variant


def main_rows(cfg, K):
    """(row name, kind, file in the run folder, forward kwargs) of every main row, in the paper's order."""
    routed, other = {"mode": cfg.mode}, "last" if cfg.mode == "vote" else "vote"
    return [
        ("base", "base", None, {}),
        ("stage-1 experts (label given)", "experts", "experts", {"mode": "label"}),
        ("stage-1 experts, annealed (label given)", "experts", "experts_annealed", {"mode": "label"}),
        ("one LoRA, all tasks (rank r)", "expert", "mixed/all.safetensors", {}),
        (f"one LoRA, all tasks (rank {K}r)", "expert", f"mixed/all_r{K}.safetensors", {}),
        ("one LoRA, all tasks (rank r), annealed", "expert", "mixed/all_annealed.safetensors", {}),
        (f"one LoRA, all tasks (rank {K}r), annealed", "expert", f"mixed/all_r{K}_annealed.safetensors", {}),
        ("MoE-LoRA (token top-2, no label loss)", "bundle", "moa/moe_lora.safetensors", {"mode": "token"}),
        ("MoE-LoRA naive (random experts)", "bundle", "moa/moe_lora_naive.safetensors", {"mode": "token"}),
        (
            "MoE-LoRA naive (random experts), annealed",
            "bundle",
            "moa/moe_lora_naive_annealed.safetensors",
            {"mode": "token"},
        ),
        ("MoA, routers only", "bundle", "moa/moa_routers.safetensors", routed),
        ("MoA, routers only, linear (the paper's)", "bundle", "moa/moa_routers_linear.safetensors", routed),
        ("MoA (joint)", "bundle", "moa/moa.safetensors", routed),
        (f"MoA (joint), mode {other}", "bundle", "moa/moa.safetensors", {"mode": other}),  # the paper's other rule
        ("MoA (joint), routers over single tokens", "bundle", "moa/moa_window1.safetensors", routed),
        ("MoA experts alone (label given)", "bundle", "moa/moa.safetensors", {"mode": "label"}),
        ("classifier + stage-1 experts", "classifier", "experts", {}),
        ("Arrow + stage-1 experts (no labels)", "arrow", "experts", {}),
    ]


def build(cfg, kind, path, run_dir, domains, base="base"):
    """-> (model, parameters added to the base, training records seen, steps), or None if files are missing.
    kind: base | expert (one LoRA file) | bundle | experts, classifier, arrow (the stage-1 experts in `path`,
    a folder, or a comma list of folders searched in order)."""
    gpt, tokenizer = load_base(os.path.join(cfg.out, base))
    gpt.to(cfg.device)  # experts and routers are made on the base's device
    if kind == "base":
        return gpt, 0, 0, 0
    if kind in ("experts", "classifier", "arrow"):  # the stage-1 experts side by side
        folders = [os.path.join(run_dir, f) for f in path.split(",")]
        paths = [
            next((p for p in (os.path.join(f, f"{d}.safetensors") for f in folders) if os.path.isfile(p)), None)
            for d in domains
        ]
        if None in paths:
            return None
        metas = [read_meta(p, "expert", gpt)[1] for p in paths]  # tensors checked: metas[0] sizes the MoA
        fp = fingerprint(gpt)
        model = MoA(gpt, domains, metas[0]["rank"], metas[0]["alpha"], targets=metas[0]["targets"])
        for k, p in enumerate(paths):
            load_expert(p, model, k, fp, tokenizer)
        added = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        if kind == "classifier":
            classifier = PromptClassifier(len(domains)).fit(TaskData(cfg.data_dir, ",".join(domains)))
            added += sum(p.numel() for p in classifier.parameters())
            model = ClassifierRouted(fast.enable(model, cfg.fast), classifier)
        elif kind == "arrow":
            model = Arrow(fast.enable(model, cfg.fast))
        return fast.enable(model, cfg.fast), added, sum(m.get("samples", 0) for m in metas), max_steps(metas)
    path = os.path.join(run_dir, path)
    if not os.path.isfile(path):
        return None
    if kind == "expert":
        meta = add_expert_file(gpt, path, tokenizer)
        model = gpt
    else:
        model, meta = load_bundle(path, gpt, tokenizer)
    added = sum(p.numel() for n, p in model.named_parameters() if added_by_moa(n))
    return fast.enable(model, cfg.fast), added, meta.get("samples", 0), meta.get("steps", 0)


def max_steps(metas):
    return max(m.get("steps", 0) for m in metas)


def score(model, kwargs, data, cfg, full=True):
    """A variant's scores on the validation records; with full, also exact match and routing on the unseen
    phrasing family and on the hand-written prompts, with the confidence a routed MoA reports there."""
    model.eval()
    row = evaluate_tasks(model, data, cfg.records, cfg.batch_size, **kwargs)
    if not full:
        return row
    if all(data.count(d, "unseen") for d in data.domains):
        unseen = evaluate_tasks(model, data, cfg.records, cfg.batch_size, split="unseen", **kwargs)
        kept = ("em_mean", "route_mean", "confidence_right", "confidence_wrong")
        row.update({f"unseen_{k}": v for k, v in unseen.items() if k in kept})
    row.update(hand_written(model, kwargs, data, cfg))
    return row


@torch.no_grad()
def hand_written(model, kwargs, data, cfg):
    """Exact match on the hand-written prompts of data's tasks (each ended with the newline every prompt ends
    with), and for a routed model the share routed right and the confidence it reports on right and wrong."""
    enc = get_tokenizer(data.tokenizer)
    prompts, truth, wanted = [], [], []
    for label, name in enumerate(data.domains):
        for prompt, answer in HAND_WRITTEN.get(name, []):
            prompts.append(encode(enc, prompt + "\n"))
            truth.append(label)
            wanted.append(answer)
    if not prompts:
        return {}
    kw = {**kwargs, "domain": torch.tensor(truth, device=cfg.device)} if kwargs.get("mode") == "label" else kwargs
    longest = max(len(encode(enc, a)) for a in wanted) + 1
    if hasattr(model, "routing"):
        model.routing = {}
    got = answers(model, prompts, longest, data.eot, **kw)
    out = {"hand_em": sum(enc.decode(g) == a for g, a in zip(got, wanted)) / len(wanted)}
    routing = getattr(model, "routing", {})
    if "decision" in routing and kwargs.get("mode") != "label":
        right = routing["decision"].cpu() == torch.tensor(truth)
        out["hand_route"] = right.float().mean().item()
        if "confidence" in routing:  # MoA's last router, at its calibrated temperature
            confidence = routing["confidence"].cpu()
            for key, which in (("hand_confidence_right", right), ("hand_confidence_wrong", ~right)):
                if which.any():
                    out[key] = confidence[which].mean().item()
    return out


def scored(cfg, run_dir, data, kind, path, kwargs, full=False, base="base"):
    """build + score -> the row with its params, records and steps, or None if its files are missing."""
    built = build(cfg, kind, path, run_dir, data.domains, base)
    if built is None:
        return None
    model, params, samples, steps = built
    row = score(model, kwargs, data, cfg, full)
    routing = kwargs.get("mode", kind if kind in ("classifier", "arrow") else "none")
    return {**row, "params": params, "samples": samples, "steps": steps, "routing": routing}


# ----------------------------------------------------------------------------------------------
# The experiments, per run folder


def runs(out):
    """The run folders demo.py wrote, out/runs/seed<N>, in seed order."""
    found = glob.glob(os.path.join(out, "runs", "seed*"))
    return sorted(found, key=lambda p: int(os.path.basename(p)[4:]) if os.path.basename(p)[4:].isdigit() else 0)


def main_experiment(cfg, run_dir, data):
    rows = {}
    for name, kind, path, kwargs in main_rows(cfg, len(data.domains)):
        row = scored(cfg, run_dir, data, kind, path, kwargs, full=True)
        if row is None:
            print(f"{os.path.basename(run_dir)}: skipped {name}: files not found")
            continue
        rows[name] = row
        print(f"{os.path.basename(run_dir)}: {name}: loss {row['loss_mean']:.4f}, exact match {row['em_mean']:.1%}")
    return rows


def snapshot(run_dir, path, step):
    """A run's file saved at `step` (train_lora/train_router --save_at), or its final file if the run reached its
    plateau before that step; None if neither."""
    stem, ext = os.path.splitext(path)
    at = os.path.join(run_dir, f"{stem}@{step}{ext}")
    if os.path.isfile(at):
        return os.path.relpath(at, run_dir)
    final = os.path.join(run_dir, path)
    if os.path.isfile(final):
        kind = "bundle" if path.startswith("moa/") else "expert"
        if read_meta(final, kind)[1].get("steps", step) <= step:
            return path
    return None


def budget_experiment(cfg, run_dir, data, budgets):
    """For each budget b: MoA (experts b steps each, then b steps of stage 2), the stage-1 experts at b steps,
    and each shared baseline after as many records ((K + 1) b steps) and as many updates (2 b steps)."""
    K, rows = len(data.domains), {}
    baselines = [
        ("one LoRA (rank r)", "expert", "mixed/all.safetensors", {}),
        (f"one LoRA (rank {K}r)", "expert", f"mixed/all_r{K}.safetensors", {}),
        ("MoE-LoRA naive", "bundle", "moa/moe_lora_naive.safetensors", {"mode": "token"}),
    ]
    for b in budgets:
        row = scored(cfg, run_dir, data, "bundle", f"moa/moa_b{b}.safetensors", {"mode": cfg.mode})
        if row is not None:
            rows[f"MoA, budget {b}"] = {**row, "budget": b, "variant": "MoA", "control": "budget"}
        for name, kind, path, kwargs in baselines:
            for control, steps in (("equal records", (K + 1) * b), ("equal updates", 2 * b)):
                at = snapshot(run_dir, path, steps)
                row = None if at is None else scored(cfg, run_dir, data, kind, at, kwargs)
                if row is not None:
                    rows[f"{name}, budget {b}, {control}"] = {**row, "budget": b, "variant": name, "control": control}
    return rows


def matrix_experiment(cfg, run_dir, data):
    """The transfer matrix: task i's loss and exact match from its LoRA alone and from the LoRA of i and j."""
    folder = os.path.join(run_dir, "pairs")
    if not os.path.isdir(folder):
        return None
    cells = {}
    for a in data.domains:
        for b in data.domains:
            name = a if a == b else "+".join(sorted((a, b), key=data.domains.index))
            path = os.path.join("pairs", f"{name}.safetensors")
            if not os.path.isfile(os.path.join(run_dir, path)):
                return None
            one = TaskData(cfg.data_dir, a)
            row = scored(cfg, run_dir, one, "expert", path, {})
            cells[f"{a}|{b}"] = {"loss": row[f"loss/{a}"], "em": row[f"em/{a}"]}
    return cells


def adaptation(cfg, run_dir, old, new):
    """Adding a task: the old tasks before and after, against the obvious alternatives (the shared LoRA with MoA's
    parameters, annealed, trained on the new task) -> rows (those whose files exist), or None without the
    first two."""
    rows = {}
    data = TaskData(cfg.data_dir, ",".join(old + [new]))
    shared = f"mixed/all_r{len(old)}_annealed"
    before, mixed = "MoA before", f"one LoRA (rank {len(old)}r, annealed) before"
    for name, path, kwargs, reference in [
        (before, "moa/moa.safetensors", {"mode": cfg.mode}, None),
        (f"MoA + {new} (new router row only)", f"moa/moa+{new}.safetensors", {"mode": cfg.mode}, before),
        (f"MoA + {new} (every router row retrained)", f"moa/moa+{new}_allrows.safetensors", {"mode": cfg.mode}, before),
        (f"{new} expert alone", f"experts/{new}.safetensors", {}, None),
        (mixed, f"{shared}.safetensors", {}, None),
        (f"the same LoRA, trained on {new}", f"{shared}+{new}.safetensors", {}, mixed),
        ("MoA retrained on K+1 tasks", "moa/moa_all.safetensors", {"mode": cfg.mode}, before),
    ]:
        kind = "bundle" if path.startswith("moa/") else "expert"
        built = build(cfg, kind, path, run_dir, data.domains)
        if built is None and len(rows) < 2:
            return None
        if built is None or (reference and reference not in rows):  # a row --ablations makes, or its reference
            continue
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


def imbalanced_experiment(cfg, run_dir, small_data):
    """The imbalanced variant: its small task's expert beside the others, MoA, and one LoRA on the pooled data with
    MoA's parameters (rank K r), at its plateau and annealed."""
    folder = os.path.join(run_dir, "imbalanced")
    if not os.path.isdir(folder):
        return None
    data = TaskData(small_data)
    K, rows = len(data.domains), {}
    for name, kind, path, kwargs in [
        ("stage-1 experts (label given)", "experts", "imbalanced/experts,experts", {"mode": "label"}),
        (f"one LoRA, all tasks, pooled (rank {K}r)", "expert", f"imbalanced/all_r{K}.safetensors", {}),
        (
            f"one LoRA, all tasks, pooled (rank {K}r), annealed",
            "expert",
            f"imbalanced/all_r{K}_annealed.safetensors",
            {},
        ),
        ("MoA (joint)", "bundle", "imbalanced/moa.safetensors", {"mode": cfg.mode}),
    ]:
        row = scored(cfg, run_dir, data, kind, path, kwargs)
        if row is not None:
            rows[name] = row
    return rows


def regime_experiment(cfg, run_dir, data):
    """The base that saw the skills in its text, against the one that did not: its response loss, and its stage-1
    experts' and mixed LoRA's exact match and steps to their plateaus."""
    if not os.path.isdir(os.path.join(run_dir, "plain")):
        return None
    rows = {}
    for name, kind, path, kwargs, base in [
        ("with skills: the base", "base", None, {}, "base"),
        ("with skills: stage-1 experts", "experts", "experts", {"mode": "label"}, "base"),
        ("with skills: one LoRA (rank r)", "expert", "mixed/all.safetensors", {}, "base"),
        ("without skills: the base", "base", None, {}, "base_plain"),
        ("without skills: stage-1 experts", "experts", "plain/experts", {"mode": "label"}, "base_plain"),
        ("without skills: one LoRA (rank r)", "expert", "plain/all.safetensors", {}, "base_plain"),
    ]:
        row = scored(cfg, run_dir, data, kind, path, kwargs, base=base)
        if row is not None:
            rows[name] = row
    return rows


# ----------------------------------------------------------------------------------------------
# Over seeds: mean ± standard deviation


def aggregate(rows_per_run):
    """[{row: {metric: value}}] per run -> {row: {metric: (mean, std over runs, runs)}} (lists are kept from run 1)."""
    out = {}
    for name in rows_per_run[0]:
        values = [r[name] for r in rows_per_run if name in r]
        out[name] = {}
        for key, first in values[0].items():
            if isinstance(first, (int, float)) and not isinstance(first, bool):
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


def table(rows, columns):
    """A markdown table: a row per variant, columns [(heading, row -> text)]."""
    lines = ["| variant | " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f(r) for _, f in columns) + " |")
    return "\n".join(lines)


def get(key, percent=False, digits=3):
    """A column's cell maker: the row's metric `key`, or "-" where the row has none."""
    return lambda r: cell(r[key], percent, digits) if key in r else "-"


def per_task(domains, metric, percent):
    return [(d, get(f"{metric}/{d}", percent)) for d in domains] + [("mean", get(f"{metric}_mean", percent))]


def count(key):
    return lambda r: f"{int(r[key][0]):,}" if key in r else "-"


def main_tables(rows, domains, cfg):
    about = [("records", count("samples")), ("steps", count("steps")), ("params", count("params"))]
    routing = [
        ("validation", get("route_mean", True)),
        ("unseen phrasing", get("unseen_route_mean", True)),
        ("hand-written", get("hand_route", True)),
        ("confidence right / wrong: validation", confidence("")),
        ("unseen", confidence("unseen_")),
        ("hand-written", confidence("hand_")),
    ]
    em_elsewhere = [("EM unseen phrasing", get("unseen_em_mean", True)), ("EM hand-written", get("hand_em", True))]
    routed = {n: r for n, r in rows.items() if "route_mean" in r}
    return "\n\n".join(
        [
            "Exact match of the greedy answer, each model trained to its plateau or its cap (records and steps: "
            "where it stopped):\n\n" + table(rows, per_task(domains, "em", True) + about),
            "Response loss (nats per token; perplexity is its exp):\n\n"
            + table(rows, per_task(domains, "loss", False)),
            "ROUGE-L of the greedy answer against the reference, over characters:\n\n"
            + table(rows, per_task(domains, "rouge", True)),
            f"Routing from the prompt (mode {cfg.mode} for MoA): validation prompts, the unseen phrasing family, the "
            "hand-written prompts (built-in tasks), and the last router's mean confidence on right and on wrong "
            "routes of each (calibrated on the data set's calib split):\n\n" + table(routed, routing),
            "Exact match off the training phrasings (validation words; the hand-written prompts):\n\n"
            + table(rows, [("EM validation", get("em_mean", True))] + em_elsewhere),
        ]
    )


def confidence(prefix):
    """A column's cell maker: the mean confidence MoA reported on right / wrong routes of a prompt set."""
    keys = (f"{prefix}confidence_right", f"{prefix}confidence_wrong")
    return lambda r: " / ".join(f"{r[k][0]:.2f}" if k in r else "-" for k in keys) if any(k in r for k in keys) else "-"


def controls_table(main, budget, budgets, domains):
    """MoA against the shared LoRAs under each control: mean exact match (± over seeds) and the records seen. A
    baseline with no row anywhere (the demo runs neither the rank-r LoRA nor MoE-LoRA) has no column."""
    K = len(domains)
    columns = [  # (its budget rows' name, its main row at the plateau; its annealed row adds ", annealed")
        ("one LoRA (rank r)", "one LoRA, all tasks (rank r)"),
        (f"one LoRA (rank {K}r)", f"one LoRA, all tasks (rank {K}r)"),
        ("MoE-LoRA naive", "MoE-LoRA naive (random experts)"),
    ]
    columns = [c for c in columns if c[1] in main or any(n.startswith(f"{c[0]}, budget") for n in budget)]
    lines = ["| control | MoA | " + " | ".join(c[0] for c in columns) + " |", "|---|---|" + "---|" * len(columns)]

    def em(r):
        return f"{cell(r['em_mean'], True)} ({int(r['samples'][0]):,})" if r else "-"

    def line(control, moa, others):
        return f"| {control} | {em(moa)} | " + " | ".join(em(r) for r in others) + " |"

    for b in budgets:
        for control in ("equal records", "equal updates"):
            others = [budget.get(f"{c[0]}, budget {b}, {control}") for c in columns]
            lines.append(line(f"budget {b}, {control}", budget.get(f"MoA, budget {b}"), others))
    lines.append(line("each at its plateau or cap", main.get("MoA (joint)"), [main.get(c[1]) for c in columns]))
    annealed = [main.get(f"{c[1]}, annealed") for c in columns]  # as MoA's stage 2 anneals
    lines.append(line("each at its plateau, then annealed at stage 2's rate", main.get("MoA (joint)"), annealed))
    return "\n".join(lines)


def matrix_table(cells, domains, metric, percent):
    """Rows: the task measured (i); columns: the task trained beside it (j; the diagonal: i alone). Off the
    diagonal, the change from i alone."""
    lines = ["| task i \\ with j | " + " | ".join(domains) + " |", "|" + "---|" * (len(domains) + 1)]
    for a in domains:
        alone = cells[f"{a}|{a}"][metric]
        row = []
        for b in domains:
            value = cells[f"{a}|{b}"][metric]
            if a == b:
                row.append(cell(value, percent))
            else:
                diff = (value[0] - alone[0], math.sqrt(value[1] ** 2 + alone[1] ** 2) if value[2] > 1 else 0, value[2])
                sign = "+" if diff[0] >= 0 else ""
                row.append(sign + cell(diff, percent))
        lines.append(f"| {a} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def adaptation_table(rows, domains, new):
    columns = per_task(domains, "loss", False)[:-1] + [
        ("old tasks' loss", get("old_loss")),
        ("worst old task", get("worst_old", True)),
        ("old EM", get("old_em", True)),
        ("old routing", get("old_route", True)),
        (
            "old routing change (points)",
            lambda r: (
                cell(tuple(100 * v if i < 2 else v for i, v in enumerate(r["old_route_change"])), digits=1)
                if "old_route_change" in r
                else "-"
            ),
        ),
        (f"{new} routing", get(f"route/{new}", True)),
        (f"{new} EM", get(f"em/{new}", True)),
    ]
    return table(rows, columns)


# ----------------------------------------------------------------------------------------------


def found_budgets(cfg, run_dirs):
    if cfg.budgets:
        return sorted(int(b) for b in cfg.budgets.split(",") if b.strip())
    names = glob.glob(os.path.join(run_dirs[0], "moa", "moa_b*.safetensors"))
    return sorted(int(os.path.basename(n)[5 : -len(".safetensors")]) for n in names)


def main(argv=None):
    cfg = parse_config(ResultsConfig, argv or [])
    cfg.device = pick_device(cfg.device)[0]  # auto -> the device; one that is not here: a one-line error
    if not os.path.isfile(os.path.join(cfg.out, "base", "ckpt.pt")):
        raise UserError(f"no base in {cfg.out}/base: run `python demo.py` first")
    run_dirs = runs(cfg.out)
    if not run_dirs:
        raise UserError(f"no runs in {cfg.out}/runs/: run `python demo.py` first")
    data = TaskData(cfg.data_dir, "all")
    domains, budgets = data.domains, found_budgets(cfg, run_dirs)
    new = cfg.added or (data.meta["held_back"] or [""])[0]
    small = f"{cfg.data_dir}_{domains[1]}_small" if len(domains) > 1 else ""
    found = {key: [] for key in ("main", "budget", "matrix", "adaptation", "imbalanced", "regime")}
    for run_dir in run_dirs:
        found["main"].append(main_experiment(cfg, run_dir, data))
        found["budget"].append(budget_experiment(cfg, run_dir, data, budgets))
        found["matrix"].append(matrix_experiment(cfg, run_dir, data))
        held_back = new in data.meta["tasks"] and new not in domains
        found["adaptation"].append(adaptation(cfg, run_dir, domains, new) if held_back else None)
        found["imbalanced"].append(imbalanced_experiment(cfg, run_dir, small) if os.path.isdir(small) else None)
        found["regime"].append(regime_experiment(cfg, run_dir, data))
    found = {key: [r for r in rows if r] for key, rows in found.items()}
    stats = {key: aggregate(rows) for key, rows in found.items() if rows}
    text = write_tables(cfg, stats, domains, budgets, new, run_dirs)
    folder = os.path.join(cfg.out, "results")
    os.makedirs(folder, exist_ok=True)
    write_text(os.path.join(folder, "results.json"), json.dumps({"runs": run_dirs, **found}, indent=1))
    write_text(os.path.join(folder, "results.md"), text + "\n")
    print(text)
    if cfg.plots:
        import pictures

        pictures.draw(cfg, stats, found, domains, run_dirs[0])
    return stats


def write_tables(cfg, stats, domains, budgets, new, run_dirs):
    parts = [
        f"{len(run_dirs)} run(s): {', '.join(os.path.basename(r) for r in run_dirs)}; {cfg.records} validation "
        f"records per task; each cell the mean ± standard deviation over the runs."
    ]
    if "main" in stats:
        parts.append(main_tables(stats["main"], domains, cfg))
    if "budget" in stats and budgets:
        parts.append(
            "MoA against the shared LoRAs under each control: mean exact match (training records seen). At budget "
            "b, MoA's experts trained b steps each, then b steps of stage 2; the baselines are taken after as many "
            "records ((K + 1) b steps) or as many optimizer updates (2 b steps):\n\n"
            + controls_table(stats.get("main", {}), stats["budget"], budgets, domains)
        )
    if "matrix" in stats:
        cells = stats["matrix"]
        parts.append(
            "Transfer and interference: task i's exact match from a LoRA trained on i alone (diagonal), and its change "
            "when the LoRA also learns task j from the same records of i plus j's (off the diagonal; + helps):\n\n"
            + matrix_table(cells, domains, "em", True)
            + "\n\nThe same for the response loss (- helps):\n\n"
            + matrix_table(cells, domains, "loss", False)
        )
    if "adaptation" in stats:
        parts.append(
            f"Adding the task {new} (loss per task; routing in mode {cfg.mode}):\n\n"
            + adaptation_table(stats["adaptation"], domains + [new], new)
        )
    if "imbalanced" in stats:
        parts.append(
            f"The imbalanced variant: {domains[1]} with a tenth of the training records (exact match):\n\n"
            + table(stats["imbalanced"], per_task(domains, "em", True) + [("records", count("samples"))])
        )
    if "regime" in stats:
        parts.append(
            "The regime: a base that saw the skills in its text (no instructions), or not:\n\n"
            + table(
                stats["regime"],
                [
                    ("loss (mean)", get("loss_mean")),
                    ("EM (mean)", get("em_mean", True)),
                    ("steps (plateau or cap)", count("steps")),
                ],
            )
        )
    return "\n\n".join(parts)


if __name__ == "__main__":
    run(main)
