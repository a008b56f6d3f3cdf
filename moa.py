"""Mixture-of-LoRAs: LoRA experts beside the frozen GPT's linear maps, and the routers that pick one.

Read top to bottom:
1. `LoRALinear`: a frozen nn.Linear with K LoRA experts beside it. Expert k adds
   (x @ A_k^T @ B_k^T) * alpha / r. A starts small and random, B at zero, so a new expert changes
   nothing. Which expert a sample uses is the layer's `route`: None (no expert), an int (every sample
   the same expert), a (B,) tensor of expert ids (each sample its own expert: a mixed-domain batch),
   or (B, T, K) weights (a per-token mixture, for the MoE-LoRA ablation). A mixed batch trains through
   a gather of each sample's A and B (batched matmuls); at inference, samples that share an expert
   and sit side by side run as one matmul with that expert's merged weight (`forward_runs`).
2. `add_experts`: freezes a GPT and puts LoRALinear on the chosen projections of every block.
   Stage 1 (train_lora.py) uses it with K = 1.
3. Expert files: one expert as .safetensors with JSON metadata, including a fingerprint of the base.
4. `MoA`: the GPT with K experts and one linear router per block. The router of block i reads the
   block's input, mean-pooled over real tokens, and predicts the domain (L_cls); training routes each
   sample by its gold domain label; inference routes by the routers (modes below), per sequence, once
   at prefill: the decision is kept in the KV cache for the rest of the generation.
5. Bundles: all experts + routers + domain names in one .safetensors file; adding and removing domains.

Read next: train_lora.py (stage 1), then train_router.py (stage 2).
"""
import hashlib
import json
import math
import os
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import GPT, GPTConfig
from trainer import UserError, load_safetensors, save_safetensors

TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # every linear map of a block
MODES = ("label", "layer", "last", "vote", "oracle", "token")


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus K low-rank experts; `route` says which expert each sample uses."""

    def __init__(self, base: nn.Linear, n_experts=1, rank=8, alpha=16.0, dropout=0.0):
        super().__init__()
        self.base, self.rank, self.scale = base, rank, alpha / rank
        self.lora_dropout = nn.Dropout(dropout)
        # One parameter pair per expert, so an expert can be frozen, added or removed on its own.
        self.lora_A = nn.ParameterList()  # each (r, in)
        self.lora_B = nn.ParameterList()  # each (out, r)
        for _ in range(n_experts):
            self.add_expert()
        self.route = None
        self.merged = None  # the expert whose update is currently added into base.weight
        self.reference_loop = False  # True: the slow, obvious loop over experts (tests compare against it)

    def add_expert(self):
        A = torch.empty(self.rank, self.base.in_features, device=self.base.weight.device)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.lora_A.append(nn.Parameter(A))
        self.lora_B.append(nn.Parameter(torch.zeros(self.base.out_features, self.rank, device=A.device)))

    def delta_weight(self, k):
        """Expert k's update of the weight, (out, in): always the product B @ A, never A and B apart."""
        # BEGIN ASSIGNMENT 1: return expert k's update (B_k @ A_k) * alpha / r, shape (out, in)
        return (self.lora_B[k] @ self.lora_A[k]) * self.scale
        # END ASSIGNMENT 1

    @torch.no_grad()
    def merge(self, k=0):
        assert self.merged is None, "unmerge first"
        self.base.weight += self.delta_weight(k).to(self.base.weight.dtype)
        self.merged = k

    @torch.no_grad()
    def unmerge(self):
        assert self.merged is not None, "nothing is merged"
        self.base.weight -= self.delta_weight(self.merged).to(self.base.weight.dtype)
        self.merged = None

    def forward(self, x):  # x (B, T, in)
        route = self.route
        if self.merged is not None:
            assert isinstance(route, int) and route == self.merged, "a merged layer serves only its merged expert"
        if route is None or self.merged is not None:
            return self.base(x)
        no_dropout = self.lora_dropout.p == 0 or not self.training
        if isinstance(route, int) and torch.is_grad_enabled() and no_dropout:
            # training one expert (stage 1): the same sum, with the backward written out (LoRAFunction below)
            return LoRAFunction.apply(x, self.base.weight, self.base.bias, self.lora_A[route], self.lora_B[route],
                                      self.scale)
        if torch.is_tensor(route) and route.dim() == 1 and x.size(0) * x.size(1) >= self.min_run_rows and no_dropout \
                and not torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type) and not self.reference_loop:
            # inference on a mixed batch with rows enough for one run at least: a few full matmuls, if that pays
            y = self.forward_runs(x, route)
            if y is not None:
                return y
        h = x if no_dropout else self.lora_dropout(x)
        y = self.base(x)  # (B, T, out)
        # The update is added into y in place, inside the second matmul, with the scale applied there:
        # no extra passes over the (B, T, out) output (y is the frozen base's fresh output; nothing saved it).
        # In-place ops escape autocast, hence B in y's dtype (bfloat16 under autocast, like z).
        if isinstance(route, int):  # the whole batch uses one expert: two plain matmuls
            # BEGIN ASSIGNMENT 1: return y + (h @ A_k^T @ B_k^T) * alpha / r for k = route, shape (B, T, out)
            z = h @ self.lora_A[route].t()  # (B, T, r)
            y2d, z2d = y.view(-1, y.size(-1)), z.view(-1, self.rank)  # (B*T, out), (B*T, r)
            return y2d.addmm_(z2d, self.lora_B[route].t().to(y.dtype), alpha=self.scale).view_as(y)
            # END ASSIGNMENT 1
        A, B = torch.stack(list(self.lora_A)), torch.stack(list(self.lora_B))  # (K, r, in), (K, out, r)
        if route.dtype.is_floating_point:  # (B, T, K) per-token weights: every expert, then mix
            z = torch.einsum("bti,kri->btkr", h, A)  # (B, T, K, r)
            return y + torch.einsum("btkr,kor,btk->bto", z, B, route.to(z.dtype)) * self.scale
        if self.reference_loop:
            return y + self.reference_delta(h, route)
        # (B,) expert ids: gather each sample's A and B, apply them with batched matmuls (Punica's BGMV)
        # BEGIN ASSIGNMENT 2: sample b uses expert route[b]: gather A[route], B[route] and apply them with torch.bmm
        z = torch.bmm(h, A[route].transpose(1, 2))  # (B, T, in) @ (B, in, r) -> (B, T, r)
        return y.baddbmm_(z, B[route].transpose(1, 2).to(y.dtype), alpha=self.scale)  # y += z @ B^T * scale
        # END ASSIGNMENT 2

    min_run_rows = 256  # forward_runs against the gather: even at about 256 rows per run on 2 CPU cores, ahead above

    def forward_runs(self, x, route):
        """Inference on (B,) expert ids as one full matmul per run of consecutive samples that share an
        expert, with that expert's merged weight W + s B_k A_k, written straight into the run's rows of
        the output (Punica's SGMV: segments of one adapter each). Merging costs K (out x in x r), nothing
        next to the rows; the gather in `forward` costs thin matmuls and a second pass over the output.
        None when the runs are too short to pay (decoding: one row per sample)."""
        experts, counts = (t.tolist() for t in torch.unique_consecutive(route, return_counts=True))
        T = x.size(1)
        if x.size(0) * T < self.min_run_rows * len(experts):
            return None
        W, bias = self.base.weight, self.base.bias
        merged = {k: torch.addmm(W, self.lora_B[k], self.lora_A[k], alpha=self.scale).t()  # (in, out)
                  for k in set(experts)}
        x2d = x.reshape(-1, x.size(-1))
        y = x.new_empty(x2d.size(0), W.size(0))  # (B*T, out)
        start = 0
        for k, n in zip(experts, counts):
            rows = slice(start * T, (start + n) * T)  # samples start .. start+n-1, contiguous in memory
            if bias is None:
                torch.mm(x2d[rows], merged[k], out=y[rows])
            else:
                torch.addmm(bias, x2d[rows], merged[k], out=y[rows])
            start += n
        return y.view(*x.shape[:-1], -1)

    def reference_delta(self, h, route):
        """The obvious way: for each expert present, run its samples through it. Slow, clearly right."""
        out = torch.zeros(*h.shape[:-1], self.base.out_features, dtype=h.dtype, device=h.device)
        for k in route.unique().tolist():
            rows = route == k
            out[rows] = h[rows] @ self.lora_A[k].t() @ self.lora_B[k].t() * self.scale
        return out


