"""Evaluation shared by every stage: per-domain validation loss and perplexity, and exact-match
accuracy on the generated arithmetic domain by greedy decoding.

Both work for any model variant (base, base + one expert, a MoA bundle in any routing mode): they
take a function, not a model. `forward(x, y, d)` returns per-sample losses (B,); `generate(idx,
pad_mask, max_new_tokens)` returns the continued token ids.

Read next: train_base.py.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

from moa import vote
from tokenizer import encode


def per_sample_loss(logits, y):
    """logits (B, T, V), targets (B, T) -> mean cross-entropy of each sequence (B,)."""
    loss = F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none")  # (B, T)
    return loss.mean(dim=1)


@torch.no_grad()
def domain_losses(forward, data, n_windows, batch_size, device="cpu"):
    """Mean validation loss of each domain over n_windows fixed windows -> {"val/<domain>": loss, "val_mean": ...}.

    forward(x, y, d) -> per-sample losses (B,); d holds the domain labels, for variants that use them.
    """
    out = {}
    for label, name in enumerate(data.domains):
        starts = data.eval_starts(name, n_windows)
        total = 0.0
        for i in range(0, n_windows, batch_size):
            x, y = data.windows(name, "val", starts[i:i + batch_size])
            d = torch.full((x.size(0),), label, dtype=torch.long)
            total += forward(x.to(device), y.to(device), d.to(device)).sum().item()
        out[f"val/{name}"] = total / n_windows
    out["val_mean"] = sum(out.values()) / len(data.domains)
    return out


def unigram_entropy(data, name):
    """Entropy (nats per token) of a domain's training tokens taken one at a time: the loss of a model
    that knows token frequencies and nothing else, the bar a trained model must clear."""
    counts = np.bincount(data.splits[name, "train"], minlength=data.vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def left_pad(rows, pad_id):
    """Token lists of different lengths -> idx (B, T_max) padded on the left, pad_mask (B, T_max)."""
    T = max(len(r) for r in rows)
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        idx[i, T - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, T - len(r):] = True
    return idx, mask


@torch.no_grad()
def exact_match(generate, enc, problems, shots, batch_size=32, device="cpu"):
    """Share of problems whose greedy answer, up to the first newline, equals the reference answer.

    problems: [(prompt, answer)], e.g. ("12+4=", "16"). `shots` (solved examples, one per line)
    come before each prompt, so the model sees it in the context it was trained on.
    """
    context = "".join(f"{p}{a}\n" for p, a in shots)
    newline = encode(enc, "\n")[0]
    max_new = max(len(encode(enc, a)) for _, a in problems) + 1
    correct = 0
    for i in range(0, len(problems), batch_size):
        chunk = problems[i:i + batch_size]
        rows = [encode(enc, context + p) for p, _ in chunk]
        idx, mask = left_pad(rows, enc.eot_token)
        out = generate(idx.to(device), mask.to(device), max_new)[:, idx.size(1):].tolist()
        for tokens, (_, answer) in zip(out, chunk):
            if newline in tokens:
                tokens = tokens[:tokens.index(newline)]
            correct += enc.decode(tokens) == answer
    return correct / len(problems)


@torch.no_grad()
def routed_losses(moa, data, n_windows, batch_size, mode, device="cpu", prompt_len=32):
    """A MoA's per-domain validation loss in routing mode `mode`, and its routers' accuracy: how often
    the last router, the vote of all routers, and each layer's router predict the window's domain,
    and how often the last router does from only the first prompt_len tokens (a prompt).

    data.domains must be in the bundle's order (build DomainData with ",".join(moa.domains)).
    """
    assert data.domains == moa.domains[:len(data.domains)], "data domains must follow the bundle's order"
    last, voted, prompt, layers = {}, {}, {}, []
    K = len(moa.domains)
    confusion = torch.zeros(len(data.domains), K, dtype=torch.long)  # rows: true domain, columns: last router

    def forward(x, y, d):
        logits, _ = moa(x, domain=d, mode=mode)
        if mode != "token":
            predicted = moa.routing["predicted"]  # (L, B)
            probs = F.softmax(moa.routing["logits"].float(), dim=-1)
            name = data.domains[int(d[0])]
            last[name] = last.get(name, 0) + (predicted[-1] == d).sum().item()
            voted[name] = voted.get(name, 0) + (vote(predicted, probs) == d).sum().item()
            layers.append((predicted == d).float().sum(1))  # (L,)
            confusion[int(d[0])] += torch.bincount(predicted[-1].cpu(), minlength=K)
            moa(x[:, :prompt_len], domain=d, mode=mode)  # causal: the window's first tokens as a prompt
            prompt[name] = prompt.get(name, 0) + (moa.routing["predicted"][-1] == d).sum().item()
        return per_sample_loss(logits, y)

    out = domain_losses(forward, data, n_windows, batch_size, device)
    if last:
        for name in data.domains:
            out[f"route_acc/{name}"] = last[name] / n_windows
        out["route_acc_mean"] = sum(last.values()) / (n_windows * len(data.domains))
        out["route_acc_vote"] = sum(voted.values()) / (n_windows * len(data.domains))
        out["route_acc_prompt"] = sum(prompt.values()) / (n_windows * len(data.domains))
        out["route_acc_layers"] = (torch.stack(layers).sum(0) / (n_windows * len(data.domains))).tolist()
        out["route_confusion"] = confusion.tolist()
    return out
