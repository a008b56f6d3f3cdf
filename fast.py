"""The speed paths of moa.py: the same numbers, computed faster. Read moa.py first.

`enable(model)` switches them on: every LoRALinear in `model` becomes a FastLoRALinear and a MoA a
FastMoA. They are the same modules with the same parameters and names; only how forward computes
changes (PyTorch modules keep their state when their class is swapped). Every script does this
when `--fast` is on, the default; `--fast=False` runs the plain method. tests/test_fast.py checks
both on the same inputs for every kind of route, with and without gradients, under autocast.

What is faster, and why (bench.py measures each, fast against plain):
- One expert in training (stage 1): `LoRAFunction`, the backward written out by hand. Left to
  autograd, the LoRA sum costs four thin matmuls over every token plus the sum of x's two
  gradients: more than the frozen weight's skipped gradient saves.
- One expert, or a mixed batch through the gather, without a merged copy: the update is added into
  the base's fresh output in place, inside the second matmul (no extra pass over a (B, T, out) tensor).
- A mixed batch at inference with the labels given (mode label, no gradient): `FastMoA.forward`
  sorts the batch by domain, so each expert's samples are one run of rows; `forward_runs` computes a
  run as one matmul with that expert's merged weight W + s B_k A_k (Punica's SGMV, segment by
  segment), written straight into its rows of the output; the results go back in the caller's order.
- Decoding: once prefill has decided, a block whose samples all use one expert (always, at batch 1)
  runs with that expert merged into a copy of its weights, made once per generation (the paper's
  "expert selection at inference"): each new token costs what it costs the base.
Anything else (LoRA dropout while training, per-token mixtures, a merged layer) takes the plain path.

Read next: train_lora.py.
"""

import torch
import torch.nn.functional as F

from moa import LoRALinear, MoA, RoutedCache


class LoRAFunction(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T for one expert, with its backward written out by hand.

    With the merged weight W' = W + s B A (out x in, cheap next to N tokens x in x out):
        forward   y = x W'^T + b                         z = x A^T  (N, r), kept for B's gradient
        backward  dx = dy W'    dA = s (dy B)^T x    dB = s dy^T z
    one full matmul per pass as in the base, with no weight gradient for the frozen W, and three thin ones.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scale):
        x2d = x.reshape(-1, x.size(-1))  # (N, in)
        # BEGIN ASSIGNMENT 6: y (N, out) with the merged weight W + s B A; z = x A^T (N, r); save what backward needs
        y = F.linear(x2d, torch.addmm(weight, B, A, alpha=scale), bias)
        z = x2d @ A.t()
        ctx.save_for_backward(x2d, z, weight, A, B)
        ctx.scale = scale
        # END ASSIGNMENT 6
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad_y):
        g = grad_y.reshape(-1, grad_y.size(-1))  # (N, out)
        # under autocast the forward ran in bfloat16/float16 but the backward does not: use y's dtype here too
        x2d, z, weight, A, B = (t.to(g.dtype) for t in ctx.saved_tensors)
        s, need = ctx.scale, ctx.needs_input_grad
        # BEGIN ASSIGNMENT 6: the gradients of x (as x's shape), W and b (only if they train), A and B
        gB = F.linear(g, B.t().contiguous())  # g @ B, (N, r): the CPU BLAS runs thin matmuls faster in this layout
        dx = (g @ torch.addmm(weight, B, A, alpha=s)).view(*grad_y.shape[:-1], -1) if need[0] else None
        dW = g.t() @ x2d if need[1] else None  # the base is frozen in nanoMoA: normally skipped
        db = g.sum(0) if need[2] else None
        dA = (gB.t() @ x2d) * s  # (r, in)
        dB = (z.t() @ g).t() * s  # (out, r), as (r, out) for the same reason
        # END ASSIGNMENT 6
        return dx, dW, db, dA, dB, None


