"""The pictures of results.py, drawn with matplotlib (installed by requirements.txt), into out/results/:

- budget.png    exact match against the training records seen (log axis), one line per variant: MoA at each
                budget and at its plateau, the shared LoRAs saved along their runs and after their
                annealing, per task and on average
- learning.png  each stage-1 expert's validation loss over its run, beside the shared LoRA's (rank K r) on that task
- matrix.png    the transfer matrix: how much learning task j beside task i changes i's exact match
- routing.png   where MoA's routers send each task's validation prompts (its confusion matrix)

Read next: demo.py.
"""

import json
import os

VARIANTS = {  # line -> (its budget rows' variant, its rows in the main table: at its plateau, then annealed)
    "MoA": ("MoA", ["MoA (joint)"]),
    "one LoRA (rank r)": (
        "one LoRA (rank r)",
        ["one LoRA, all tasks (rank r)", "one LoRA, all tasks (rank r), annealed"],
    ),
    "one LoRA (rank Kr)": (
        "one LoRA (rank {K}r)",
        ["one LoRA, all tasks (rank {K}r)", "one LoRA, all tasks (rank {K}r), annealed"],
    ),
    "MoE-LoRA naive": (
        "MoE-LoRA naive",
        ["MoE-LoRA naive (random experts)", "MoE-LoRA naive (random experts), annealed"],
    ),
}


def draw(cfg, stats, found, domains, run_dir):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no pictures: `pip install matplotlib` for them")
        return
    folder = os.path.join(cfg.out, "results")
    drawn = [
        budget(plt, stats, domains, folder),
        learning(plt, run_dir, domains, folder),
        matrix(plt, stats, domains, folder),
        routing(plt, stats, domains, folder, cfg.mode),
    ]
    print(f"pictures: {', '.join(p for p in drawn if p)}")


def points(stats, variant, main_rows, metric):
    """(records, mean, std) of a variant's budget rows and its main-table rows, in order of records."""
    rows = [r for r in stats.get("budget", {}).values() if r.get("variant") == variant]
    rows += [stats["main"][name] for name in main_rows if name in stats.get("main", {})]
    found = {int(r["samples"][0]): (r[metric][0], r[metric][1]) for r in rows if metric in r}
    return [(n, *found[n]) for n in sorted(found)]


def budget(plt, stats, domains, folder):
    K = len(domains)
    metrics = [("em_mean", "mean")] + [(f"em/{d}", d) for d in domains]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.2), squeeze=False)
    for ax, (metric, title) in zip(axes[0], metrics):
        for label, (variant, main_rows) in VARIANTS.items():
            line = points(stats, variant.format(K=K), [n.format(K=K) for n in main_rows], metric)
            if line:
                x, y, e = zip(*line)
                ax.errorbar(x, [100 * v for v in y], [100 * v for v in e], marker="o", capsize=2, label=label)
        ax.set(xscale="log", title=title, xlabel="training records seen", ylabel="exact match (%)", ylim=(-2, 102))
    axes[0][0].legend(fontsize=7)
    return save(plt, fig, folder, "budget.png")


def read_log(path):
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def learning(plt, run_dir, domains, folder):
    stage1 = read_log(os.path.join(run_dir, "experts", "stage1", "log.jsonl"))
    K = len(domains)
    mixed = read_log(os.path.join(run_dir, "mixed", f"all_r{K}", "log.jsonl"))  # the LoRA with MoA's parameters
    if not stage1:
        return None
    fig, axes = plt.subplots(1, len(domains), figsize=(3.2 * len(domains), 3.2), squeeze=False)
    for ax, d in zip(axes[0], domains):
        for log, key, label in ((stage1, f"watch/{d}", f"{d} expert"), (mixed, f"loss/{d}", f"one LoRA, rank {K}r")):
            curve = [(r["step"], r[key]) for r in log if key in r]
            if curve:
                ax.plot(*zip(*curve), marker=".", label=label)
        ax.set(title=d, xlabel="step", ylabel="validation loss (nats/token)", yscale="log")
        ax.legend(fontsize=7)
    return save(plt, fig, folder, "learning.png")


def matrix(plt, stats, domains, folder):
    cells = stats.get("matrix")
    if not cells:
        return None
    change = [
        [100 * (cells[f"{a}|{b}"]["em"][0] - cells[f"{a}|{a}"]["em"][0]) if a != b else 0.0 for b in domains]
        for a in domains
    ]
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    bound = max(1.0, max(abs(v) for row in change for v in row))
    image = ax.imshow(change, cmap="RdBu", vmin=-bound, vmax=bound)
    for i, row in enumerate(change):
        for j, v in enumerate(row):
            text = f"{100 * cells[f'{domains[i]}|{domains[i]}']['em'][0]:.0f}%" if i == j else f"{v:+.0f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8)
    task_axes(ax, domains, "trained beside it (j)", "task measured (i)")
    ax.set_title("exact match of i: change when j is learned too (points)")
    fig.colorbar(image)
    return save(plt, fig, folder, "matrix.png")


def routing(plt, stats, domains, folder, mode):
    moa = stats.get("main", {}).get("MoA (joint)")
    if not moa or "confusion" not in moa:
        return None
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.imshow(moa["confusion"], cmap="Blues")
    for i, counts in enumerate(moa["confusion"]):
        for j, n in enumerate(counts):
            ax.text(j, i, n, ha="center", va="center")
    task_axes(ax, domains, "expert", "task")
    ax.set_title(f"MoA: where each task's prompts went (mode {mode})")
    return save(plt, fig, folder, "routing.png")


def task_axes(ax, domains, xlabel, ylabel):
    """A K x K picture's axes: a task per row and per column."""
    ticks = range(len(domains))
    ax.set(xticks=ticks, yticks=ticks, xticklabels=domains, yticklabels=domains, xlabel=xlabel, ylabel=ylabel)


def save(plt, fig, folder, name):
    """Lays the figure out, writes it to folder/name and frees it -> its path."""
    fig.tight_layout()
    path = os.path.join(folder, name)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
