"""Evaluation shared by every stage: per-domain validation loss and perplexity, and exact-match
accuracy on the generated arithmetic domain by greedy decoding.

Both work for any model variant (base, base + one expert, a MoA bundle in any routing mode): they
take a function, not a model. `forward(x, y, d)` returns per-sample losses (B,); `generate(idx,
pad_mask, max_new_tokens)` returns the continued token ids.

Read next: train_base.py.
"""
import math

import torch
import torch.nn.functional as F

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


def perplexities(losses):
    """{"val/x": loss} -> {"ppl/x": exp(loss)}."""
    return {k.replace("val", "ppl", 1): math.exp(v) for k, v in losses.items()}


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

    problems: [(prompt, answer)], e.g. ("12+34=", "46"). `shots` (solved examples, one per line)
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
