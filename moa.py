"""Mixture-of-LoRAs: LoRA experts beside the frozen GPT's linear maps, and the routers that pick one.

Read top to bottom:
1. `LoRALinear`: a frozen nn.Linear with K LoRA experts beside it. Expert k adds
   (x @ A_k^T @ B_k^T) * alpha / r. A starts small and random, B at zero, so a new expert changes
   nothing. Which expert a sample uses is the layer's `route`: None (no expert), an int (every sample
   the same expert), a (B,) tensor of expert ids (each sample its own expert: a mixed-domain batch),
   or (B, T, K) weights (a per-token mixture, for the MoE-LoRA ablation).
2. `add_experts`: freezes a GPT and puts LoRALinear on the chosen linear maps of every block.
   Stage 1 (train_lora.py) uses it with K = 1.
3. `MoA`: the GPT with K experts and one router per block. The router of block i reads the
   block's input, pooled over the prompt's tokens, and predicts the domain (its loss is L_cls): a
   linear map (the paper's), or with `router_hidden` a small per-token layer before the pooling
   (with `router_window`, each token's layer also reads the tokens just before it).
   Training routes each sample by its domain label; inference by the routers (the routing modes),
   one expert per sequence, decided at prefill and kept in the KV cache for the whole generation.
4. `add_domain` / `remove_domain`: one expert and one router row more, or less.

This file is the method written the plain way. fast.py computes the same things faster (a
hand-written backward, merged weights, sorted batches); one setting switches it on (`--fast`, on by
default in every script) and tests/test_fast.py checks that both give the same numbers. Expert and
bundle files are in files.py.

Read next: train_lora.py (stage 1), then train_router.py (stage 2).
"""

import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

from config import UserError
from model import GPT, GPTConfig, KVCache

TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # every linear map of a block
# Routing modes, MoA.forward(mode=...): label (the domain label picks the expert: training, or inference with
# the label given), layer (each block's router picks), last / vote (the last router, or a vote of all,
# decides once from the prompt), token (the MoE-LoRA ablation: a per-token mixture). See MoA.forward.
MODES = ("label", "layer", "last", "vote", "token")
SERVE_MODE = "vote"  # what sample.py, results.py and demo.py route by: it beat last in every seed (README)
# What a router reads, pooled over the prompt (MoA(router_input=...)): block, the block's input, with the earlier
# blocks' experts in it (as the paper draws it); base, the frozen base's hidden state at that block, the same in
# training (the label picks the experts) and at inference (the routers do), for one more pass of the frozen blocks
# over the prompt. With block, the routers of later blocks can learn the label from the earlier experts' output.
ROUTER_INPUTS = ("block", "base")
# A router's form (MoA(router_hidden=...)): 0, the paper's, one linear map of the pooled hidden state to K logits;
# H > 0, each token's hidden state goes first through LayerNorm, a linear map to H units and a GELU, and the linear
# map reads those features pooled. On the demo's base, routers trained alone on the same experts route 79% of the
# validation prompts right as linear maps, 96% with 64 units, 98% with 64 units over 3-token windows (README,
# Results). The layer is shared by all of a router's rows: adding a domain adds a row and leaves it as it is.
# With router_window W > 1 the linear map to H reads each token's LayerNorm-ed state and the W - 1 before it (zeros
# before the prompt's first token): a token's features see the word pieces just before it ("de" of "decapitalize"),
# never a later token, so prefill and training read the same. The LayerNorm and the map are router_features[i][0, 1].


