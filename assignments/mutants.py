"""Grading without holes: for each assignment, wrong answers a student could plausibly hand in, which its
grading tests must fail, and correct alternatives (an einsum, a loop, another valid formula), which they
must accept. Each is patched into a copy of the reference, inside the assignment's region, and graded:

    python tests/mutate.py --list assignments/mutants.py      # about 23 minutes on 2 busy cores
    python tests/mutate.py --list assignments/mutants.py --only a4-decode-route-none

The mechanism is the core's mutation check (tests/mutate.py); this list is the course's. It stays out of
the student copy (assignments/make.py's KIT).
"""

from mutate import Mutant


def graded(n):
    """The handout's grading command of assignment n, as pytest arguments: `pytest -q tests -m assignmentN`."""
    return ("tests", "-m", f"assignment{n}")


A1, A2, A3, A4, A5, A6 = (graded(n) for n in range(1, 7))
INT_ROUTE = "            return y + (h @ self.lora_A[route].t() @ self.lora_B[route].t()) * self.scale"
GATHER = (
    "            z = torch.bmm(h, A[route].transpose(1, 2))  # (B, T, in) @ (B, in, r) -> (B, T, r)\n"
    "            return y + torch.bmm(z, B[route].transpose(1, 2)) * self.scale  # (B, T, r) @ (B, r, out)"
)
VOTE = "    return (counts + probs.mean(0) / 2).argmax(-1)  # probability (< 1) only breaks ties"
CLS = "        cls_loss = F.cross_entropy(router_logits.float().flatten(0, 1), domain.repeat(len(self.routers)))"
ROUTE = '        return logits, domain if mode == "label" else logits.argmax(-1)'
PREFILL = (
    '            cache.route = self.routing["decision"].expand_as(routes) if fixed else routes'
    "  # kept for every new token"
)
DECODE = "            route = cache.route[i]  # (B,)"
DX = "        dx = (g @ torch.addmm(weight, B, A, alpha=s)).view(*grad_y.shape[:-1], -1) if need[0] else None"
POOL_MEAN = "    return (x * m).sum(1) / m.sum(1).clamp(min=1)"
POOL_LAST = "        return x[torch.arange(x.size(0), device=x.device), last]"
ROUTER_LOGITS = "        logits = self.routers[i](pool(x, mask, self.pooling))"
RECORD_CLS = '        self.routing["cls_loss"] = cls_loss.detach()'
GROW = "            grown = nn.Linear(r.in_features, r.out_features + 1, device=r.weight.device)"
SHRINK = "            smaller = nn.Linear(r.in_features, len(keep), device=r.weight.device)"
ROUTERS_TRAIN = (
    "        for p in moa.routers.parameters():\n"
    "            p.requires_grad_(True)\n"
    "            if not cfg.train_old_rows:  # zero the old rows' gradient: "
    "AdamW without decay then leaves them as they are\n"
    "                p.register_hook(lambda g: torch.cat([torch.zeros_like(g[:K]), g[K:]]))\n"
)
OLD_ROWS_HOOK = "                p.register_hook(lambda g: torch.cat([torch.zeros_like(g[:K]), g[K:]]))"
NEW_EXPERT = "            for p in [layer.lora_A[-1], layer.lora_B[-1]]:"
RUN_MATMUL = (
    "            if bias is None:\n"
    "                torch.mm(x2d[rows], merged[k], out=y[rows])\n"
    "            else:\n"
    "                torch.addmm(bias, x2d[rows], merged[k], out=y[rows])\n"
)

