"""Which phrasings MoA's routers get wrong: each built-in task's prompts of a split (the unseen family by default),
grouped by the instruction pattern of data/tasks.py that made them, and how many each seed's bundle routes right.

    python scripts/phrasings.py --out=out          # every out/runs/seed<N>/moa/moa.safetensors

A prompt belongs to the pattern whose fixed pieces (lowercased, the slots {x}, {e} taken out) it holds in order,
the pattern with the most fixed text winning, so a pattern of the training family asked in a frame of the unseen
one counts under its own name; "(no pattern)" counts the prompts that hold none (arith's bare expressions).
Prints one line per pattern: right / prompts per seed. The README's routing limitation quotes it.
"""

import os
import re
import sys
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fast  # noqa: E402  (needs the root on the path)
import results  # noqa: E402
from batches import TaskData  # noqa: E402
from config import AT_LEAST_1, UserError, one_of, parse_config, run  # noqa: E402
from data.tasks import PATTERNS, UNSEEN_PATTERNS  # noqa: E402
from evaluate import prefill  # noqa: E402
from files import load_base, load_bundle  # noqa: E402
from moa import SERVE_MODE  # noqa: E402
from tokenizer import get_tokenizer  # noqa: E402
from trainer import pick_device  # noqa: E402

NONE = "(no pattern)"


@dataclass
class PhrasingsConfig:
    out: str = "out"  # demo.py's output folder: base/ and runs/seed<N>/
    bundle: str = "moa/moa.safetensors"  # each run's bundle, under its run folder
    data_dir: str = "data/default"  # the data set the runs trained on (built-in tasks)
    split: str = "unseen"  # unseen | val | calib
    mode: str = SERVE_MODE  # the routing rule: last | vote
    records: int = 256  # prompts per task at most
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps

    CHECKS = {"records": AT_LEAST_1, "split": one_of("unseen", "val", "calib"), "mode": one_of("last", "vote")}


def pieces(pattern):
    """A pattern's fixed pieces between its slots, lowercased: what every prompt made from it holds, in order."""
    return tuple(p.strip(" ,:").lower() for p in re.split(r"\{[a-z]\}", pattern) if p.strip(" ,:"))


def patterns_of(task):
    """{fixed pieces: the pattern's name} of a task's training and unseen patterns (those with fixed text)."""
    named = [(p, p) for p in PATTERNS.get(task, [])] + [(p, f"{p} (unseen)") for p in UNSEEN_PATTERNS.get(task, [])]
    found = {pieces(p): name for p, name in named}
    return {key: name for key, name in found.items() if sum(map(len, key)) > 2}


def pattern_of(text, patterns):
    """The name of the pattern whose pieces the prompt holds in order (the most fixed text wins), or NONE."""
    text = text.lower()
    held = [k for k in patterns if re.search(".*".join(map(re.escape, k)), text, re.S)]
    return patterns[max(held, key=lambda k: sum(map(len, k)))] if held else NONE


@torch.no_grad()
def routed_right(moa, data, task, label, cfg):
    """[(prompt text, routed to its task?)] for up to cfg.records prompts of the task's split, 64 at a time."""
    enc, found = get_tokenizer(data.tokenizer), []
    prompts = [data.record(task, cfg.split, i)[0] for i in range(min(cfg.records, data.count(task, cfg.split)))]
    for start in range(0, len(prompts), 64):
        batch = prompts[start : start + 64]
        moa.routing = {}
        prefill(moa, batch, data.eot, mode=cfg.mode)
        found += [(enc.decode(p), d == label) for p, d in zip(batch, moa.routing["decision"].tolist())]
    return found


def main(argv=None):
    cfg = parse_config(PhrasingsConfig, argv or [])
    device = pick_device(cfg.device)[0]
    runs = [r for r in results.runs(cfg.out) if os.path.isfile(os.path.join(r, cfg.bundle))]
    if not runs:
        raise UserError(f"no {cfg.bundle} under {cfg.out}/runs/seed<N>/: run `python demo.py` first")
    counts = {}  # task -> {pattern: ([right per run], [prompts per run])}
    for k, run_dir in enumerate(runs):
        gpt, tokenizer = load_base(os.path.join(cfg.out, "base"))
        moa = fast.enable(load_bundle(os.path.join(run_dir, cfg.bundle), gpt.to(device), tokenizer)[0]).eval()
        data = TaskData(cfg.data_dir, ",".join(moa.domains), moa.config.block_size)
        empty = [t for t in moa.domains if not data.count(t, cfg.split)]
        if empty:
            raise UserError(f"{cfg.data_dir} has no {cfg.split} prompts of {', '.join(empty)}")
        for label, task in enumerate(moa.domains):
            patterns = patterns_of(task)
            for text, right in routed_right(moa, data, task, label, cfg):
                name = pattern_of(text, patterns)
                right_n, total = counts.setdefault(task, {}).setdefault(name, ([0] * len(runs), [0] * len(runs)))
                right_n[k] += right
                total[k] += 1
    names = ", ".join(os.path.basename(r) for r in runs)
    print(f"routed right / prompts of the {cfg.split} split, mode {cfg.mode}, per run ({names}):")
    for task, found in counts.items():
        for name, (right_n, total) in sorted(found.items(), key=lambda kv: sum(kv[1][0]) / sum(kv[1][1])):
            print(f"  {task:>8}  {'  '.join(f'{r:>3}/{t:<3}' for r, t in zip(right_n, total))}  {name}")
    return counts


if __name__ == "__main__":
    run(main)
