"""Two ways to route between the same experts that MoA's routers are measured against (results.py):

- Classifier + LoRAs (the paper's Table 3, with RoBERTa): a separate classifier reads the prompt and
  picks the expert, which then serves the whole request. Here the classifier is a logistic regression
  on the prompt's token and token-pair counts, trained on the tasks' training prompts with their labels.
- Arrow (Ostapenko et al. 2024; PEFT's ArrowConfig): no training and no labels. In every LoRA layer,
  each expert's prototype is the top right singular vector of its update B A (a direction of the
  layer's input space); each token then goes to the top_k experts whose prototypes it is most aligned
  with (|x . prototype|, the sign of a singular vector being arbitrary), mixed by a softmax over those.

Both wrap a MoA whose experts are the stage-1 experts, and look to evaluate.py like any model: they
take (idx, pad_mask=, cache=), generate, and report their choice per prompt in `routing["decision"]`.

Read next: results.py.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from moa import lora_layers
from model import GPT


def count_features(rows, bins):
    """Token lists -> (B, 2 * bins) frequencies of each token and of each pair of neighbours, hashed into bins."""
    f = torch.zeros(len(rows), 2 * bins)
    for b, row in enumerate(rows):
        ids = torch.tensor(row, dtype=torch.long)
        f[b].index_add_(0, ids % bins, torch.ones(len(ids)))
        pairs = (ids[:-1] * 1_000_003 + ids[1:]) % bins + bins
        f[b].index_add_(0, pairs, torch.ones(len(pairs)))
        f[b] /= len(row)
    return f


class PromptClassifier(nn.Module):
    """A logistic regression from a prompt's token and token-pair counts to its task."""

    def __init__(self, n_domains, bins=2048):
        super().__init__()
        self.bins = bins
        self.linear = nn.Linear(2 * bins, n_domains)
        nn.init.zeros_(self.linear.weight)  # a convex problem: from zero, the same classifier in every run (a random
        nn.init.zeros_(self.linear.bias)  # start drew on whatever the process had drawn before: results.py's rows)

    def fit(self, data, n_per_task=2000, steps=300, lr=1e-2):
        """Trains on up to n_per_task training prompts of each task of `data` (a TaskData), full batch."""
        rows, labels = [], []
        for label, name in enumerate(data.domains):
            for i in range(min(n_per_task, data.count(name, "train"))):
                rows.append(data.record(name, "train", i)[0])
                labels.append(label)
        X, y = count_features(rows, self.bins), torch.tensor(labels)
        optimizer = torch.optim.Adam(self.parameters(), lr=lr, weight_decay=1e-5)
        for _ in range(steps):
            loss = F.cross_entropy(self.linear(X), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return self

    @torch.no_grad()
    def forward(self, rows):
        """Token lists -> (B,) predicted task labels."""
        return self.linear(count_features(rows, self.bins)).argmax(-1)


class ClassifierRouted(nn.Module):
    """A MoA's experts, each prompt served by the expert its classifier picks (MoA's label mode with the
    classifier's labels instead of the true ones); the MoA's routers are not used."""

    def __init__(self, moa, classifier):
        super().__init__()
        self.moa, self.classifier, self.domains, self.routing = moa, classifier, moa.domains, {}

    @property
    def config(self):
        return self.moa.config

    def new_cache(self):
        return self.moa.new_cache()

    generate = GPT.generate

    def forward(self, idx, targets=None, pad_mask=None, cache=None, **ignored):
        if cache is None or cache.length == 0:  # a prompt arrives: classify it
            rows = idx.tolist() if pad_mask is None else [r[m].tolist() for r, m in zip(idx, pad_mask)]
            self.labels = self.classifier(rows).to(idx.device)  # (B,)
            self.routing = {"decision": self.labels, "predicted": self.labels[None]}
        return self.moa(idx, targets, pad_mask, cache, domain=self.labels, mode="label")


def prototype(A, B):
    """The top right singular vector of B A (in,), from the small r x in matrix R A where B = Q R."""
    return torch.linalg.svd(torch.linalg.qr(B.float()).R @ A.float(), full_matrices=False).Vh[0]


class Arrow(nn.Module):
    """A MoA's experts, mixed per token and per LoRA layer by Arrow's prototype routing."""

    def __init__(self, moa, top_k=2, temperature=1.0):
        super().__init__()
        self.moa, self.top_k, self.temperature, self.domains, self.routing = moa, top_k, temperature, moa.domains, {}
        for layer in lora_layers(moa):
            with torch.no_grad():
                layer.prototypes = torch.stack([prototype(A, B) for A, B in zip(layer.lora_A, layer.lora_B)])  # (K, in)
            layer.register_forward_pre_hook(self.route)

    @property
    def config(self):
        return self.moa.config

    def new_cache(self):
        return self.moa.gpt.new_cache()

    generate = GPT.generate

    def route(self, layer, args):
        """Before each LoRA layer: every token's top_k experts by |x . prototype|, softmax-mixed -> layer.route."""
        x = args[0]  # (B, T, in)
        score = (x.float() @ layer.prototypes.t()).abs()  # (B, T, K)
        top, ids = score.topk(min(self.top_k, score.size(-1)), dim=-1)
        layer.route = torch.zeros_like(score).scatter(-1, ids, F.softmax(top / self.temperature, dim=-1))
        if self.prompt is not None:  # a prompt: add up each expert's weight over its real tokens
            self.weight_sum += (layer.route * self.prompt[..., None]).sum(1)  # (B, K)

    def forward(self, idx, targets=None, pad_mask=None, cache=None, **ignored):
        prefill = cache is None or cache.length == 0
        self.prompt = None
        if prefill:  # Arrow's choice for a prompt, to compare: the expert with the most weight over its tokens
            self.prompt = torch.ones_like(idx, dtype=torch.float) if pad_mask is None else pad_mask.float()
            self.weight_sum = torch.zeros(idx.size(0), len(self.moa.domains), device=idx.device)
        logits, loss = self.moa.gpt(idx, targets, pad_mask, cache)
        if prefill:
            decision = self.weight_sum.argmax(-1)
            self.routing = {"decision": decision, "predicted": decision[None]}
        self.prompt = None
        return logits, loss