class LoRAFunction(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T for one expert, with its backward written out by hand.

    Left to autograd, the sum costs a LoRA step more than a full fine-tuning step: four thin matmuls
    over every token, the in-place update of a view, and x's two gradients added up. Written out, with
    the merged weight W' = W + s B A (out x in, cheap next to N tokens x in x out), it is:
        forward   y = x W'^T + b                         z = x A^T  (N, r), kept for B's gradient
        backward  dx = dy W'    dA = s (dy B)^T x    dB = s dy^T z
    one full matmul per pass as in the base, with no weight gradient for the frozen W, and three thin ones.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scale):
        x2d = x.reshape(-1, x.size(-1))  # (N, in)
        # BEGIN ASSIGNMENT 1: y (N, out) with the merged weight W + s B A; z = x A^T (N, r); save what backward needs
        y = F.linear(x2d, torch.addmm(weight, B, A, alpha=scale), bias)
        z = x2d @ A.t()
        ctx.save_for_backward(x2d, z, weight, A, B)
        ctx.scale = scale
        # END ASSIGNMENT 1
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_y):
        g = grad_y.reshape(-1, grad_y.size(-1))  # (N, out)
        # under autocast the forward ran in bfloat16/float16 but the backward does not: use y's dtype here too
        x2d, z, weight, A, B = (t.to(g.dtype) for t in ctx.saved_tensors)
        s, need = ctx.scale, ctx.needs_input_grad
        # BEGIN ASSIGNMENT 1: the gradients of x (as x's shape), W and b (only if they train), A and B
        gB = F.linear(g, B.t().contiguous())  # g @ B, (N, r): the CPU BLAS runs thin matmuls faster in this layout
        dx = (g @ torch.addmm(weight, B, A, alpha=s)).view(*grad_y.shape[:-1], -1) if need[0] else None
        dW = g.t() @ x2d if need[1] else None  # the base is frozen in nanoMoA: normally skipped
        db = g.sum(0) if need[2] else None
        dA = (gB.t() @ x2d) * s  # (r, in)
        dB = (z.t() @ g).t() * s  # (out, r), as (r, out) for the same reason
        # END ASSIGNMENT 1
        return dx, dW, db, dA, dB, None


def add_experts(model: GPT, n_experts=1, rank=8, alpha=16.0, dropout=0.0, targets=TARGETS):
    """Freezes `model` and puts a LoRALinear with n_experts experts on each target of every block.

    The fused q, k, v map (attn.c_attn, C -> 3C) gets one LoRA, as in PEFT on GPT-2: its rank is
    shared by q, k and v, so r = 8 there costs 8 * (C + 3C) parameters.
    """
    targets = tuple(targets)
    for t in targets:
        if t not in TARGETS:
            raise UserError(f"unknown LoRA target {t!r}; choose from {', '.join(TARGETS)}")
    if rank < 1:
        raise UserError(f"rank must be at least 1, got {rank}")
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.transformer.h:
        for t in targets:
            parent_name, name = t.split(".")
            parent = getattr(block, parent_name)
            setattr(parent, name, LoRALinear(getattr(parent, name), n_experts, rank, alpha, dropout))
    return model


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def set_route(module, route):
    for layer in lora_layers(module):
        layer.route = route


