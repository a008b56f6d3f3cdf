"""Evaluation shared by every stage. Losses are in nats per token (with the default byte tokenizer a
token is one byte of UTF-8 text).

- The base, on the corpus: `corpus_losses`, the mean loss over fixed validation windows per source.
- Any model on the tasks: `evaluate_tasks` scores each validation record the way a request is served.
  The prompt runs first through a KV cache (the prefill, where a MoA routes), then the response:
  its loss (nats per response token, and perplexity), exact match of the greedy answer, and ROUGE-L
  (over characters) of that answer against the reference. For a routed MoA also the routing
  accuracy per task and its confusion matrix: which expert each task's prompts went to.

Everything takes the model and the forward kwargs that pick its routing (`mode=...`), so the base,
the base + one expert, a MoA bundle in any routing mode and the baselines of baselines.py are scored
by the same code.

Read next: train_base.py.
"""

import numpy as np
import torch
import torch.nn.functional as F

from tokenizer import get_tokenizer


def per_sample_loss(logits, y):
    """logits (B, T, V), targets (B, T) -> mean cross-entropy of each sequence (B,)."""
    loss = F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none")  # (B, T)
    return loss.mean(dim=1)


@torch.no_grad()
def corpus_losses(model, data, n_windows, batch_size, device="cpu"):
    """Mean validation loss of each corpus source over n_windows fixed windows -> {"val/<source>": loss,
    "val_mean": their mean}."""
    out = {}
    for name in data.domains:
        starts = data.eval_starts(name, n_windows)
        total = 0.0
        for i in range(0, n_windows, batch_size):
            x, y = data.windows(name, "val", starts[i : i + batch_size])
            total += per_sample_loss(model(x.to(device))[0], y.to(device)).sum().item()
        out[f"val/{name}"] = total / n_windows
    out["val_mean"] = sum(out.values()) / len(data.domains)
    return out


def unigram_entropy(data, name):
    """Entropy (nats per token) of a source's training tokens taken one at a time: the loss of a model
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
        idx[i, T - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, T - len(r) :] = True
    return idx, mask


def right_pad(rows, pad_id):
    """Token lists of different lengths -> idx (B, T_max) padded on the right, mask (B, T_max)."""
    idx, mask = left_pad([r[::-1] for r in rows], pad_id)
    return idx.flip(1), mask.flip(1)


@torch.no_grad()
def prefill(model, prompts, pad_id, **kwargs):
    """The prompts (token lists), left-padded, through a fresh KV cache, as a request is served (a MoA decides its
    routes here) -> (idx, pad_mask, cache, logits (B, P, V))."""
    device = next(model.parameters()).device
    idx, mask = (t.to(device) for t in left_pad(prompts, pad_id))
    cache = model.new_cache()
    logits, _ = model(idx, pad_mask=mask, cache=cache, **kwargs)
    return idx, mask, cache, logits


@torch.no_grad()
def response_loss(model, prompts, responses, pad_id, served=True, prefilled=None, **kwargs):
    """Each record's summed loss over its response tokens, and their count -> (B,), (B,).

    served: scored as a request is served: the prompt runs first through a KV cache (a MoA decides
    its routes there, in any mode), then the response. Otherwise in one pass over prompt + response,
    as in training, a MoA's routers reading the prompt only: the same numbers in modes label, layer
    and token, where no decision is kept for later tokens (tests/test_tasks.py checks it).
    prefilled: prefill()'s result for these prompts, to continue (a copy of its cache) instead of a new prefill."""
    device = next(model.parameters()).device
    if not served:
        x, real = right_pad([p + r for p, r in zip(prompts, responses)], pad_id)  # (B, T)
        prompt = torch.arange(x.size(1)) < torch.tensor([len(p) for p in prompts])[:, None]  # (B, T)
        routers = {"router_mask": prompt.to(device)} if "mode" in kwargs else {}
        logits, _ = model(x.to(device), **kwargs, **routers)  # (B, T, V)
        scored = (real & ~prompt)[:, 1:].to(device)  # targets that are response tokens
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), x[:, 1:].to(device), reduction="none")
        return (nll * scored).sum(1), scored.sum(1)
    if prefilled is None:
        _, _, cache, first = prefill(model, prompts, pad_id, **kwargs)  # first: (B, P, V)
    else:
        cache, first = prefilled[2].copy(), prefilled[3]  # the caller decodes from the original
    response, real = (t.to(device) for t in right_pad(responses, pad_id))  # (B, R)
    rest, _ = model(response, pad_mask=real, cache=cache, **kwargs)  # (B, R, V)
    logits = torch.cat([first[:, -1:], rest[:, :-1]], dim=1)  # position j predicts response token j
    nll = F.cross_entropy(logits.float().transpose(1, 2), response, reduction="none") * real  # (B, R)
    return nll.sum(1), real.sum(1)