class LoRADropout(nn.Dropout):
    """Dropout on a LoRA expert's input. In training, the masks come from `noise`, set for one forward by
    `routed`: one (length, generator) per row, each row's mask drawn from its own generator over its own
    real tokens, the layers drawing in turn. So a row's masks are the same whatever shares its batch, and
    however it is padded: train_lora.py trains several experts in one batch exactly as each would train
    alone (batches.JointData). Without noise, nn.Dropout's own masks."""

    noise = ()

    def forward(self, x):  # x (B, T, in)
        if not self.training or self.p == 0 or not self.noise:
            return super().forward(x)
        mask = torch.ones_like(x)
        for b, (n, gen) in enumerate(self.noise):
            keep = torch.rand(n, x.size(-1), generator=gen, device=gen.device) >= self.p  # (n, in)
            mask[b, :n] = keep.to(x.dtype) / (1 - self.p)
        return x * mask


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus K low-rank experts; `route` says which expert each sample uses."""

    def __init__(self, base: nn.Linear, n_experts=1, rank=8, alpha=16.0, dropout=0.0):
        super().__init__()
        self.base, self.rank, self.alpha, self.scale = base, rank, alpha, alpha / rank
        self.lora_dropout = LoRADropout(dropout)
        # One parameter pair per expert, so an expert can be frozen, added or removed on its own.
        self.lora_A = nn.ParameterList()  # each (r, in)
        self.lora_B = nn.ParameterList()  # each (out, r)
        for _ in range(n_experts):
            self.add_expert()
        self.route = None  # None | int | (B,) expert ids | (B, T, K) weights: set by the caller per forward
        self.merged = None  # the expert whose update is currently added into base.weight (see merge)

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
        """Adds expert k into the frozen weight (to export a merged model); forward is then the base's."""
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
        y = self.base(x)  # (B, T, out)
        if self.merged is not None:  # the expert is inside base.weight already
            assert isinstance(route, int) and route == self.merged, "a merged layer serves only its merged expert"
            return y
        if route is None:  # no expert: the frozen base alone
            return y
        h = self.lora_dropout(x)
        if isinstance(route, int):  # the whole batch uses expert `route`
            # BEGIN ASSIGNMENT 1: return y + (h @ A_k^T @ B_k^T) * alpha / r for k = route, shape (B, T, out)
            return y + (h @ self.lora_A[route].t() @ self.lora_B[route].t()) * self.scale
            # END ASSIGNMENT 1
        if route.dim() == 1:  # (B,) expert ids: gather each sample's A and B, batched matmuls (Punica's BGMV)
            A, B = torch.stack(list(self.lora_A)), torch.stack(list(self.lora_B))  # (K, r, in), (K, out, r)
            # BEGIN ASSIGNMENT 2: sample b uses expert route[b]: gather A[route], B[route] and apply them with torch.bmm
            z = torch.bmm(h, A[route].transpose(1, 2))  # (B, T, in) @ (B, in, r) -> (B, T, r)
            return y + torch.bmm(z, B[route].transpose(1, 2)) * self.scale  # (B, T, r) @ (B, r, out)
            # END ASSIGNMENT 2
        # (B, T, K) per-token weights w: y + s sum_k w_k (h A_k^T) B_k^T. The K experts side by side are one LoRA of
        # rank K r, [A_1; ...; A_K] and [B_1 ... B_K], whose z has each expert's r columns scaled by the token's w_k:
        # two matmuls, what one rank-K r LoRA costs.
        K, (n, T, _) = len(self.lora_A), h.shape
        z = (h @ torch.cat(list(self.lora_A)).t()).view(n, T, K, self.rank)  # (B, T, K, r)
        z = (z * route.to(z.dtype)[..., None]).view(n, T, K * self.rank)
        return y + (z @ torch.cat(list(self.lora_B), dim=1).t()) * self.scale  # (B, T, K r) @ (K r, out)


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
    """Routes every LoRA layer of a model the same way until told otherwise: a base with one expert loaded
    for good (files.add_expert_file). For one call, use `routed`."""
    for layer in lora_layers(module):
        layer.route = route


def noise_generators(batch):
    """A training batch's rows -> [(real tokens, generator seeded with the row's seed)] for LoRADropout: made
    once per forward, then drawn from by every LoRA layer in turn. () for a batch without seeds."""
    if batch.seed is None:
        return ()
    device = batch.x.device
    return [(n, torch.Generator(device).manual_seed(s)) for n, s in zip(batch.length.tolist(), batch.seed.tolist())]


