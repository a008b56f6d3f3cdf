"""The GPT: a GPT-2-architecture decoder-only transformer, and nothing else.

Token + learned position embeddings, pre-LayerNorm blocks (causal self-attention, GELU MLP), a final
LayerNorm and an output head tied to the token embedding. The four linear maps of a block have fixed
names, the same as GPT-2's checkpoints, because moa.py puts LoRA experts beside them:
    attn.c_attn (fused q, k, v), attn.c_proj, mlp.c_fc, mlp.c_proj.

Two things beyond nanoGPT, both needed by MoA:
- `pad_mask` (B, T): left-padded prompts of different lengths run in one batch; padding tokens are
  never attended to, and positions count real tokens only.
- `forward` is three steps that moa.py reuses with a router before each block: `embed` (tokens and
  positions -> the first block's input, and the attention mask), the blocks, `head` (logits, loss).
`generate` decodes with a KV cache (`KVCache`): greedy decoding gives exactly the tokens that
recomputing the whole context gives.

Read next: moa.py (the method: LoRA experts and routers).
"""

import copy
import math
import re
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    block_size: int = 256  # longest context
    vocab_size: int = 257  # 256 bytes + <|endoftext|>; 50257 for GPT-2's BPE
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2 has


class KVCache:
    """Keys and values of the tokens seen so far, per layer, and where padding was.

    Each layer's keys and values live in a buffer (B, n_head, capacity, head_dim) that doubles when full,
    so a new token costs one small write, not a copy of everything seen (as torch.cat would).
    """

    def __init__(self, n_layer):
        self.k = [None] * n_layer  # buffers, each (B, n_head, capacity, head_dim), filled up to seen[layer]
        self.v = [None] * n_layer
        self.seen = [0] * n_layer
        self.key_mask = None  # (B, T_seen) bool, False at padding
        self.n_real = None  # (B,) real tokens seen per sample, the next token's position (None: no padding yet)

    @property
    def length(self):
        return self.seen[0]

    def copy(self):
        """Another cache holding the same tokens in buffers of its own (a subclass's routes shared, as they are
        only ever replaced): two continuations of one prefill, e.g. a reference response and a greedy answer."""
        other = copy.copy(self)
        other.k = [None if t is None else t.clone() for t in self.k]
        other.v = [None if t is None else t.clone() for t in self.v]
        other.seen = list(self.seen)
        return other

    def append(self, layer, k, v):
        """Stores one layer's new keys and values (B, n_head, T, head_dim); returns all so far (views)."""
        n, T = self.seen[layer], k.size(2)
        if self.k[layer] is None or n + T > self.k[layer].size(2):
            capacity = max(2 * n, n + T, 64)
            for store, new in ((self.k, k), (self.v, v)):
                buffer = new.new_empty(*new.shape[:2], capacity, new.size(3))
                if n:
                    buffer[:, :, :n] = store[layer][:, :, :n]
                store[layer] = buffer
        self.k[layer][:, :, n : n + T] = k
        self.v[layer][:, :, n : n + T] = v
        self.seen[layer] = n + T
        return self.k[layer][:, :, : n + T], self.v[layer][:, :, : n + T]


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v fused
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.dropout = config.n_head, config.dropout

    def forward(self, x, attn_mask=None, cache=None, layer=0):
        B, T, C = x.size()
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, T, hd)
        if cache is not None:
            k, v = cache.append(layer, k, v)  # (B, nh, T_seen + T, hd)
        dropout = self.dropout if self.training else 0.0
        if attn_mask is None:  # no padding: plain causal attention (a single new token sees everything)
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=T > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))  # GPT-2's GELU


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask=None, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), attn_mask, cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied embeddings
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by 1/sqrt(2 * n_layer)
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def new_cache(self):
        """An empty KV cache for one generation (a MoA's holds its routes too: moa.RoutedCache)."""
        return KVCache(self.config.n_layer)

    def num_params(self):
        """Parameters counted once (the tied head shares the embedding)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None, pad_mask=None, cache=None):
        """idx (B, T) token ids -> logits (B, T, vocab), and the mean loss if targets (B, T) are given.

        targets == -1 are ignored. pad_mask (B, T) is False at left padding. With a cache, idx holds
        only the new tokens; keys and values of earlier ones come from the cache.
        """
        x, attn_mask = self.embed(idx, pad_mask, cache)  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, attn_mask, cache, i)
        return self.head(x, targets)

    def embed(self, idx, pad_mask=None, cache=None):
        """idx (B, T) -> the first block's input x (B, T, C), and the attention mask the blocks use
        (None when plain causal attention will do: no padding anywhere)."""
        B, T = idx.size()
        past = 0 if cache is None else cache.length
        assert past + T <= self.config.block_size, f"context {past + T} > block_size {self.config.block_size}"
        attn_mask = None
        if pad_mask is None and (cache is None or cache.key_mask is None):
            pos = torch.arange(past, past + T, device=idx.device)  # (T,): the same for every sample
        else:
            if pad_mask is None:
                pad_mask = torch.ones(B, T, dtype=torch.bool, device=idx.device)
            seen = 0 if cache is None else past if cache.n_real is None else cache.n_real[:, None]
            pos = (seen + pad_mask.long().cumsum(1) - 1).clamp(min=0)  # padding doesn't advance position
            key_mask = pad_mask if cache is None or cache.key_mask is None else torch.cat([cache.key_mask, pad_mask], 1)
            causal = torch.ones(T, past + T, dtype=torch.bool, device=idx.device).tril(diagonal=past)
            self_only = torch.eye(T, past + T, dtype=torch.bool, device=idx.device).roll(past, 1)
            # a padding query sees itself only, so its softmax row is never empty (its output is unused)
            attn_mask = ((causal & key_mask[:, None, :]) | self_only)[:, None]  # (B, 1, T, T_seen + T)
            if cache is not None:
                cache.key_mask, cache.n_real = key_mask, pos[:, -1] + 1
        return self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos)), attn_mask

    def head(self, x, targets=None):
        """The last block's output x (B, T, C) -> logits (B, T, vocab), and the mean loss over targets != -1."""
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @torch.inference_mode()  # no_grad, and no view or version-counter tracking: less work in every small op
    def generate(
        self,
        idx,
        max_new_tokens,
        temperature=1.0,
        top_k=None,
        top_p=None,
        pad_mask=None,
        use_cache=True,
        stop_token=None,
        generator=None,
        prefilled=None,
        **forward_kwargs,
    ):
        """Continues idx (B, T) by max_new_tokens tokens; temperature 0 is greedy decoding.

        With use_cache the prompt runs once (prefill) and each step feeds one token. Without it every
        step recomputes the whole (cropped) context, as nanoGPT does; both give the same greedy tokens.
        Works for any module whose forward takes (idx, pad_mask=, cache=): moa.py reuses it as is.
        stop_token ends a sample early: once emitted, that sample only repeats it. The result is an
        inference tensor: read it as it is, or `.clone()` it to modify it or train on it.
        prefilled: (cache, logits (B, V)) when the caller has already run idx through a fresh cache (the same
        pad_mask and kwargs): decoding starts from there, the prompt not run again (evaluate.py scores a
        response and a greedy answer from one prefill).
        """
        config = self.config
        if use_cache:
            assert idx.size(1) + max_new_tokens <= config.block_size, "prompt + new tokens exceed block_size"
        B = idx.size(0)
        assert use_cache or prefilled is None, "a prefilled cache decodes with the cache"
        cache, last = prefilled if prefilled is not None else (self.new_cache() if use_cache else None, None)
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        step_in, step_mask = idx, pad_mask
        for step in range(max_new_tokens):
            if not use_cache:  # recompute everything, cropping the context to block_size
                step_in = idx[:, -config.block_size :]
                step_mask = None if pad_mask is None else pad_mask[:, -config.block_size :]
            if step > 0 or prefilled is None:
                last = self(step_in, pad_mask=step_mask, cache=cache, **forward_kwargs)[0][:, -1, :]  # (B, V)
            next_id = sample_next(last.float(), temperature, top_k, top_p, generator)  # (B, 1)
            if stop_token is not None:
                next_id = torch.where(done[:, None], torch.full_like(next_id, stop_token), next_id)
                done |= next_id[:, 0] == stop_token
            idx = torch.cat([idx, next_id], dim=1)
            if pad_mask is not None:
                pad_mask = torch.cat([pad_mask, torch.ones_like(next_id, dtype=torch.bool)], dim=1)
            step_in, step_mask = next_id, None if pad_mask is None else pad_mask[:, -1:]
            if stop_token is not None and done.all():
                break
        return idx


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits (B, vocab) -> next token ids (B, 1): greedy at temperature 0, else top-k / nucleus sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = F.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs >= top_p  # keep the smallest prefix whose mass reaches top_p,
        drop[:, 0] = False  # and always the most likely token (top_p = 0 is greedy)
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)