def rouge_l(candidate, reference):
    """ROUGE-L F1 of two strings over characters: their longest common subsequence against both lengths."""
    if not candidate or not reference:
        return float(candidate == reference)
    above = [0] * (len(reference) + 1)  # the LCS table, one row at a time
    for c in candidate:
        row = [0]
        for j, r in enumerate(reference):
            row.append(above[j] + 1 if c == r else max(above[j + 1], row[j]))
        above = row
    if above[-1] == 0:
        return 0.0
    precision, recall = above[-1] / len(candidate), above[-1] / len(reference)
    return 2 * precision * recall / (precision + recall)


@torch.no_grad()
def answers(model, prompts, max_new_tokens, eot, prefilled=None, **kwargs):
    """Greedy answers to prompts (token lists), each cut at its first EOT -> [token list]. A prompt too long for
    the context with the answer is cut to its last tokens, as it would be served. prefilled: prefill()'s result
    for prompts that fit (its cache is used up)."""
    device = next(model.parameters()).device
    if prefilled is None:
        room = model.config.block_size - max_new_tokens
        idx, mask = (t.to(device) for t in left_pad([p[-room:] for p in prompts], eot))
        start = None
    else:
        idx, mask, cache, logits = prefilled
        start = (cache, logits[:, -1])  # generate's form: the cache and the last position's logits
    out = model.generate(idx, max_new_tokens, temperature=0, pad_mask=mask, stop_token=eot, prefilled=start, **kwargs)
    out = out[:, idx.size(1) :].tolist()
    return [tokens[: tokens.index(eot)] if eot in tokens else tokens for tokens in out]