@contextmanager
def routed(layers, route, noise=()):
    """Sets the route of LoRA layers, and their dropout's noise (see noise_generators), for one call, and
    restores what was there when the call ends, even on an exception."""
    before = [(layer.route, layer.lora_dropout.noise) for layer in layers]
    try:
        for layer in layers:
            layer.route, layer.lora_dropout.noise = route, noise
        yield
    finally:
        for layer, (old_route, old_noise) in zip(layers, before):
            layer.route, layer.lora_dropout.noise = old_route, old_noise


def count_params(model):
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


# ----------------------------------------------------------------------------------------------
# MoA: experts side by side, routers, routing modes.


class RoutedCache(KVCache):
    """A MoA's KV cache: also each block's route per sample, decided at prefill and kept for every new token."""

    route = None  # (L, B) expert ids, set by MoA.forward at prefill


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


def added_by_moa(name):
    """Whether a parameter of a MoA (by its name) is one MoA adds to the base: an expert's A or B, or a router's
    (its linear map, or its per-token layer). These are what a bundle file holds."""
    return "lora_" in name or name.startswith(("routers.", "router_features."))


def router_features(C, hidden, device=None, window=1):
    """What a router reads of each token's hidden state (C,): the state itself (hidden = 0, the paper's linear router),
    or LayerNorm, a linear map to `hidden` units and a GELU (nanoMoA's default in train_router.py); with window W the
    map reads W tokens' LayerNorm-ed states side by side (W C inputs, see `windowed`)."""
    if not hidden:
        return nn.Identity()
    return nn.Sequential(nn.LayerNorm(C, device=device), nn.Linear(C * window, hidden, device=device), nn.GELU())


def windowed(h, mask, window):
    """h (B, T, C) -> (B, T, W C): each token's state, then the states of the W - 1 tokens before it, side by side;
    zeros where mask (B, T) is False (padding, or tokens the router does not read) and before the first token."""
    if mask is not None:
        h = h * mask.unsqueeze(-1).to(h.dtype)
    T = h.size(1)
    return torch.cat([F.pad(h, (0, 0, j, 0))[:, :T] for j in range(window)], dim=-1)


