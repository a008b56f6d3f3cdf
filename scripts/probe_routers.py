"""How well can a router tell the tasks apart from the frozen base's features? Probes, not routers: the base's
hidden state at each block's input (and after the last block, "L4" with 4 blocks), pooled over the prompt (mean,
last token, or both side by side), read by a linear map (the paper's router, `--router_hidden=0`) or by a
one-hidden-layer MLP of the pooled state, each fitted on training prompts and scored on validation / unseen-phrasing /
hand-written prompts. (train_router.py's default router puts its layer before the pooling, per token: moa.py.)

    python scripts/probe_routers.py --out=out --data_dir=data/default     # about a minute on 2 cores

Prints one line per pooling and probe: per layer, accuracy in % on validation / unseen / hand-written prompts.
"""

import os
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from batches import TaskData  # noqa: E402  (needs the root on the path)
from config import AT_LEAST_0, AT_LEAST_1, parse_config, run  # noqa: E402
from data.tasks import HAND_WRITTEN  # noqa: E402
from evaluate import left_pad  # noqa: E402
from files import load_base  # noqa: E402
from moa import pool  # noqa: E402
from tokenizer import encode, get_tokenizer  # noqa: E402


@dataclass
class ProbeConfig:
    out: str = "out"  # where demo.py put base/
    data_dir: str = "data/default"  # the data set (its tasks minus the held-back ones are probed)
    train_records: int = 2000  # training prompts per task the probes fit on
    records: int = 256  # validation and unseen prompts per task
    hidden: int = 256  # the MLP probe's hidden width (0: linear only)
    iters: int = 600  # probe training steps (AdamW, batches of 512)
    seed: int = 0  # the probes' initialization and batches

    CHECKS = {"train_records": AT_LEAST_1, "records": AT_LEAST_1, "hidden": AT_LEAST_0, "iters": AT_LEAST_1}


@torch.no_grad()
def features(gpt, prompts, eot):
    """[(mean (N, C), last (N, C))] per layer: each block's input, then the final LayerNorm's output."""
    per_batch = []
    for s in range(0, len(prompts), 256):
        idx, mask = left_pad(prompts[s : s + 256], eot)
        x, attn_mask = gpt.embed(idx, mask, None)
        layers = []
        for i, block in enumerate(gpt.transformer.h):
            layers.append(x)
            x = block(x, attn_mask, None, i)
        layers.append(gpt.transformer.ln_f(x))
        per_batch.append([(pool(h, mask, "mean"), pool(h, mask, "last")) for h in layers])
    return [tuple(torch.cat([b[layer][j] for b in per_batch]) for j in (0, 1)) for layer in range(len(per_batch[0]))]


def fit(x, y, k, hidden, iters):
    """A probe fitted on standardized features -> its prediction function."""
    mu, sd = x.mean(0), x.std(0) + 1e-5
    if hidden:
        model = nn.Sequential(nn.Linear(x.size(1), hidden), nn.GELU(), nn.Linear(hidden, k))
    else:
        model = nn.Linear(x.size(1), k)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    z = (x - mu) / sd
    for _ in range(iters):
        pick = torch.randperm(len(z))[:512]
        loss = F.cross_entropy(model(z[pick]), y[pick])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lambda features: model((features - mu) / sd).argmax(-1)


def main(argv=None):
    cfg = parse_config(ProbeConfig, argv or [])
    torch.manual_seed(cfg.seed)
    gpt, _ = load_base(os.path.join(cfg.out, "base"))
    gpt.eval()
    data = TaskData(cfg.data_dir)
    enc = get_tokenizer(data.tokenizer)
    sets = {}
    for split, n in (("train", cfg.train_records), ("val", cfg.records), ("unseen", cfg.records)):
        prompts, labels = [], []
        for k, task in enumerate(data.domains):
            m = min(n, data.count(task, split))
            prompts += [data.record(task, split, i)[0] for i in range(m)]
            labels += [k] * m
        if prompts:
            sets[split] = (prompts, torch.tensor(labels))
    hand = [(encode(enc, p + "\n"), k) for k, t in enumerate(data.domains) for p, _ in HAND_WRITTEN.get(t, [])]
    if hand:
        sets["hand"] = ([p for p, _ in hand], torch.tensor([k for _, k in hand]))
    feats = {split: features(gpt, prompts, data.eot) for split, (prompts, _) in sets.items()}
    scored = [s for s in ("val", "unseen", "hand") if s in sets]
    print(f"tasks {', '.join(data.domains)}; accuracy % on {' / '.join(scored)}, per layer")
    for how, take in (("mean", lambda f: f[0]), ("last", lambda f: f[1]), ("both", lambda f: torch.cat(f, -1))):
        for hidden in [0] + ([cfg.hidden] if cfg.hidden else []):
            cells = []
            for layer in range(len(feats["train"])):
                predict = fit(take(feats["train"][layer]), sets["train"][1], len(data.domains), hidden, cfg.iters)
                with torch.no_grad():
                    acc = [(predict(take(feats[s][layer])) == sets[s][1]).float().mean().item() for s in scored]
                cells.append(f"L{layer} " + "/".join(f"{100 * a:.0f}" for a in acc))
            print(f"{how:4s} {'MLP ' + str(hidden) if hidden else 'linear':8s}: " + "  ".join(cells), flush=True)


if __name__ == "__main__":
    run(main)