MUTANTS = [
    # ---- assignment 1: the LoRA layer
    Mutant(
        "a1-delta-no-scale",
        "delta_weight forgets alpha / r",
        "moa.py",
        "        return (self.lora_B[k] @ self.lora_A[k]) * self.scale",
        "        return self.lora_B[k] @ self.lora_A[k]",
        A1,
    ),
    Mutant(
        "a1-delta-alpha",
        "delta_weight scales by alpha, not alpha / r",
        "moa.py",
        "        return (self.lora_B[k] @ self.lora_A[k]) * self.scale",
        "        return (self.lora_B[k] @ self.lora_A[k]) * self.alpha",
        A1,
    ),
    Mutant(
        "a1-int-no-scale",
        "the one-expert forward forgets alpha / r",
        "moa.py",
        INT_ROUTE,
        "            return y + h @ self.lora_A[route].t() @ self.lora_B[route].t()",
        A1,
    ),
    Mutant(
        "a1-int-expert-0",
        "the one-expert forward always uses expert 0",
        "moa.py",
        INT_ROUTE,
        "            return y + (h @ self.lora_A[0].t() @ self.lora_B[0].t()) * self.scale",
        A1,
    ),
    Mutant(
        "a1-int-no-dropout",
        "the one-expert forward reads x, not the dropped-out h",
        "moa.py",
        INT_ROUTE,
        "            return y + (x @ self.lora_A[route].t() @ self.lora_B[route].t()) * self.scale",
        A1,
    ),
    Mutant(
        "a1-int-einsum",
        "the one-expert forward as two einsums",
        "moa.py",
        INT_ROUTE,
        '            return y + torch.einsum("btr,or->bto", torch.einsum("bti,ri->btr", h, self.lora_A[route]), '
        'self.lora_B[route]) * self.scale',
        A1,
        correct=True,
    ),
    Mutant(
        "a1-delta-transposes",
        "delta_weight as (A^T B^T)^T: the same product",
        "moa.py",
        "        return (self.lora_B[k] @ self.lora_A[k]) * self.scale",
        "        return (self.lora_A[k].t() @ self.lora_B[k].t()).t() * self.scale",
        A1,
        correct=True,
    ),
    Mutant(
        "a1-int-via-delta-weight",
        "the one-expert forward applies delta_weight(k): an (out, in) product per call (the handout rules it out)",
        "moa.py",
        INT_ROUTE,
        "            return y + F.linear(h, self.delta_weight(route))",
        A1,
    ),
    Mutant(
        "a1-int-product-first",
        "the one-expert forward multiplies A^T B^T first: an (in, out) product (the handout rules it out)",
        "moa.py",
        INT_ROUTE,
        "            return y + h @ (self.lora_A[route].t() @ self.lora_B[route].t()) * self.scale",
        A1,
    ),
    Mutant(
        "a1-int-merged-weight",
        "the one-expert forward through a merged weight W + delta (and so dropout on the base's input too)",
        "moa.py",
        INT_ROUTE,
        "            return F.linear(h, self.base.weight + self.delta_weight(route), self.base.bias)",
        A1,
    ),
    Mutant(
        "a1-int-base-no-bias",
        "the one-expert forward recomputes the base without its bias",
        "moa.py",
        INT_ROUTE,
        "            return x @ self.base.weight.t() "
        "+ (h @ self.lora_A[route].t() @ self.lora_B[route].t()) * self.scale",
        A1,
    ),
    Mutant(
        "a1-int-linear",
        "the one-expert forward as two F.linear calls",
        "moa.py",
        INT_ROUTE,
        "            return y + F.linear(F.linear(h, self.lora_A[route]), self.lora_B[route]) * self.scale",
        A1,
        correct=True,
    ),
    Mutant(
        "a1-int-scale-on-z",
        "the one-expert forward scales z = h A^T before B",
        "moa.py",
        INT_ROUTE,
        "            return y + ((h @ self.lora_A[route].t()) * self.scale) @ self.lora_B[route].t()",
        A1,
        correct=True,
    ),
    Mutant(
        "a1-delta-einsum",
        "delta_weight as an einsum, scaled by alpha / rank",
        "moa.py",
        "        return (self.lora_B[k] @ self.lora_A[k]) * self.scale",
        '        return torch.einsum("or,ri->oi", self.lora_B[k], self.lora_A[k]) * (self.alpha / self.rank)',
        A1,
        correct=True,
    ),
    # ---- assignment 2: a mixed batch
    Mutant(
        "a2-gather-no-scale",
        "the gather forgets alpha / r",
        "moa.py",
        GATHER,
        "            z = torch.bmm(h, A[route].transpose(1, 2))\n"
        "            return y + torch.bmm(z, B[route].transpose(1, 2))",
        A2,
    ),
    Mutant(
        "a2-gather-sorted",
        "the gather takes the experts of the sorted route: samples get the wrong expert",
        "moa.py",
        GATHER,
        "            route = route.sort().values\n"
        "            z = torch.bmm(h, A[route].transpose(1, 2))\n"
        "            return y + torch.bmm(z, B[route].transpose(1, 2)) * self.scale",
        A2,
    ),
    Mutant(
        "a2-gather-first-sample",
        "every sample uses the first sample's expert",
        "moa.py",
        GATHER,
        "            z = h @ A[route[0]].t()\n            return y + z @ B[route[0]].t() * self.scale",
        A2,
    ),
    Mutant(
        "a2-gather-no-dropout",
        "the gather reads x, not the dropped-out h",
        "moa.py",
        GATHER,
        "            z = torch.bmm(x, A[route].transpose(1, 2))\n"
        "            return y + torch.bmm(z, B[route].transpose(1, 2)) * self.scale",
        A2,
    ),
    Mutant(
        "a2-gather-einsum",
        "the gather as einsums",
        "moa.py",
        GATHER,
        '            z = torch.einsum("bti,bri->btr", h, A[route])\n'
        '            return y + torch.einsum("btr,bor->bto", z, B[route]) * self.scale',
        A2,
        correct=True,
    ),
    Mutant(
        "a2-loop-over-samples",
        "a Python loop over samples, each through its own expert (the handout rules it out)",
        "moa.py",
        GATHER,
        "            return y + torch.stack([h[b] @ A[k].t() @ B[k].t() for b, k in enumerate(route.tolist())]) "
        "* self.scale",
        A2,
    ),
    Mutant(
        "a2-loop-over-experts",
        "a Python loop over the batch's experts, each on its samples (the handout rules it out)",
        "moa.py",
        GATHER,
        "            out = y.clone()\n"
        "            for k in route.unique().tolist():\n"
        "                rows = route == k\n"
        "                out[rows] = out[rows] + h[rows] @ A[k].t() @ B[k].t() * self.scale\n"
        "            return out",
        A2,
    ),
    Mutant(
        "a2-gather-by-loop",
        "each sample's A and B gathered by a Python loop over samples, then bmm (the handout rules it out)",
        "moa.py",
        GATHER,
        "            A_b = torch.stack([A[k] for k in route.tolist()])\n"
        "            B_b = torch.stack([B[k] for k in route.tolist()])\n"
        "            return y + torch.bmm(torch.bmm(h, A_b.transpose(1, 2)), B_b.transpose(1, 2)) * self.scale",
        A2,
    ),
    Mutant(
        "a2-per-sample-product",
        "each sample's B_k A_k formed, then one bmm: an (out, in) product per sample (the handout rules it out)",
        "moa.py",
        GATHER,
        "            return y + torch.bmm(h, (B[route] @ A[route]).transpose(1, 2)) * self.scale",
        A2,
    ),
    Mutant(
        "a2-base-no-bias",
        "the gather recomputes the base without its bias",
        "moa.py",
        GATHER,
        "            z = torch.bmm(h, A[route].transpose(1, 2))\n"
        "            return F.linear(x, self.base.weight) + torch.bmm(z, B[route].transpose(1, 2)) * self.scale",
        A2,
    ),
    Mutant(
        "a2-index-select",
        "the gather with index_select",
        "moa.py",
        GATHER,
        "            z = torch.bmm(h, A.index_select(0, route).transpose(1, 2))\n"
        "            return y + torch.bmm(z, B.index_select(0, route).transpose(1, 2)) * self.scale",
        A2,
        correct=True,
    ),
    Mutant(
        "a2-baddbmm",
        "the second matmul and the sum in one baddbmm",
        "moa.py",
        GATHER,
        "            z = torch.bmm(h, A[route].transpose(1, 2))\n"
        "            return torch.baddbmm(y, z, B[route].transpose(1, 2), alpha=self.scale)",
        A2,
        correct=True,
    ),
    Mutant(
        "a2-one-hot",
        "each sample's A and B picked by a one-hot matmul over the experts",
        "moa.py",
        GATHER,
        "            pick = F.one_hot(route, A.size(0)).to(h.dtype)  # (B, K)\n"
        '            A_b, B_b = torch.einsum("bk,kri->bri", pick, A), torch.einsum("bk,kor->bor", pick, B)\n'
        "            return y + torch.bmm(torch.bmm(h, A_b.transpose(1, 2)), B_b.transpose(1, 2)) * self.scale",
        A2,
        correct=True,
    ),
    # ---- assignment 3: the routers and L_cls
    Mutant(
        "a3-pool-ignores-mask",
        "the mean pools every position, padding and response included",
        "moa.py",
        "    return (x * m).sum(1) / m.sum(1).clamp(min=1)",
        "    return x.mean(dim=1)",
        A3,
    ),
    Mutant(
        "a3-pool-sum",
        "the masked mean forgets to divide",
        "moa.py",
        "    return (x * m).sum(1) / m.sum(1).clamp(min=1)",
        "    return (x * m).sum(1)",
        A3,
    ),
    Mutant(
        "a3-pool-last-ignores-mask",
        "'last' pooling takes the last position, not the last True one",
        "moa.py",
        "        return x[torch.arange(x.size(0), device=x.device), last]",
        "        return x[:, -1]",
        A3,
    ),
    Mutant(
        "a3-vote-tie-to-last-layer",
        "a tie goes to the last layer's probability, not the mean over layers",
        "moa.py",
        VOTE,
        "    return (counts + probs[-1] / 2).argmax(-1)",
        A3,
    ),
    Mutant(
        "a3-vote-tie-to-first-index",
        "a tie goes to the lowest expert id",
        "moa.py",
        VOTE,
        "    return counts.argmax(-1)",
        A3,
    ),
    Mutant(
        "a3-vote-by-probability",
        "the vote sums probabilities, not choices",
        "moa.py",
        VOTE,
        "    return probs.sum(0).argmax(-1)",
        A3,
    ),
    Mutant(
        "a3-route-ignores-label",
        "in label mode the route is the router's choice, not the label",
        "moa.py",
        ROUTE,
        "        return logits, logits.argmax(-1)",
        A3,
    ),
    Mutant(
        "a3-route-ignores-mask",
        "the router pools every token, not the mask it is given",
        "moa.py",
        "        logits = self.routers[i](pool(x, mask, self.pooling))",
        "        logits = self.routers[i](pool(x, None, self.pooling))",
        A3,
    ),
    Mutant(
        "a3-cls-last-layer-only",
        "L_cls is the last router's loss only",
        "moa.py",
        CLS,
        "        cls_loss = F.cross_entropy(router_logits[-1].float(), domain)",
        A3,
    ),
    Mutant(
        "a3-cls-summed",
        "L_cls sums the layers' losses instead of averaging",
        "moa.py",
        CLS,
        "        cls_loss = F.cross_entropy(router_logits.float().flatten(0, 1), domain.repeat(len(self.routers)),"
        ' reduction="sum") / len(domain)',
        A3,
    ),
    Mutant(
        "a3-no-eta",
        "the routing loss is added without eta",
        "moa.py",
        "        loss = lm_loss + self.eta * cls_loss if targets is not None else lm_loss",
        "        loss = lm_loss + cls_loss if targets is not None else lm_loss",
        A3,
    ),
    Mutant(
        "a3-pool-loop",
        "the masked mean, one sample at a time (a loop over samples: the handout rules it out)",
        "moa.py",
        POOL_MEAN,
        "    return torch.stack([x[b, mask[b]].mean(0) for b in range(x.size(0))])",
        A3,
    ),
    Mutant(
        "a3-vote-loop",
        "the vote with bincount per sample and an explicit tie-break (a loop over samples: the handout rules it out)",
        "moa.py",
        VOTE,
        "    mean = probs.mean(0)\n    out = []\n    for b in range(routes.size(1)):\n"
        "        c = torch.bincount(routes[:, b], minlength=K)\n        tied = (c == c.max()).nonzero().flatten()\n"
        "        out.append(tied[mean[b, tied].argmax()])\n    return torch.stack(out)",
        A3,
    ),
    Mutant(
        "a3-cls-loop",
        "L_cls as a mean over a loop of layers",
        "moa.py",
        CLS,
        "        cls_loss = sum(F.cross_entropy(lg.float(), domain) for lg in router_logits) / len(router_logits)",
        A3,
        correct=True,
    ),
    Mutant(
        "a3-route-pools-by-mean",
        "the router pools by mean whatever the bundle's pooling (--pooling=last ignored)",
        "moa.py",
        ROUTER_LOGITS,
        '        logits = self.routers[i](pool(x, mask, "mean"))',
        A3,
    ),
    Mutant(
        "a3-route-pools-by-last",
        "the router pools the last token whatever the bundle's pooling",
        "moa.py",
        ROUTER_LOGITS,
        '        logits = self.routers[i](pool(x, mask, "last"))',
        A3,
    ),
    Mutant(
        "a3-route-last-ignores-mask",
        "with pooling=last the router takes the last position, not the mask's last token",
        "moa.py",
        ROUTER_LOGITS,
        '        logits = self.routers[i](x[:, -1] if self.pooling == "last" else pool(x, mask, self.pooling))',
        A3,
    ),
    Mutant(
        "a3-route-no-bias",
        "the router's linear map by hand, without its bias",
        "moa.py",
        ROUTER_LOGITS,
        "        logits = pool(x, mask, self.pooling) @ self.routers[i].weight.t()",
        A3,
    ),
    Mutant(
        "a3-route-label-whenever-given",
        "the label routes whenever one is given, whatever the mode (breaks train_router.py --mode=layer)",
        "moa.py",
        ROUTE,
        "        return logits, domain if domain is not None else logits.argmax(-1)",
        A3,
    ),
    Mutant(
        "a3-route-label-when-training",
        "the label routes in training, the router at evaluation, whatever the mode",
        "moa.py",
        ROUTE,
        "        return logits, domain if self.training else logits.argmax(-1)",
        A3,
    ),
    Mutant(
        "a3-pool-nomask-last-is-mean",
        "without a mask, pool takes the mean even for 'last'",
        "moa.py",
        '        return x[:, -1] if how == "last" else x.mean(dim=1)',
        "        return x.mean(dim=1)",
        A3,
    ),
    Mutant(
        "a3-pool-last-by-count",
        "'last' with a mask takes position (number of True tokens - 1): wrong for left padding",
        "moa.py",
        "        last = mask.long().cumsum(1).argmax(1)  # (B,): where the count of True tokens first peaks",
        "        last = mask.long().sum(1) - 1",
        A3,
    ),
    Mutant(
        "a3-vote-tie-max-layer",
        "a tie goes to the highest probability in any layer",
        "moa.py",
        VOTE,
        "    return (counts + probs.max(0).values / 2).argmax(-1)",
        A3,
    ),
    Mutant(
        "a3-vote-tie-mean-of-voters",
        "a tie goes to the mean probability over only the layers that voted for the expert",
        "moa.py",
        VOTE,
        "    voted = F.one_hot(routes, K).float()  # (L, B, K)\n"
        "    return (counts + (probs * voted).sum(0) / voted.sum(0).clamp(min=1) / 2).argmax(-1)",
        A3,
    ),
    Mutant(
        "a3-vote-tie-geometric",
        "a tie goes to the geometric mean of the probabilities over layers",
        "moa.py",
        VOTE,
        "    return (counts + probs.clamp(min=1e-12).log().mean(0).exp() / 2).argmax(-1)",
        A3,
    ),
    Mutant(
        "a3-vote-tie-first-layer",
        "a tie goes to the first layer's probability",
        "moa.py",
        VOTE,
        "    return (counts + probs[0] / 2).argmax(-1)",
        A3,
    ),
    Mutant(
        "a3-vote-tie-highest-id",
        "a tie goes to the highest expert id",
        "moa.py",
        VOTE,
        "    return (counts * K + torch.arange(K, device=counts.device)).argmax(-1)",
        A3,
    ),
    Mutant(
        "a3-vote-tie-any-expert",
        "a tie goes to the most probable expert of all, tied or not",
        "moa.py",
        VOTE,
        "    tied = (counts == counts.max(-1, keepdim=True).values).sum(-1) > 1\n"
        "    return torch.where(tied, probs.mean(0).argmax(-1), counts.argmax(-1))",
        A3,
    ),
    Mutant(
        "a3-cls-not-recorded",
        "L_cls is not kept in the routing summary",
        "moa.py",
        RECORD_CLS + "\n",
        "",
        A3,
    ),
    Mutant(
        "a3-cls-recorded-attached",
        "L_cls is kept in the routing summary with its graph (not detached)",
        "moa.py",
        RECORD_CLS,
        '        self.routing["cls_loss"] = cls_loss',
        A3,
    ),
    Mutant(
        "a3-cls-labels-interleaved",
        "the labels repeated per sample (repeat_interleave), not per layer: layer and label out of step",
        "moa.py",
        CLS,
        "        cls_loss = F.cross_entropy(router_logits.float().flatten(0, 1), "
        "domain.repeat_interleave(len(self.routers)))",
        A3,
    ),
    Mutant(
        "a3-cls-first-layer-only",
        "L_cls is the first router's loss only",
        "moa.py",
        CLS,
        "        cls_loss = F.cross_entropy(router_logits[0].float(), domain)",
        A3,
    ),
    Mutant(
        "a3-cls-of-probabilities",
        "L_cls is the cross-entropy of the softmax, not of the logits (a second softmax)",
        "moa.py",
        CLS,
        "        cls_loss = F.cross_entropy(F.softmax(router_logits.float(), -1).flatten(0, 1), "
        "domain.repeat(len(self.routers)))",
        A3,
    ),
    Mutant(
        "a3-cls-label-mode-only",
        "eta * L_cls is added in label mode only (train_router.py --mode=layer would not train the routers)",
        "moa.py",
        "        loss = lm_loss + self.eta * cls_loss if targets is not None else lm_loss",
        '        loss = lm_loss + self.eta * cls_loss if targets is not None and mode == "label" else lm_loss',
        A3,
    ),
    Mutant(
        "a3-cls-detached-in-loss",
        "eta * L_cls is added detached: the routers get no gradient and never learn",
        "moa.py",
        "        loss = lm_loss + self.eta * cls_loss if targets is not None else lm_loss",
        "        loss = lm_loss + self.eta * cls_loss.detach() if targets is not None else lm_loss",
        A3,
    ),
    Mutant(
        "a3-loss-without-targets",
        "without targets the loss returned is eta * L_cls, not the GPT's (None)",
        "moa.py",
        "        loss = lm_loss + self.eta * cls_loss if targets is not None else lm_loss",
        "        loss = lm_loss + self.eta * cls_loss if targets is not None else self.eta * cls_loss",
        A3,
    ),
    Mutant(
        "a3-pool-where",
        "the masked mean with torch.where",
        "moa.py",
        POOL_MEAN,
        "    return torch.where(mask[..., None], x, 0).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)",
        A3,
        correct=True,
    ),
    Mutant(
        "a3-pool-last-gather",
        "'last' with a mask: the position of the largest index * mask, read with gather",
        "moa.py",
        POOL_LAST,
        "        last = (mask * torch.arange(1, x.size(1) + 1, device=x.device)).argmax(1)  # (B,)\n"
        "        return x.gather(1, last[:, None, None].expand(-1, 1, x.size(-1))).squeeze(1)",
        A3,
        correct=True,
    ),
    Mutant(
        "a3-vote-masked-mean",
        "the vote as the mean probability over the experts with the most votes",
        "moa.py",
        VOTE,
        "    best = counts == counts.max(-1, keepdim=True).values  # (B, K): the tied experts\n"
        "    return torch.where(best, probs.mean(0), -1.0).argmax(-1)",
        A3,
        correct=True,
    ),
    Mutant(
        "a3-vote-counts-plus-mean",
        "the vote as counts + mean probability (a mean below 1 never outweighs a vote)",
        "moa.py",
        VOTE,
        "    return (counts + probs.mean(0)).argmax(-1)",
        A3,
        correct=True,
    ),
    Mutant(
        "a3-route-by-hand",
        "the router's linear map by hand, bias included; the top-1 of the softmax",
        "moa.py",
        ROUTE,
        '        return logits, domain if mode == "label" else F.softmax(logits, -1).argmax(-1)',
        A3,
        correct=True,
    ),
    Mutant(
        "a3-cls-nll",
        "L_cls as nll_loss of log_softmax",
        "moa.py",
        CLS,
        "        cls_loss = F.nll_loss(F.log_softmax(router_logits.float(), -1).flatten(0, 1), "
        "domain.repeat(len(self.routers)))",
        A3,
        correct=True,
    ),
    # ---- assignment 4: routing at inference, with the KV cache
    Mutant(
        "a4-decode-route-none", "while decoding no expert is used", "moa.py", DECODE, "            route = None", A4
    ),
    Mutant(
        "a4-decode-route-zeros",
        "while decoding every sample uses expert 0",
        "moa.py",
        DECODE,
        "            route = torch.zeros_like(cache.route[i])",
        A4,
    ),
    Mutant(
        "a4-decode-last-layer",
        "while decoding every block uses the last block's route",
        "moa.py",
        DECODE,
        "            route = cache.route[-1]",
        A4,
    ),
    Mutant(
        "a4-decode-first-sample",
        "while decoding every sample uses the first sample's route",
        "moa.py",
        DECODE,
        "            route = cache.route[i][:1].expand_as(cache.route[i])",
        A4,
    ),
    Mutant(
        "a4-prefill-always-fixed",
        "every mode keeps one decision for every layer (layer mode too)",
        "moa.py",
        PREFILL,
        '            cache.route = self.routing["decision"].expand_as(routes)',
        A4,
    ),
    Mutant(
        "a4-prefill-never-fixed",
        "last and vote keep each layer's own route, not the decision",
        "moa.py",
        PREFILL,
        "            cache.route = routes",
        A4,
    ),
    Mutant(
        "a4-decode-clone",
        "decoding reads a copy of the stored route",
        "moa.py",
        DECODE,
        "            route = cache.route[i].clone()",
        A4,
        correct=True,
    ),
    Mutant(
        "a4-prefill-repeat",
        "the decision repeated with repeat, not expand",
        "moa.py",
        PREFILL,
        '            cache.route = self.routing["decision"].repeat(len(routes), 1) if fixed else routes',
        A4,
        correct=True,
    ),
    Mutant(
        "a4-label-keeps-predictions",
        "with a cache, label mode keeps the routers' predictions, not the labels",
        "moa.py",
        PREFILL,
        '            cache.route = self.routing["decision"].expand_as(routes) if fixed else self.routing["predicted"]',
        A4,
    ),
    Mutant(
        "a4-prefill-vote-as-last",
        "vote keeps the last router's choice, not the vote's decision",
        "moa.py",
        PREFILL,
        '            cache.route = self.routing["predicted"][-1].expand_as(routes) if fixed else routes',
        A4,
    ),
    Mutant(
        "a4-prefill-first-layer",
        "layer and label modes keep the first layer's route for every layer",
        "moa.py",
        PREFILL,
        '            cache.route = self.routing["decision"].expand_as(routes) if fixed '
        "else routes[:1].expand_as(routes)",
        A4,
    ),
    Mutant(
        "a4-decode-from-routing",
        "decoding reads the last forward's decision (self.routing), not cache.route",
        "moa.py",
        DECODE,
        '            route = self.routing["decision"]',
        A4,
    ),
    Mutant(
        "a4-decode-asks-routers",
        "decoding asks the routers again, on the new token",
        "moa.py",
        DECODE,
        '            route = self.route_block(i, x, None, None, "layer")[1]',
        A4,
    ),
    Mutant(
        "a4-decode-runs-routers",
        "decoding runs the routers (for nothing) before using cache.route: the handout says they are not asked",
        "moa.py",
        DECODE,
        '            self.route_block(i, x, None, None, "layer")\n            route = cache.route[i]',
        A4,
    ),
    Mutant(
        "a4-prefill-fixed-unless-layer",
        "every mode but layer keeps the decision (in label mode the decision is the label)",
        "moa.py",
        '            fixed = mode in ("last", "vote")',
        '            fixed = mode != "layer"',
        A4,
        correct=True,
    ),
    Mutant(
        "a4-prefill-stack",
        "the decision stacked once per layer; each layer's routes copied",
        "moa.py",
        PREFILL,
        '            cache.route = torch.stack([self.routing["decision"]] * len(routes)) if fixed else routes.clone()',
        A4,
        correct=True,
    ),
    # ---- assignment 5: adding and removing a domain
    Mutant(
        "a5-add-bias-zero",
        "the new router row's bias is 0, not the old biases' mean",
        "moa.py",
        "                grown.bias[-1] = r.bias.mean()  # the new domain starts as likely as an average old one",
        "                grown.bias[-1] = 0.0",
        A5,
    ),
    Mutant(
        "a5-add-row-random",
        "the new router row keeps nn.Linear's random weight",
        "moa.py",
        "                grown.weight.zero_()\n",
        "",
        A5,
    ),
    Mutant(
        "a5-add-no-name",
        "add_domain forgets to append the name",
        "moa.py",
        "        self.domains.append(name)\n",
        "",
        A5,
    ),
    Mutant(
        "a5-remove-swaps-last-in",
        "remove_domain moves the last expert into the removed one's place",
        "moa.py",
        "        keep = [i for i in range(len(self.domains)) if i != k]",
        "        keep = [i for i in range(len(self.domains) - 1)]\n        keep[k:k + 1] = [len(self.domains) - 1] "
        "if k < len(self.domains) - 1 else []",
        A5,
    ),
    Mutant(
        "a5-remove-last",
        "remove_domain drops the last expert and row whatever the name",
        "moa.py",
        "        k = self.domains.index(name)",
        "        k = len(self.domains) - 1",
        A5,
    ),
    Mutant(
        "a5-build-old-rows-train",
        "adding trains every router row (no gradient hook)",
        "train_router.py",
        "            if not cfg.train_old_rows:  # zero the old rows' gradient: AdamW without decay then leaves "
        "them as they are\n                p.register_hook(lambda g: torch.cat([torch.zeros_like(g[:K]), g[K:]]))\n",
        "",
        A5,
    ),
    Mutant(
        "a5-build-new-expert-always-trains",
        "the new expert trains without --train_new_expert",
        "train_router.py",
        "                p.requires_grad_(cfg.train_new_expert)",
        "                p.requires_grad_(True)",
        A5,
    ),
    Mutant(
        "a5-build-new-expert-never-trains",
        "--train_new_expert does nothing",
        "train_router.py",
        "                p.requires_grad_(cfg.train_new_expert)",
        "                p.requires_grad_(False)",
        A5,
    ),
    Mutant(
        "a5-build-expert-in-slot-0",
        "the new expert's file is loaded into slot 0",
        "train_router.py",
        "        load_expert(expert_path(cfg, cfg.add_domain), moa, len(moa.domains) - 1, base, tokenizer)",
        "        load_expert(expert_path(cfg, cfg.add_domain), moa, 0, base, tokenizer)",
        A5,
    ),
    Mutant(
        "a5-add-by-cat",
        "the grown router built with torch.cat",
        "moa.py",
        "                grown.weight.zero_()\n                grown.weight[:-1] = r.weight\n"
        "                grown.bias[:-1] = r.bias\n"
        "                grown.bias[-1] = r.bias.mean()  # the new domain starts as likely as an average old one",
        "                grown.weight.copy_(torch.cat([r.weight, torch.zeros_like(r.weight[:1])]))\n"
        "                grown.bias.copy_(torch.cat([r.bias, r.bias.mean()[None]]))",
        A5,
        correct=True,
    ),
    Mutant(
        "a5-add-default-device",
        "the grown router is made on the default device, not the model's",
        "moa.py",
        GROW,
        "            grown = nn.Linear(r.in_features, r.out_features + 1)",
        A5,
    ),
    Mutant(
        "a5-remove-default-device",
        "the smaller router is made on the default device, not the model's",
        "moa.py",
        SHRINK,
        "            smaller = nn.Linear(r.in_features, len(keep))",
        A5,
    ),
    Mutant(
        "a5-remove-keeps-name",
        "remove_domain forgets to drop the name",
        "moa.py",
        "        self.domains.pop(k)\n",
        "",
        A5,
    ),
    Mutant(
        "a5-build-biases-frozen",
        "adding trains the routers' weights only: the biases stay frozen, so the new row's bias never learns",
        "train_router.py",
        ROUTERS_TRAIN,
        "        for r in moa.routers:\n"
        "            r.bias.requires_grad_(False)\n"
        "            r.weight.requires_grad_(True)\n"
        "            if not cfg.train_old_rows:\n"
        "                r.weight.register_hook(lambda g: torch.cat([torch.zeros_like(g[:K]), g[K:]]))\n",
        A5,
    ),
    Mutant(
        "a5-build-hook-weights-only",
        "adding freezes the old rows of the weights but not of the biases",
        "train_router.py",
        "            if not cfg.train_old_rows:  # zero",
        "            if not cfg.train_old_rows and p.dim() == 2:  # zero",
        A5,
    ),
    Mutant(
        "a5-build-k-all-rows",
        "the hook zeroes K + 1 rows: the new row does not learn either",
        "train_router.py",
        "        K = len(moa.domains) - 1  # rows 0..K-1 are the old domains'",
        "        K = len(moa.domains)",
        A5,
    ),
    Mutant(
        "a5-build-hook-inverted",
        "the hook zeroes the new row's gradient and lets the old rows learn",
        "train_router.py",
        OLD_ROWS_HOOK,
        "                p.register_hook(lambda g: torch.cat([g[:K], torch.zeros_like(g[K:])]))",
        A5,
    ),
    Mutant(
        "a5-build-new-expert-a-only",
        "--train_new_expert trains the new expert's A, not its B",
        "train_router.py",
        NEW_EXPERT,
        "            for p in [layer.lora_A[-1]]:",
        A5,
    ),
    Mutant(
        "a5-build-every-expert-trains",
        "--train_new_expert trains every expert, the old ones too",
        "train_router.py",
        NEW_EXPERT,
        "            for p in [*layer.lora_A, *layer.lora_B]:",
        A5,
    ),
    Mutant(
        "a5-add-to-device",
        "the grown router made on the default device, then moved to the model's",
        "moa.py",
        GROW,
        "            grown = nn.Linear(r.in_features, r.out_features + 1).to(r.weight.device)",
        A5,
        correct=True,
    ),
    Mutant(
        "a5-build-hook-mask",
        "the old rows' gradient zeroed by a mask",
        "train_router.py",
        OLD_ROWS_HOOK,
        "                p.register_hook(lambda g: g * (torch.arange(len(g), device=g.device) >= K)"
        ".view(-1, *[1] * (g.dim() - 1)))",
        A5,
        correct=True,
    ),
    Mutant(
        "a5-build-hook-index-fill",
        "the old rows' gradient zeroed by index_fill",
        "train_router.py",
        OLD_ROWS_HOOK,
        "                p.register_hook(lambda g: g.index_fill(0, torch.arange(K, device=g.device), 0.0))",
        A5,
        correct=True,
    ),
    # ---- assignment 6 (optional): the speed paths
    Mutant(
        "a6-forward-unmerged",
        "LoRAFunction's forward uses W, not the merged weight",
        "fast.py",
        "        y = F.linear(x2d, torch.addmm(weight, B, A, alpha=scale), bias)",
        "        y = F.linear(x2d, weight, bias)",
        A6,
    ),
    Mutant(
        "a6-dx-unmerged",
        "dx uses W, not the merged weight",
        "fast.py",
        DX,
        "        dx = (g @ weight).view(*grad_y.shape[:-1], -1) if need[0] else None",
        A6,
    ),
    Mutant(
        "a6-da-no-scale",
        "dA forgets the scale",
        "fast.py",
        "        dA = (gB.t() @ x2d) * s  # (r, in)",
        "        dA = gB.t() @ x2d",
        A6,
    ),
    Mutant(
        "a6-db-from-x",
        "dB uses x instead of z = x A^T",
        "fast.py",
        "        dB = (z.t() @ g).t() * s  # (out, r), as (r, out) for the same reason",
        "        dB = (x2d[:, :z.size(1)].t() @ g).t() * s",
        A6,
    ),
    Mutant(
        "a6-runs-no-scale",
        "the runs' merged weight forgets the scale",
        "fast.py",
        "            k: torch.addmm(W, self.lora_B[k], self.lora_A[k], alpha=self.scale).t()  # (in, out)",
        "            k: torch.addmm(W, self.lora_B[k], self.lora_A[k]).t()  # (in, out)",
        A6,
    ),
    Mutant(
        "a6-runs-wrong-rows",
        "a run's rows start at the sample index, not sample index x T",
        "fast.py",
        "            rows = slice(start * T, (start + n) * T)  # samples start .. start+n-1, contiguous in memory",
        "            rows = slice(start, start + n * T)",
        A6,
    ),
    Mutant(
        "a6-merged-expert-0",
        "decoding merges expert 0 whatever the route",
        "fast.py",
        "        k = experts[0]",
        "        k = 0",
        A6,
    ),
    Mutant(
        "a6-runs-no-bias",
        "the sorted runs drop the base's bias",
        "fast.py",
        RUN_MATMUL,
        "            torch.mm(x2d[rows], merged[k], out=y[rows])\n",
        A6,
    ),
    Mutant(
        "a6-runs-per-sample",
        "the sorted runs as one matmul per sample, not per run",
        "fast.py",
        RUN_MATMUL,
        "            for j in range(start, start + n):\n"
        "                one = slice(j * T, (j + 1) * T)\n"
        "                y[one] = x2d[one] @ merged[k] + (0 if bias is None else bias)\n",
        A6,
    ),
    Mutant(
        "a6-runs-expert-by-position",
        "each run's merged weight is made from the expert numbered by the run's position, not from its expert",
        "fast.py",
        "            k: torch.addmm(W, self.lora_B[k], self.lora_A[k], alpha=self.scale).t()  # (in, out)\n"
        "            for k in set(experts)",
        "            k: torch.addmm(W, self.lora_B[j], self.lora_A[j], alpha=self.scale).t()\n"
        "            for j, k in enumerate(experts)",
        A6,
    ),
    Mutant(
        "a6-db-gated-on-weight",
        "the bias's gradient is computed when the weight trains, not when the bias does",
        "fast.py",
        "        db = g.sum(0) if need[2] else None",
        "        db = g.sum(0) if need[1] else None",
        A6,
    ),
    Mutant(
        "a6-dw-gated-on-bias",
        "the weight's gradient is computed when the bias trains, not when the weight does",
        "fast.py",
        "        dW = g.t() @ x2d if need[1] else None  # the base is frozen in nanoMoA: normally skipped",
        "        dW = g.t() @ x2d if need[2] else None",
        A6,
    ),
    Mutant(
        "a6-dx-always",
        "x's gradient is computed even when x does not need one",
        "fast.py",
        DX,
        "        dx = (g @ torch.addmm(weight, B, A, alpha=s)).view(*grad_y.shape[:-1], -1)",
        A6,
    ),
    Mutant(
        "a6-merged-no-scale",
        "decoding's merged weight forgets the scale",
        "fast.py",
        "            torch.addmm(layer.base.weight, layer.lora_B[k], layer.lora_A[k], alpha=layer.scale)",
        "            torch.addmm(layer.base.weight, layer.lora_B[k], layer.lora_A[k])",
        A6,
    ),
    Mutant(
        "a6-forward-two-terms",
        "LoRAFunction's forward as x W^T + b + s (x A^T) B^T, without the merged weight",
        "fast.py",
        "        y = F.linear(x2d, torch.addmm(weight, B, A, alpha=scale), bias)\n        z = x2d @ A.t()",
        "        z = x2d @ A.t()\n        y = F.linear(x2d, weight, bias) + (z @ B.t()) * scale",
        A6,
        correct=True,
    ),
    Mutant(
        "a6-runs-bias-added",
        "the sorted runs add the bias after the matmul",
        "fast.py",
        RUN_MATMUL,
        "            torch.mm(x2d[rows], merged[k], out=y[rows])\n"
        "            if bias is not None:\n"
        "                y[rows] += bias\n",
        A6,
        correct=True,
    ),
    Mutant(
        "a6-merged-plus",
        "decoding's merged weight as W + s * (B @ A)",
        "fast.py",
        "            torch.addmm(layer.base.weight, layer.lora_B[k], layer.lora_A[k], alpha=layer.scale)",
        "            layer.base.weight + layer.scale * (layer.lora_B[k] @ layer.lora_A[k])",
        A6,
        correct=True,
    ),
    Mutant(
        "a6-dx-two-terms",
        "dx as g W + s (g B) A, without the merged weight",
        "fast.py",
        DX,
        "        dx = (g @ weight + (gB @ A) * s).view(*grad_y.shape[:-1], -1) if need[0] else None",
        A6,
        correct=True,
    ),
]