def count_params(model):
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


def base_fingerprint(model):
    """Identifies a base model: its config and a SHA-256 of its frozen weights (names without LoRA wrappers)."""
    assert all(layer.merged is None for layer in lora_layers(model)), "unmerge before fingerprinting"
    gpt = model.gpt if isinstance(model, MoA) else model
    digest = hashlib.sha256()
    for name, t in sorted(gpt.state_dict().items()):
        if "lora_" in name:
            continue
        digest.update(name.replace(".base.", ".").encode())
        digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return {"config": asdict(gpt.config), "sha256": digest.hexdigest()}


# ----------------------------------------------------------------------------------------------
# Expert files: the tensors of one expert, named by the layer they sit beside, + JSON metadata.

def expert_tensors(model, k):
    """Expert k of every LoRALinear -> {"transformer.h.0.attn.c_attn.lora_A": (r, in), ...}."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            name = name.removeprefix("gpt.")
            out[f"{name}.lora_A"], out[f"{name}.lora_B"] = m.lora_A[k].detach(), m.lora_B[k].detach()
    return out


def save_expert(path, model, k, domain, tokenizer, alpha, fingerprint, extra=None):
    """Writes expert k as one .safetensors file; its metadata (JSON) names the domain and the base."""
    layer = lora_layers(model)[0]
    meta = {"kind": "expert", "domain": domain, "rank": layer.rank, "alpha": alpha, "targets": expert_targets(model),
            "tokenizer": tokenizer, "base": fingerprint, **(extra or {})}
    save_safetensors(path, expert_tensors(model, k), {"nanomoa": json.dumps(meta)})


def read_meta(path, kind):
    if not os.path.isfile(path):
        raise UserError(f"{path} not found")
    tensors, meta = load_safetensors(path)
    if "nanomoa" not in meta:
        raise UserError(f"{path} has no nanoMoA metadata: not an expert or bundle written by nanoMoA")
    meta = json.loads(meta["nanomoa"])
    if meta.get("kind") != kind:
        raise UserError(f"{path} is a {meta.get('kind')}, not a {kind}")
    return tensors, meta


def check_base(path, meta, fingerprint, tokenizer):
    if meta["tokenizer"] != tokenizer:
        raise UserError(f"{path} was trained with tokenizer {meta['tokenizer']!r}, this base uses {tokenizer!r}")
    if meta["base"] != fingerprint:
        raise UserError(f"{path} was trained on another base model (fingerprint {meta['base']['sha256'][:12]} "
                        f"!= {fingerprint['sha256'][:12]}); use the base it was trained on")


def load_expert(path, model, k, fingerprint, tokenizer):
    """Copies the expert file at `path` into expert slot k of `model`; returns its metadata."""
    tensors, meta = read_meta(path, "expert")
    check_base(path, meta, fingerprint, tokenizer)
    ours = expert_tensors(model, k)
    if set(tensors) != set(ours):
        raise UserError(f"{path} has experts on {meta['targets']}, the model on {expert_targets(model)}")
    with torch.no_grad():
        for name, t in tensors.items():
            if t.shape != ours[name].shape:
                raise UserError(f"{path}: {name} is {tuple(t.shape)}, the model wants {tuple(ours[name].shape)} (rank?)")
            ours[name].copy_(t)
    return meta


def expert_targets(model):
    names = [n.removeprefix("gpt.") for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    return sorted({n.split(".", 3)[3] for n in names}, key=TARGETS.index)  # "transformer.h.0.attn.c_attn" -> "attn.c_attn"


# ----------------------------------------------------------------------------------------------
# MoA: experts side by side, routers, routing modes.

def pool(x, mask, how):
    """x (B, T, C) -> (B, C): the mean over the tokens where mask (B, T) is True (all if None), or the
    last of them (prompts are left-padded, so that is the last token unless mask marks a prefix)."""
    # BEGIN ASSIGNMENT 3: (B, C): the last True token if how == 'last', else the mean over tokens where mask is True
    if mask is None:
        return x[:, -1] if how == "last" else x.mean(dim=1)
    if how == "last":
        last = mask.long().cumsum(1).argmax(1)  # (B,): where the count of True tokens first peaks
        return x[torch.arange(x.size(0), device=x.device), last]
    m = mask.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
    return (x * m).sum(1) / m.sum(1).clamp(min=1)
    # END ASSIGNMENT 3


def vote(routes, probs):
    """routes (L, B) expert ids, probs (L, B, K) -> the majority expert per sample (B,); ties go to the
    expert with more total probability."""
    # BEGIN ASSIGNMENT 3: the expert most routers chose, per sample; a tie goes to the higher mean probability
    K = probs.size(-1)
    counts = F.one_hot(routes, K).sum(0).float()  # (B, K)
    return (counts + probs.mean(0) / 2).argmax(-1)  # probability (< 1) only breaks ties
    # END ASSIGNMENT 3


class MoA(nn.Module):
    """A frozen GPT with one LoRA expert per domain beside its linear maps and one router per block.

    Routing modes (`mode`, per forward call):
      label  - training: each sample uses its gold domain's expert; routers learn to predict it (L_cls)
      oracle - inference with the domain label given (the same routing as label; the batch runs sorted by
               domain inside, a full matmul per expert, and comes back in the caller's order)
      layer  - each block's router picks its own top-1 expert for the whole sequence
      last   - the last block's router decides, once, from the prompt; that expert then serves every block
      vote   - a majority vote of all routers decides, once, from the prompt
      token  - MoE-LoRA ablation: each token mixes its top_k experts with the router's softmax weights
    With a KV cache, the prompt (prefill) runs with each block routed by its own router, since block
    i's input only exists once blocks < i have run; the decision is then kept for every new token,
    so there is no second pass. `self.routing` tells what the last prefill (or full forward) chose.
    """

    def __init__(self, gpt: GPT, domains, rank=8, alpha=16.0, dropout=0.0, targets=TARGETS, pooling="mean",
                 eta=1.0, top_k=1):
        super().__init__()
        if pooling not in ("mean", "last"):
            raise UserError(f"pooling must be mean or last, got {pooling!r}")
        self.gpt = add_experts(gpt, len(domains), rank, alpha, dropout, targets)
        self.domains, self.alpha, self.pooling, self.eta, self.top_k = list(domains), alpha, pooling, eta, top_k
        C, K = gpt.config.n_embd, len(domains)
        self.routers = nn.ModuleList([nn.Linear(C, K) for _ in range(gpt.config.n_layer)])
        for r in self.routers:
            nn.init.zeros_(r.weight)  # start undecided: uniform over experts
            nn.init.zeros_(r.bias)
        self.blocks = [lora_layers(block) for block in gpt.transformer.h]  # each block's LoRALinear layers
        self.routing = {}

    @property
    def config(self) -> GPTConfig:
        return self.gpt.config

    generate = GPT.generate  # the same decoding loop: it only calls self(idx, pad_mask=, cache=)

    def forward(self, idx, targets=None, pad_mask=None, cache=None, domain=None, mode="label", router_mask=None):
        """Returns (logits, loss); loss = L_LM + eta * L_cls when targets and domain labels are given.

        router_mask (B, T) bool: the tokens the routers read (default: pad_mask, every real token).
        Training passes a random prefix of each window: with causal attention, the block inputs over
        a window's first L tokens are exactly those of an L-token prompt, so the routers learn to
        route prompts of every length at no extra cost.
        """
        if mode not in MODES:
            raise UserError(f"unknown routing mode {mode!r}; choose from {', '.join(MODES)}")
        if mode in ("label", "oracle") and domain is None:
            raise UserError(f"mode {mode} needs the domain labels")
        decoding = cache is not None and cache.route is not None
        # while decoding, per layer: the one expert all samples use (always, at batch 1), else None
        one_expert = [k[0] if len(set(k)) == 1 else None for k in cache.route.tolist()] if decoding else None
        router_logits, routes, route_by, order = [], [], domain, None
        if mode == "oracle" and cache is None and not torch.is_grad_enabled() and bool((domain[1:] < domain[:-1]).any()):
            # inference with known domains: sort the batch by domain, so that each expert's samples are one
            # run of rows (LoRALinear.forward_runs: a full matmul per expert); outputs go back in order below
            route_by, order = domain.sort(stable=True)
            idx, targets, pad_mask, router_mask = (None if t is None else t[order]
                                                   for t in (idx, targets, pad_mask, router_mask))

        def before_block(i, x, pad_mask, cache):
            if mode == "token":  # per token: top-k of the router's softmax, renormalised
                probs = F.softmax(self.routers[i](x).float(), dim=-1)  # (B, T, K)
                top, ids = probs.topk(self.top_k, dim=-1)
                route = torch.zeros_like(probs).scatter(-1, ids, top / top.sum(-1, keepdim=True))
            elif decoding:
                # BEGIN ASSIGNMENT 4: while decoding, block i uses the route that prefill stored for it
                route = cache.route[i]  # (B,) decided at prefill
                # END ASSIGNMENT 4
                if one_expert[i] is not None:  # every sample uses one expert: the plain path, no gather
                    route = one_expert[i]
            else:
                # BEGIN ASSIGNMENT 3: router i's logits on the pooled block input; route by label or by top-1
                logits = self.routers[i](pool(x, pad_mask if router_mask is None else router_mask, self.pooling))
                router_logits.append(logits)
                route = route_by if mode in ("label", "oracle") else logits.argmax(-1)
                routes.append(route)
                # END ASSIGNMENT 3
            for layer in self.blocks[i]:
                layer.route = route

        logits, lm_loss = self.gpt(idx, targets, pad_mask, cache, before_block)
        for layers in self.blocks:  # not set_route(self, None): walking every module is slow next to a decoding step
            for layer in layers:
                layer.route = None
        if decoding or mode == "token":
            return logits, lm_loss
        router_logits, routes = torch.stack(router_logits), torch.stack(routes)  # (L, B, K), (L, B)
        if order is not None:  # back to the caller's order
            inverse = order.argsort()
            logits, router_logits, routes = logits[inverse], router_logits[:, inverse], routes[:, inverse]
        probs = F.softmax(router_logits.float(), dim=-1)
        predicted = router_logits.argmax(-1)  # (L, B): each router's own choice, whatever routed this pass
        decision = {"last": predicted[-1], "vote": vote(predicted, probs)}.get(mode, routes[-1])  # (B,)
        if cache is not None:
            # BEGIN ASSIGNMENT 4: cache.route (L, B): last/vote: the decision in every layer; else each layer's own
            fixed = mode in ("last", "vote")
            cache.route = decision.expand_as(routes) if fixed else routes  # (L, B): kept for every new token
            # END ASSIGNMENT 4
        self.routing = {"logits": router_logits.detach(), "predicted": predicted, "routes": routes,
                        "decision": decision, "confidence": probs[-1].gather(1, predicted[-1:].t()).squeeze(1)}
        loss = lm_loss
        if domain is not None:
            # BEGIN ASSIGNMENT 3: L_cls = mean over layers of the routers' CE vs the label; add eta * L_cls
            cls_loss = F.cross_entropy(router_logits.float().flatten(0, 1), domain.repeat(len(self.routers)))
            self.routing["cls_loss"] = cls_loss.detach()
            if targets is not None:
                loss = lm_loss + self.eta * cls_loss
            # END ASSIGNMENT 3
        return logits, loss

    # ------------------------------------------------------------------------------------------
    # Changing the set of domains. Old experts and old router rows are never touched.

    def add_domain(self, name):
        """One more expert (fresh: B = 0) beside every linear map, and one more output row per router."""
        if name in self.domains:
            raise UserError(f"domain {name!r} is already in the bundle ({', '.join(self.domains)})")
        # BEGIN ASSIGNMENT 5: one more expert per LoRALinear; one more router row (weight 0, bias the old biases' mean)
        for layer in lora_layers(self):
            layer.add_expert()
        for i, r in enumerate(self.routers):
            grown = nn.Linear(r.in_features, r.out_features + 1, device=r.weight.device)
            with torch.no_grad():
                grown.weight.zero_()
                grown.weight[:-1] = r.weight
                grown.bias[:-1] = r.bias
                grown.bias[-1] = r.bias.mean()  # the new domain starts as likely as an average old one
            self.routers[i] = grown
        self.domains.append(name)
        # END ASSIGNMENT 5

    def remove_domain(self, name):
        """Drops a domain's expert and its row of every router."""
        if name not in self.domains:
            raise UserError(f"domain {name!r} is not in the bundle ({', '.join(self.domains)})")
        if len(self.domains) == 1:
            raise UserError("cannot remove the only domain of a bundle")
        # BEGIN ASSIGNMENT 5: drop expert k of every LoRALinear and row k of every router; keep the others in order
        k = self.domains.index(name)
        for layer in lora_layers(self):  # nn.ParameterList has no `del`: rebuild it without expert k
            layer.lora_A = nn.ParameterList([p for i, p in enumerate(layer.lora_A) if i != k])
            layer.lora_B = nn.ParameterList([p for i, p in enumerate(layer.lora_B) if i != k])
        keep = [i for i in range(len(self.domains)) if i != k]
        for i, r in enumerate(self.routers):
            smaller = nn.Linear(r.in_features, len(keep), device=r.weight.device)
            with torch.no_grad():
                smaller.weight.copy_(r.weight[keep])
                smaller.bias.copy_(r.bias[keep])
            self.routers[i] = smaller
        self.domains.pop(k)
        # END ASSIGNMENT 5


# ----------------------------------------------------------------------------------------------
# Bundles: every expert, every router and the domain names in one file.

def save_bundle(path, moa: MoA, tokenizer, fingerprint, extra=None):
    layer = lora_layers(moa)[0]
    meta = {"kind": "bundle", "domains": moa.domains, "rank": layer.rank, "alpha": moa.alpha,
            "targets": expert_targets(moa), "pooling": moa.pooling, "tokenizer": tokenizer, "base": fingerprint,
            **(extra or {})}
    tensors = {name: p.detach() for name, p in moa.named_parameters() if "lora_" in name or name.startswith("routers.")}
    save_safetensors(path, tensors, {"nanomoa": json.dumps(meta)})


def load_bundle(path, gpt: GPT, tokenizer, fingerprint=None):
    """A MoA built on `gpt` from the bundle at `path`; errors if the bundle belongs to another base."""
    tensors, meta = read_meta(path, "bundle")
    check_base(path, meta, fingerprint or base_fingerprint(gpt), tokenizer)
    moa = MoA(gpt, meta["domains"], meta["rank"], meta["alpha"], targets=meta["targets"], pooling=meta["pooling"],
              top_k=meta.get("top_k", 1))
    expected = {name for name, _ in moa.named_parameters() if "lora_" in name or name.startswith("routers.")}
    if set(tensors) != expected:
        raise UserError(f"{path} does not hold {len(meta['domains'])} experts and routers for this model: "
                        f"its tensors don't match (e.g. {sorted(set(tensors) ^ expected)[0]})")
    try:
        moa.load_state_dict(tensors, strict=False)
    except RuntimeError as e:
        raise UserError(f"{path} does not fit this model: {str(e).splitlines()[-1].strip()}") from None
    for p in moa.parameters():
        p.requires_grad_(False)
    return moa, meta