@torch.no_grad()
def evaluate_tasks(model, data, n=None, batch_size=64, generate=True, split="val", served=True, **kwargs):
    """Scores up to n records of each task of `data` (a TaskData) -> {"loss/<task>", and with generate
    "em/<task>", "rouge/<task>"; for a routed model "route/<task>", "cls/<task>" (the routers' L_cls on its prompts),
    "confusion", "route_layers"; "<metric>_mean"}.
    (Perplexity is exp(loss).)

    kwargs pick the routing (e.g. mode="last"); mode="label" gives each record its task's label.
    Routing accuracy is the share of prompts whose decision (MoA.routing["decision"], made from the
    prompt in this mode) is their task's expert; where the model reports a confidence in it, also its mean
    over the right and over the wrong routes ("confidence_right", "confidence_wrong"). served: see
    response_loss.
    """
    enc = get_tokenizer(data.tokenizer)
    eot, routed = data.eot, hasattr(model, "routing") and kwargs.get("mode") != "label"
    out, confusion, layers, n_routed = {}, [], [], 0
    confidence = {True: [], False: []}  # the last router's calibrated confidence on right and on wrong routes
    for label, name in enumerate(data.domains):
        totals = {"nll": 0.0, "tokens": 0, "em": 0, "rouge": 0.0, "routed": 0, "cls": None}
        ids = list(range(min(n or data.count(name, split), data.count(name, split))))
        row = torch.zeros(len(getattr(model, "domains", [])), dtype=torch.long)
        for start in range(0, len(ids), batch_size):
            prompts, responses = fit(
                *zip(*(data.record(name, split, i) for i in ids[start : start + batch_size])), model.config.block_size
            )
            kw = (
                {**kwargs, "domain": torch.full((len(prompts),), label, device=next(model.parameters()).device)}
                if kwargs.get("mode") == "label"
                else kwargs
            )
            if routed:
                model.routing = {}
            # served: one prefill for both the reference response's loss and the greedy answer (fit() left room)
            state = prefill(model, prompts, eot, **kw) if served and generate else None
            nll, count = response_loss(model, prompts, responses, eot, served, state, **kw)
            totals["nll"] += nll.sum().item()
            totals["tokens"] += count.sum().item()
            if routed and "decision" in model.routing:
                decision = model.routing["decision"].cpu()
                totals["routed"] += (decision == label).sum().item()
                if "logits" in model.routing:  # MoA's routers (a classifier or Arrow route without them)
                    logits = model.routing["logits"].float()  # (L, B, K): L_cls of these prompts, summed over them
                    truth = torch.full((logits.size(0) * logits.size(1),), label, device=logits.device)
                    cls = F.cross_entropy(logits.flatten(0, 1), truth, reduction="sum").item() / logits.size(0)
                    totals["cls"] = totals["cls"] + cls if totals["cls"] is not None else cls
                row += torch.bincount(decision, minlength=len(row))
                layers.append((model.routing["predicted"].cpu() == label).sum(1))  # (L,) right per router
                n_routed += len(prompts)
                if "confidence" in model.routing:
                    for right, p in zip((decision == label).tolist(), model.routing["confidence"].tolist()):
                        confidence[right].append(p)
            if generate:
                got_all = answers(model, prompts, max(map(len, responses)), eot, prefilled=state, **kw)
                for got, want in zip(got_all, responses):
                    got_text, want_text = enc.decode(got), enc.decode(want[:-1])  # want ends with EOT
                    totals["em"] += got_text == want_text
                    totals["rouge"] += rouge_l(got_text, want_text)
        out[f"loss/{name}"] = totals["nll"] / totals["tokens"]
        if generate:
            out[f"em/{name}"], out[f"rouge/{name}"] = totals["em"] / len(ids), totals["rouge"] / len(ids)
        if routed and layers:
            out[f"route/{name}"] = totals["routed"] / len(ids)
            if totals["cls"] is not None:
                out[f"cls/{name}"] = totals["cls"] / len(ids)
            confusion.append(row.tolist())
    for metric in ("loss", "em", "rouge", "route", "cls"):
        values = [v for k, v in out.items() if k.startswith(f"{metric}/")]
        if values:
            out[f"{metric}_mean"] = sum(values) / len(values)
    for right, key in ((True, "confidence_right"), (False, "confidence_wrong")):
        if confidence[right]:
            out[key] = sum(confidence[right]) / len(confidence[right])
    if confusion:
        out["confusion"] = confusion  # rows: true task, columns: the expert chosen
        out["route_layers"] = (torch.stack(layers).sum(0) / n_routed).tolist()  # each router's accuracy
    return out


def fit(prompts, responses, block_size):
    """A batch of records cut to fit the model's context once left-padded: each prompt to its last block_size - 1
    tokens, each response to the room the longest prompt leaves."""
    prompts = [p[-(block_size - 1) :] for p in prompts]
    room = block_size - max(map(len, prompts))
    return prompts, [r[:room] for r in responses]


@torch.no_grad()
def fit_temperature(moa, data, split="calib"):
    """The temperature T that makes the last router's softmax(logits / T) most likely to name the right task on
    data's `split` prompts (maximum likelihood over a grid): calibrated on prompts unlike any the routers
    trained on, a wrong route no longer reads as certain. -> (T, routing accuracy on those prompts)."""
    logits, labels = [], []
    for label, name in enumerate(data.domains):
        block = moa.config.block_size
        prompts = [data.record(name, split, i)[0][-block:] for i in range(data.count(name, split))]  # as served
        for start in range(0, len(prompts), 64):
            idx, mask = left_pad(prompts[start : start + 64], data.eot)
            device = next(moa.parameters()).device
            moa(idx.to(device), pad_mask=mask.to(device), mode="last")
            logits.append(moa.routing["logits"][-1].float().cpu())
            labels += [label] * idx.size(0)
    logits, labels = torch.cat(logits), torch.tensor(labels)
    grid = torch.logspace(-1, 3, 161)  # 0.1 .. 1000
    nll = torch.stack([F.cross_entropy(logits / t, labels) for t in grid])
    return grid[nll.argmin()].item(), (logits.argmax(-1) == labels).float().mean().item()
