"""Grading without holes: for each assignment, wrong answers a student could plausibly hand in, which its
grading tests must fail, and correct alternatives (an einsum, a loop, another valid formula), which they
must accept. Each is patched into a copy of the reference, inside the assignment's region, and graded:

    python tests/mutate.py --list assignments/mutants.py      # about 15 minutes on 2 cores
    python tests/mutate.py --list assignments/mutants.py --only a4-decode-route-none

The mechanism is the core's mutation check (tests/mutate.py); this list is the course's. It stays out of
the student copy (assignments/make.py's KIT).
"""

from mutate import Mutant

GRADED = ("tests/test_lora.py", "tests/test_moa.py", "tests/test_adapt.py", "tests/test_fast.py")


def graded(n):
    return GRADED + ("-m", f"assignment{n}")


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
        "a loop over samples, each through its own expert",
        "moa.py",
        GATHER,
        "            return y + torch.stack([h[b] @ A[k].t() @ B[k].t() for b, k in enumerate(route.tolist())]) "
        "* self.scale",
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
        "the masked mean, one sample at a time",
        "moa.py",
        "    return (x * m).sum(1) / m.sum(1).clamp(min=1)",
        "    return torch.stack([x[b, mask[b]].mean(0) for b in range(x.size(0))])",
        A3,
        correct=True,
    ),
    Mutant(
        "a3-vote-loop",
        "the vote with bincount per sample and an explicit tie-break",
        "moa.py",
        VOTE,
        "    mean = probs.mean(0)\n    out = []\n    for b in range(routes.size(1)):\n"
        "        c = torch.bincount(routes[:, b], minlength=K)\n        tied = (c == c.max()).nonzero().flatten()\n"
        "        out.append(tied[mean[b, tied].argmax()])\n    return torch.stack(out)",
        A3,
        correct=True,
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
        "a6-dx-two-terms",
        "dx as g W + s (g B) A, without the merged weight",
        "fast.py",
        DX,
        "        dx = (g @ weight + (gB @ A) * s).view(*grad_y.shape[:-1], -1) if need[0] else None",
        A6,
        correct=True,
    ),
]