class MoA(nn.Module):
    """A frozen GPT with one LoRA expert per domain beside its linear maps and one router per block.

    Routing modes (`mode`, per forward call):
      label  - each sample uses its domain label's expert (training; or inference with the label given),
               while the routers learn to predict the label (L_cls)
      layer  - each block's router picks its own top-1 expert for the whole sequence
      last   - the last block's router decides, once, from the prompt; that expert then serves every block
      vote   - a majority vote of all routers decides, once, from the prompt
      token  - MoE-LoRA ablation: each token mixes its top_k experts with the router's softmax weights
    With a KV cache, the prompt (prefill) runs with each block routed by its own router, since block
    i's input only exists once blocks < i have run; the decision is then kept for every new token,
    so there is no second pass. `self.routing` tells what the last prefill (or full forward) chose.
    """

    def __init__(
        self,
        gpt: GPT,
        domains,
        rank=8,
        alpha=16.0,
        dropout=0.0,
        targets=TARGETS,
        pooling="mean",
        eta=1.0,
        top_k=1,
        router_input="block",
        temperature=1.0,
        router_hidden=0,
        router_window=1,
    ):
        super().__init__()
        if pooling not in ("mean", "last"):
            raise UserError(f"pooling must be mean or last, got {pooling!r}")
        if router_input not in ROUTER_INPUTS:
            raise UserError(f"router_input must be {' or '.join(ROUTER_INPUTS)}, got {router_input!r}")
        if not isinstance(router_hidden, int) or isinstance(router_hidden, bool) or router_hidden < 0:
            raise UserError(f"router_hidden must be an integer >= 0, got {router_hidden!r}")
        if not isinstance(router_window, int) or isinstance(router_window, bool) or router_window < 1:
            raise UserError(f"router_window must be an integer >= 1, got {router_window!r}")
        if router_window > 1 and not router_hidden:
            raise UserError("router_window > 1 needs per-token features (router_hidden > 0) for the window to feed")
        self.gpt = add_experts(gpt, len(domains), rank, alpha, dropout, targets)
        self.domains, self.pooling, self.eta, self.top_k = list(domains), pooling, eta, top_k
        self.router_input, self.router_hidden, self.router_window = router_input, router_hidden, router_window
        C, K, device = gpt.config.n_embd, len(domains), gpt.lm_head.weight.device
        # what router i reads of each token before pooling: the hidden state itself, or its features (router_hidden)
        L, H = gpt.config.n_layer, router_hidden
        self.router_features = nn.ModuleList([router_features(C, H, device, router_window) for _ in range(L)])
        self.routers = nn.ModuleList([nn.Linear(H or C, K, device=device) for _ in range(L)])
        for r in self.routers:
            nn.init.zeros_(r.weight)  # start undecided: uniform over experts
            nn.init.zeros_(r.bias)
        self.blocks = [lora_layers(block) for block in gpt.transformer.h]  # each block's LoRALinear layers
        self.routing = {}
        self.temperature = temperature  # divides the last router's logits for the confidence it reports: fitted by
        # train_router.py on held-out prompts (evaluate.fit_temperature), kept in the bundle

    @property
    def config(self) -> GPTConfig:
        return self.gpt.config

    generate = GPT.generate  # the same decoding loop: it only calls self.new_cache() and self(idx, pad_mask=, cache=)

    def new_cache(self):
        return RoutedCache(self.config.n_layer)

    def forward(
        self, idx, targets=None, pad_mask=None, cache=None, domain=None, mode="label", router_mask=None, noise=()
    ):
        """Returns (logits, loss); loss = L_LM + eta * L_cls when targets and domain labels are given.

        domain (B,): each sample's domain label (needed in label mode). router_mask (B, T) bool: the
        tokens the routers read (default: pad_mask, every real token); training passes each record's
        prompt, which is all that exists when a request arrives. noise: a training batch's LoRA dropout
        generators (noise_generators).
        """
        if mode not in MODES:
            raise UserError(f"unknown routing mode {mode!r}; choose from {', '.join(MODES)}")
        if mode == "label" and domain is None:
            raise UserError("routing mode label needs the domain labels")
        if mode == "token" and self.router_window > 1:
            raise UserError("routing per token (mode token) reads one token at a time: use router_window 1")
        if cache is not None and not isinstance(cache, RoutedCache):
            raise TypeError("a MoA decodes with its own cache: moa.new_cache(), a RoutedCache")
        if cache is not None and cache.route is not None:  # decoding: the route was decided at prefill
            return self.decode(idx, pad_mask, cache)
        pooled = mode != "token" or domain is not None  # token mode pools only for L_cls, which needs labels
        base_stream = pooled and self.router_input == "base" and (cache is None or cache.length == 0)
        x, attn_mask = self.gpt.embed(idx, pad_mask, cache)  # (B, T, C)
        mask = pad_mask if router_mask is None else router_mask
        seen = x  # what the routers read: block i's input, or (router_input base) the frozen base's there
        router_logits, routes = [], []  # per block: (B, K), (B,)
        for i in range(len(self.blocks)):
            if pooled:
                read = self.features(i, seen, mask)  # (B, T, C), or (B, T, router_hidden)
                logits, route = self.route_block(i, read, mask, domain, "layer" if mode == "token" else mode)
                router_logits.append(logits)
                routes.append(route)
            if mode == "token":  # the per-token mixture routes; the pooled logits above only feed L_cls
                route = self.token_mixture(i, x)  # (B, T, K)
            if base_stream and i + 1 < len(self.blocks):
                seen = self.base_block(i, seen, attn_mask)
            x = self.run_block(i, x, route, attn_mask, cache, noise)
            seen = seen if base_stream else x
        logits, lm_loss = self.gpt.head(x, targets)
        self.routing = {}  # token mode: no one choice
        if not pooled:
            return logits, lm_loss
        router_logits, routes = torch.stack(router_logits), torch.stack(routes)  # (L, B, K), (L, B)
        if mode != "token":
            self.routing = self.summary(router_logits, routes, mode)
        if cache is not None and mode != "token":
            # BEGIN ASSIGNMENT 4: cache.route (L, B): last/vote: the decision in every layer; else each layer's own
            fixed = mode in ("last", "vote")
            cache.route = self.routing["decision"].expand_as(routes) if fixed else routes  # kept for every new token
            # END ASSIGNMENT 4
        if domain is None:
            return logits, lm_loss
        # BEGIN ASSIGNMENT 3: L_cls = mean over layers of the routers' CE vs the label; add eta * L_cls
        cls_loss = F.cross_entropy(router_logits.float().flatten(0, 1), domain.repeat(len(self.routers)))
        self.routing["cls_loss"] = cls_loss.detach()
        loss = lm_loss + self.eta * cls_loss if targets is not None else lm_loss
        # END ASSIGNMENT 3
        return logits, loss

    def features(self, i, x, mask):
        """What router i reads of each token of x (B, T, C): router_features[i], over a window of tokens if set."""
        f = self.router_features[i]
        if self.router_window == 1:
            return f(x)
        return f[2](f[1](windowed(f[0](x), mask, self.router_window)))

    def route_block(self, i, x, mask, domain, mode):
        """Router i on what it reads of block i's input, x (B, T, C) (or its features, (B, T, router_hidden)),
        pooled over mask -> its logits (B, K) and the route (B,): the domain label in label mode, else the
        router's own top-1."""
        # BEGIN ASSIGNMENT 3: router i's logits on the pooled block input; the route: the label, or the top-1
        logits = self.routers[i](pool(x, mask, self.pooling))
        return logits, domain if mode == "label" else logits.argmax(-1)
        # END ASSIGNMENT 3

    def token_mixture(self, i, x):
        """MoE-LoRA: each token's top_k experts by router i's softmax, renormalised -> (B, T, K) weights."""
        probs = F.softmax(self.routers[i](self.router_features[i](x)).float(), dim=-1)  # (B, T, K)
        top, ids = probs.topk(self.top_k, dim=-1)
        return torch.zeros_like(probs).scatter(-1, ids, top / top.sum(-1, keepdim=True))

    @torch.no_grad()
    def base_block(self, i, x, attn_mask):
        """Block i of the frozen base alone (no expert, no cache): what router i + 1 reads with router_input base.
        Nothing flows back through it: L_cls then trains the routers only."""
        return self.run_block(i, x, None, attn_mask, None)

    def run_block(self, i, x, route, attn_mask, cache, noise=()):
        """Block i with its LoRA layers routed by `route` (and their dropout drawing from noise), for this call."""
        with routed(self.blocks[i], route, noise):
            return self.gpt.transformer.h[i](x, attn_mask, cache, i)

    def decode(self, idx, pad_mask, cache):
        """One decoding step: block i uses the route that prefill kept in cache.route[i]; no router runs."""
        x, attn_mask = self.gpt.embed(idx, pad_mask, cache)
        for i in range(len(self.blocks)):
            # BEGIN ASSIGNMENT 4: block i's route while decoding: the one prefill stored for it
            route = cache.route[i]  # (B,)
            # END ASSIGNMENT 4
            x = self.run_block(i, x, route, attn_mask, cache)
        return self.gpt.head(x)

    def summary(self, router_logits, routes, mode):
        """What the routers chose in this forward: each one's logits and top-1 (L, B), the routes used, the one
        decision per sample that modes last and vote keep, and the last router's confidence in its choice (its
        softmax at self.temperature, which train_router.py fits on prompts phrased unlike any it trained on)."""
        probs = F.softmax(router_logits.float(), dim=-1)  # (L, B, K)
        predicted = router_logits.argmax(-1)  # (L, B): each router's own choice, whatever routed this pass
        decision = predicted[-1] if mode == "last" else vote(predicted, probs) if mode == "vote" else routes[-1]  # (B,)
        confidence = F.softmax(router_logits[-1].float() / self.temperature, dim=-1)  # (B, K)
        return {
            "logits": router_logits.detach(),
            "predicted": predicted,
            "routes": routes,
            "decision": decision,
            "confidence": confidence.gather(1, decision[:, None]).squeeze(1),
        }

    # ------------------------------------------------------------------------------------------
    # Changing the set of domains. Old experts, old router rows and the routers' features are never touched.

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