class FastLoRALinear(LoRALinear):
    """LoRALinear with the speed paths; anything they do not cover goes to LoRALinear.forward."""

    min_run_rows = 256  # forward_runs pays from about this many rows per run (2 CPU cores); below, the gather
    merged_weight = None  # set by FastMoA.decode for one step: W + s B_k A_k of the one expert every sample uses

    def forward(self, x):  # x (B, T, in)
        route = self.route
        if self.merged_weight is not None:  # decoding with the expert merged: the base's cost
            return F.linear(x, self.merged_weight, self.base.bias)
        if (
            route is None
            or self.merged is not None
            or (self.training and self.lora_dropout.p > 0)
            or (torch.is_tensor(route) and route.dim() == 3)
        ):
            return super().forward(x)
        if isinstance(route, int) and torch.is_grad_enabled():  # training one expert
            return LoRAFunction.apply(
                x, self.base.weight, self.base.bias, self.lora_A[route], self.lora_B[route], self.scale
            )
        if torch.is_tensor(route) and not torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type):
            experts, counts = (t.tolist() for t in torch.unique_consecutive(route, return_counts=True))
            if len(experts) == 1:  # every sample uses one expert (a single request, say): the one-expert path
                route = experts[0]
            else:
                y = self.forward_runs(x, experts, counts)
                if y is not None:
                    return y
        y = self.base(x)  # (B, T, out), fresh: nothing saved it, so the update may go into it in place
        # In-place ops escape autocast, hence B in y's dtype (bfloat16 under autocast, like z).
        if isinstance(route, int):
            z = x @ self.lora_A[route].t()  # (B, T, r)
            y2d, z2d = y.view(-1, y.size(-1)), z.view(-1, self.rank)  # (B*T, out), (B*T, r)
            return y2d.addmm_(z2d, self.lora_B[route].t().to(y.dtype), alpha=self.scale).view_as(y)
        A, B = torch.stack(list(self.lora_A)), torch.stack(list(self.lora_B))  # (K, r, in), (K, out, r)
        z = torch.bmm(x, A[route].transpose(1, 2))  # (B, T, r)
        return y.baddbmm_(z, B[route].transpose(1, 2).to(y.dtype), alpha=self.scale)  # y += z @ B^T * scale

    def forward_runs(self, x, experts, counts):
        """Inference on a batch sorted by expert, runs of counts[j] consecutive samples using experts[j], as
        one full matmul per run with that expert's merged weight W + s B_k A_k, written straight into the
        run's rows of the output. Merging costs K (out x in x r), nothing next to the rows; the gather costs
        thin matmuls and a second pass over the output. None when the runs are too short to pay."""
        T = x.size(1)
        if x.size(0) * T < self.min_run_rows * len(experts):
            return None
        W, bias = self.base.weight, self.base.bias
        # BEGIN ASSIGNMENT 6: each run of samples (experts[j], counts[j] samples) as one matmul with its merged weight
        merged = {
            k: torch.addmm(W, self.lora_B[k], self.lora_A[k], alpha=self.scale).t()  # (in, out)
            for k in set(experts)
        }
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
        # END ASSIGNMENT 6
        return y.view(*x.shape[:-1], -1)


class MergedCache(RoutedCache):
    """FastMoA's KV cache: also, per block, the weights with the one expert of every sample merged in."""

    merged = None  # per block: [(layer.__dict__, merged weight)], or None where samples use different experts


class FastMoA(MoA):
    """MoA with the speed paths: sorted mixed batches at inference, merged experts while decoding."""

    def forward(
        self, idx, targets=None, pad_mask=None, cache=None, domain=None, mode="label", router_mask=None, noise=()
    ):
        sortable = mode == "label" and cache is None and domain is not None and not torch.is_grad_enabled()
        if not sortable or not bool((domain[1:] < domain[:-1]).any()):  # nothing to sort
            return super().forward(idx, targets, pad_mask, cache, domain, mode, router_mask, noise)
        order = domain.argsort(stable=True)  # each expert's samples side by side: one run of rows each
        idx, targets, pad_mask, router_mask = (
            None if t is None else t[order] for t in (idx, targets, pad_mask, router_mask)
        )
        logits, loss = super().forward(idx, targets, pad_mask, None, domain[order], mode, router_mask)
        inverse = order.argsort()  # back to the caller's order: batch is dim 0, or dim 1 behind the layers
        self.routing = {
            k: v if v.dim() == 0 else v[inverse] if v.dim() == 1 else v[:, inverse] for k, v in self.routing.items()
        }
        return logits[inverse], loss

    def new_cache(self):
        return MergedCache(self.config.n_layer)

    def decode(self, idx, pad_mask, cache):
        if not isinstance(cache, MergedCache):  # a cache made before the speed paths were switched on
            return super().decode(idx, pad_mask, cache)
        if cache.merged is None:  # the first decoding step: merge each block's one expert, once per generation
            cache.merged = []
            for i, route in enumerate(cache.route):
                weights = self.merged_weights(i, route)
                cache.merged.append(
                    None if weights is None else [(layer.__dict__, w) for layer, w in zip(self.blocks[i], weights)]
                )
        x, attn_mask = self.gpt.embed(idx, pad_mask, cache)
        for i, (block, merged) in enumerate(zip(self.gpt.transformer.h, cache.merged)):
            if merged is None:  # samples of this block use different experts: the gather
                x = self.run_block(i, x, cache.route[i], attn_mask, cache)
                continue
            # merged: (layer.__dict__, weight) pairs. A plain attribute goes straight into __dict__, without
            # nn.Module.__setattr__'s checks (16% of a decoding step).
            for attributes, w in merged:
                attributes["merged_weight"] = w
            x = block(x, attn_mask, cache, i)
            for attributes, _ in merged:
                attributes["merged_weight"] = None
        return self.gpt.head(x)

    def merged_weights(self, i, route):
        """Block i's weights W + s B_k A_k, one per LoRA layer, if every sample uses expert k there; else None."""
        experts = route.unique().tolist()
        if len(experts) > 1:
            return None
        # BEGIN ASSIGNMENT 6: the merged weight of each LoRA layer of block i for its one expert k
        k = experts[0]
        return [
            torch.addmm(layer.base.weight, layer.lora_B[k], layer.lora_A[k], alpha=layer.scale)
            for layer in self.blocks[i]
        ]
        # END ASSIGNMENT 6


SWAPS = {LoRALinear: FastLoRALinear, MoA: FastMoA}


def enable(model, on=True):
    """Switches the speed paths on (or, with on=False, off) for every LoRALinear and MoA in `model`, in place."""
    for module in model.modules():
        for plain, fast in SWAPS.items():
            if type(module) in (plain, fast):
                module.__class__ = fast if on else plain
    return model