def checked_config(values, tensors):
    """GPTConfig(**values) for values read from a file (a checkpoint's config, GPT-2's config.json), checked
    before any model is built from them: every field there and of its type, heads that divide the width, one
    block per block of the tensors, and no more parameters than the tensors hold: a file cannot make us allocate
    more than it holds. A ValueError says what is wrong (the caller names the file)."""
    names = [f.name for f in fields(GPTConfig)]
    if not isinstance(values, dict) or sorted(values) != sorted(names):
        raise ValueError(f"its model config must have exactly the keys {', '.join(names)}")
    for key in names:
        value = values[key]
        if key == "dropout":
            ok, what = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1, "in [0, 1)"
        elif key == "bias":
            ok, what = isinstance(value, bool), "a bool"
        else:
            ok, what = isinstance(value, int) and not isinstance(value, bool) and value >= 1, "an integer >= 1"
        if not ok:
            raise ValueError(f"{key} must be {what}, got {value!r}")
    if values["n_embd"] % values["n_head"]:
        raise ValueError(f"n_embd={values['n_embd']} is not a multiple of n_head={values['n_head']}")
    blocks = {int(m[1]) for m in (re.match(r"(?:transformer\.)?h\.(\d+)\.", name) for name in tensors) if m}
    if len(blocks) != values["n_layer"] or max(blocks, default=-1) != values["n_layer"] - 1:  # blocks 0..n_layer-1
        raise ValueError(f"its config says {values['n_layer']} blocks, its weights hold {len(blocks)}")
    config = GPTConfig(**values)
    with torch.device("meta"):  # shapes only: nothing is allocated
        wanted = GPT(config).num_params()
    held = sum(t.numel() for t in tensors.values())
    if wanted > held:
        raise ValueError(f"its config needs {wanted:,} parameters, its weights hold {held:,}")
    return config
