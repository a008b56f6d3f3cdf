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

import math
import os
from dataclasses import dataclass

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
    """Keys and values of the tokens seen so far, per layer, plus what decoding needs to go on.

    Each layer's keys and values live in a buffer (B, n_head, capacity, head_dim) that doubles when full,
    so a new token costs one small write, not a copy of everything seen (as torch.cat would).
    """

    def __init__(self, n_layer):
        self.k = [None] * n_layer  # buffers, each (B, n_head, capacity, head_dim), filled up to seen[layer]
        self.v = [None] * n_layer
        self.seen = [0] * n_layer
        self.key_mask = None  # (B, T_seen) bool, False at padding
        self.n_real = None  # (B,) real tokens seen per sample, the next token's position (None: no padding yet)
        self.route = None  # (L, B) moa.py: each block's expert per sample, decided at prefill
        self.merged = None  # fast.py: per block, weights with the one expert of every sample merged in

    @property
    def length(self):
        return self.seen[0]

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
        **forward_kwargs,
    ):
        """Continues idx (B, T) by max_new_tokens tokens; temperature 0 is greedy decoding.

        With use_cache the prompt runs once (prefill) and each step feeds one token. Without it every
        step recomputes the whole (cropped) context, as nanoGPT does; both give the same greedy tokens.
        Works for any module whose forward takes (idx, pad_mask=, cache=): moa.py reuses it as is.
        stop_token ends a sample early: once emitted, that sample only repeats it. The result is an
        inference tensor: read it as it is, or `.clone()` it to modify it or train on it.
        """
        config = self.config
        if use_cache:
            assert idx.size(1) + max_new_tokens <= config.block_size, "prompt + new tokens exceed block_size"
        B = idx.size(0)
        cache = KVCache(config.n_layer) if use_cache else None
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        step_in, step_mask = idx, pad_mask
        for _ in range(max_new_tokens):
            if not use_cache:  # recompute everything, cropping the context to block_size
                step_in = idx[:, -config.block_size :]
                step_mask = None if pad_mask is None else pad_mask[:, -config.block_size :]
            logits, _ = self(step_in, pad_mask=step_mask, cache=cache, **forward_kwargs)
            next_id = sample_next(logits[:, -1, :].float(), temperature, top_k, top_p, generator)  # (B, 1)
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

    @classmethod
    def from_pretrained(cls, name_or_path, dropout=0.0):
        """OpenAI's GPT-2 weights, from a local folder (config.json + model.safetensors or
        pytorch_model.bin) or, when online, from the Hugging Face hub (gpt2, gpt2-medium, -large, -xl)."""
        folder = name_or_path if os.path.isdir(name_or_path) else download_gpt2(name_or_path)
        from files import check_weights, gpt_config, read_hf_weights, read_json  # files.py imports this file

        hf = read_json(os.path.join(folder, "config.json"))
        sizes = {
            "block_size": hf.get("n_positions"),
            "vocab_size": hf.get("vocab_size"),
            "n_layer": hf.get("n_layer"),
            "n_head": hf.get("n_head"),
            "n_embd": hf.get("n_embd"),
            "dropout": dropout,
            "bias": True,
        }
        state = read_hf_weights(folder)
        model = cls(gpt_config(sizes, state, os.path.join(folder, "config.json")))  # sizes checked against the weights
        ours = model.state_dict()
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        for key in ours:
            if key == "lm_head.weight":
                continue  # tied to wte
            src = state.get(key, state.get(key[len("transformer.") :]))  # some files drop the prefix
            if src is None:
                raise ValueError(f"{folder}: weight {key} missing: not a GPT-2 checkpoint")
            if key.endswith(conv1d):
                src = src.t()  # GPT-2 stores these as Conv1D: (in, out), nn.Linear wants (out, in)
            if src.shape != ours[key].shape:
                raise ValueError(f"{folder}: {key} has shape {tuple(src.shape)}, expected {tuple(ours[key].shape)}")
            check_weights({key: src}, folder)  # copy_ would cast integers silently
            with torch.no_grad():
                ours[key].copy_(src)
        check_gpt2_names(state, ours, folder)
        return model


def check_gpt2_names(state, ours, folder):
    """A GPT-2 file holds GPT-2's weights and nothing else we would drop unread: besides our names (with or without
    "transformer."), only the attention masks older transformers saved, and an lm_head equal to wte (tied)."""
    known = set(ours) | {k.removeprefix("transformer.") for k in ours}
    for name, t in state.items():
        if name == "lm_head.weight" and not torch.equal(t.to(ours[name].dtype), ours["transformer.wte.weight"]):
            raise ValueError(f"{folder}: its lm_head.weight is not its wte.weight; nanoMoA's GPT ties the two")
        if name not in known and not name.endswith((".attn.bias", ".attn.masked_bias")):
            raise ValueError(f"{folder}: it holds {name}, which is not a GPT-2 weight")


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


GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def download_gpt2(name):
    """Fetches a GPT-2 checkpoint folder from the Hugging Face hub (needs the optional huggingface_hub)."""
    if name not in GPT2_NAMES:
        raise ValueError(f"{name!r} is neither a folder nor one of {', '.join(GPT2_NAMES)}")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(
            f"openai-community/{name}", allow_patterns=["config.json", "model.safetensors", "vocab.json", "merges.txt"]
        )
    except Exception as e:
        raise ValueError(
            f"cannot download {name} ({type(e).__name__}): with network, `pip install huggingface_hub`; "
            f"offline, copy the hub folder (config.json + model.safetensors) here and pass its path"
        ) from None
