"""Sampling and decoding (model.py): sample_next on fixed logits with a seeded generator, GPT.generate's seed,
top-k and stop token, greedy decoding against a plain loop of full forward passes, and the KV cache across its
buffer growth (64, 128, 256 positions) up to the full context; sample.py's --seed."""

import pytest
import torch

import sample
from model import GPT, GPTConfig, KVCache, sample_next

DRAWS = 4000


def draws(logits, seed=0, **kwargs):
    """DRAWS tokens sampled from the same logits (V,) with a seeded generator -> (DRAWS,) token ids."""
    batch = logits.expand(DRAWS, -1)
    return sample_next(batch, generator=torch.Generator().manual_seed(seed), **kwargs)[:, 0]


def tiny_gpt(seed=0, block_size=64, vocab_size=50):
    """A random GPT with weights larger than GPT-2's init, so that its tokens vary and depend on the whole context."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def left_padded(rows, pad_id=0):
    """Token lists -> idx (B, T_max) padded on the left, pad_mask (B, T_max)."""
    T = max(len(r) for r in rows)
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        idx[i, T - len(r) :] = torch.tensor(r)
        mask[i, T - len(r) :] = True
    return idx, mask


# ----------------------------------------------------------------------------------------------
# sample_next on fixed logits

LOGITS = torch.tensor([0.3, 2.0, -1.0, 1.9, 0.0, 1.8, 0.5, -0.5, 1.0, 0.2])  # best ids: 1, 3, 5, then 8
PROBS = torch.tensor([0.1, 0.4, 0.2, 0.3])  # by id; sorted: id 1 (0.4), id 3 (0.3), id 2 (0.2), id 0 (0.1)


def test_temperature_zero_is_argmax():
    """At temperature 0 the token is the argmax of each row, whatever top_k and top_p say, and no RNG is used."""
    logits = torch.randn(6, 30, generator=torch.Generator().manual_seed(0))
    for kwargs in ({}, {"top_k": 3}, {"top_p": 0.5}):
        assert torch.equal(sample_next(logits, 0, **kwargs), logits.argmax(-1, keepdim=True))


@pytest.mark.parametrize("k, expected", [(1, {1}), (3, {1, 3, 5}), (4, {1, 3, 5, 8}), (50, set(range(10)))])
def test_top_k_draws_exactly_the_k_best(k, expected):
    """top_k = k only ever returns one of the k highest-logit ids, and over many draws returns each of them
    (k beyond the vocabulary keeps every id)."""
    assert set(draws(LOGITS, top_k=k).tolist()) == expected


@pytest.mark.parametrize("p, expected", [(0.35, {1}), (0.6, {1, 3}), (0.8, {1, 3, 2}), (0.95, {0, 1, 2, 3})])
def test_top_p_keeps_the_smallest_prefix_reaching_p(p, expected):
    """top_p = p returns exactly the smallest set of most likely ids whose probability reaches p (cumulative
    0.4, 0.7, 0.9, 1.0 here), whatever order the ids come in."""
    assert set(draws(PROBS.log(), top_p=p).tolist()) == expected


def test_top_p_stops_where_the_mass_reaches_p_exactly():
    """Regression: of four equally likely ids (0.25 each, exact in floating point), top_p = 0.25, 0.5, 0.75 keeps
    1, 2, 3: a prefix whose mass equals p reaches it, so the next id is dropped; top_p = 0 keeps the best id only."""
    for p, n in [(0.25, 1), (0.5, 2), (0.75, 3)]:
        assert len(set(draws(torch.zeros(4), top_p=p).tolist())) == n, p
    assert set(draws(LOGITS, top_p=0.0).tolist()) == {1}


def test_top_p_keeps_the_kept_tokens_proportions():
    """Within top-p's kept set, the ids keep their relative probabilities: 0.4 : 0.3 for p = 0.6 (to 0.03)."""
    counts = torch.bincount(draws(PROBS.log(), top_p=0.6), minlength=4).float()
    assert counts[1] / counts.sum() == pytest.approx(0.4 / 0.7, abs=0.03)


def test_filters_see_the_tempered_distribution():
    """top-p reads the distribution after temperature: at temperature 3 the probabilities 0.1, 0.4, 0.2, 0.3
    flatten to about 0.19, 0.30, 0.24, 0.27, so p = 0.6 needs three ids, not two."""
    assert set(draws(PROBS.log(), temperature=3.0, top_p=0.6).tolist()) == {1, 3, 2}
    assert set(draws(PROBS.log(), temperature=1.0, top_p=0.6).tolist()) == {1, 3}


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_divides_the_logits(temperature):
    """Logits (0, 1) at temperature t give token 1 with probability sigmoid(1 / t) (to 0.03 over 4000 draws)."""
    share = draws(torch.tensor([0.0, 1.0]), temperature=temperature).float().mean().item()
    assert share == pytest.approx(torch.sigmoid(torch.tensor(1.0 / temperature)).item(), abs=0.03)


def test_the_generator_alone_decides():
    """The same seed gives the same tokens whatever the global RNG's state; another seed other tokens."""
    torch.manual_seed(0)
    first = draws(LOGITS, seed=7)
    torch.manual_seed(1)
    assert torch.equal(draws(LOGITS, seed=7), first)
    assert not torch.equal(draws(LOGITS, seed=8), first)


# ----------------------------------------------------------------------------------------------
# generate


def test_generate_same_seed_same_tokens():
    """generate with a seeded generator gives the same tokens for the same seed whatever the global RNG does,
    and other tokens for another seed."""
    model = tiny_gpt()
    idx = torch.randint(50, (2, 4), generator=torch.Generator().manual_seed(1))

    def run(seed, global_seed):
        torch.manual_seed(global_seed)
        return model.generate(idx, 30, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(seed))

    first = run(3, 0)
    assert torch.equal(run(3, 1), first)
    assert not torch.equal(run(4, 0), first)


def test_generate_top_k_one_is_greedy():
    """Sampling at temperature 1 with top_k = 1 gives the greedy tokens: generate hands top_k to the sampler."""
    model = tiny_gpt()
    idx = torch.randint(50, (3, 5), generator=torch.Generator().manual_seed(2))
    greedy = model.generate(idx, 20, temperature=0)
    assert torch.equal(model.generate(idx, 20, temperature=1.0, top_k=1, generator=torch.Generator()), greedy)


class Scripted(torch.nn.Module):
    """Stands in for a GPT in generate: at decoding step i, sample b's last logits put all mass on script[b][i]."""

    generate = GPT.generate
    new_cache = GPT.new_cache

    def __init__(self, script, vocab_size=10):
        super().__init__()
        self.config = GPTConfig(block_size=64, vocab_size=vocab_size, n_layer=1)
        self.script, self.steps = torch.tensor(script), 0

    def forward(self, idx, pad_mask=None, cache=None):
        logits = torch.full((idx.size(0), idx.size(1), self.config.vocab_size), -1e4)
        logits[:, -1].scatter_(1, self.script[:, self.steps, None], 0.0)
        self.steps += 1
        return logits, None


def test_stop_token_repeats_and_ends_generation_early():
    """Once a sample emits the stop token it only repeats it, whatever the model says next, and generation ends
    at the step where every sample has stopped, before max_new_tokens."""
    STOP = 9
    model = Scripted([[5, 7, STOP, 4, 6, 1, 2, 3], [1, 2, 3, 4, STOP, 8, 8, 8]])
    out = model.generate(torch.zeros(2, 1, dtype=torch.long), 8, temperature=0, stop_token=STOP)
    assert out[:, 1:].tolist() == [[5, 7, STOP, STOP, STOP], [1, 2, 3, 4, STOP]]
    assert model.steps == 5
    assert Scripted([[5, 7, 4, 6]]).generate(torch.zeros(1, 1, dtype=torch.long), 4, 0, stop_token=STOP).shape == (1, 5)


def test_greedy_generate_equals_a_plain_loop():
    """Greedy generate (KV cache) gives the tokens of the naive loop: run the whole sequence, take the argmax
    of the last position's logits, append, repeat."""
    model = tiny_gpt()
    idx = torch.randint(50, (2, 6), generator=torch.Generator().manual_seed(3))
    expected = idx
    with torch.no_grad():
        for _ in range(25):
            logits, _ = model(expected)
            expected = torch.cat([expected, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(model.generate(idx, 25, temperature=0), expected)


# ----------------------------------------------------------------------------------------------
# The KV cache across buffer growth, up to the full context


def test_kv_cache_append_returns_everything_appended():
    """KVCache.append returns exactly the concatenation of every key and value appended so far, across each
    buffer growth (at 64, 128 and 256 positions) and for appends of any length."""
    cache = KVCache(n_layer=2)
    g = torch.Generator().manual_seed(0)
    keys, values = [], []
    for T in [5] + [1] * 70 + [40, 1, 90, 3]:  # 5 .. 75 one at a time, then past 128 and past 256
        k, v = torch.randn(2, 3, T, 4, generator=g), torch.randn(2, 3, T, 4, generator=g)
        keys.append(k)
        values.append(v)
        for layer in (0, 1):
            all_k, all_v = cache.append(layer, k, v)
            torch.testing.assert_close(all_k, torch.cat(keys, 2), atol=0, rtol=0)
            torch.testing.assert_close(all_v, torch.cat(values, 2), atol=0, rtol=0)
    assert cache.length == 5 + 70 + 40 + 1 + 90 + 3


BLOCK = 150  # the buffer grows at 64 and at 128 positions; decoding runs to the full context


def test_kv_cache_parity_to_the_full_context():
    """Greedy decoding with the KV cache gives exactly the tokens of recomputing the whole context, at batch 1,
    from a 4-token prompt to the full context of 150 tokens, past both buffer growths."""
    model = tiny_gpt(block_size=BLOCK)
    idx = torch.randint(50, (1, 4), generator=torch.Generator().manual_seed(4))
    with_cache = model.generate(idx, BLOCK - 4, temperature=0, use_cache=True)
    without = model.generate(idx, BLOCK - 4, temperature=0, use_cache=False)
    assert with_cache.shape == (1, BLOCK)
    assert len(set(with_cache[0, 64:].tolist())) > 5  # not stuck on one token: a wrong key would show
    assert torch.equal(with_cache, without)


def test_kv_cache_parity_left_padded_to_the_full_context():
    """Left-padded prompts of different lengths decode to the full context with the cache exactly as without it,
    and each continues exactly as the same prompt alone, unpadded."""
    model = tiny_gpt(block_size=BLOCK)
    rows = [[3, 1, 4], [1, 5, 9, 2, 6, 5, 3, 5, 8], [9, 7, 9, 3, 2, 3]]
    idx, mask = left_padded(rows)
    new = BLOCK - idx.size(1)
    with_cache = model.generate(idx, new, temperature=0, pad_mask=mask, use_cache=True)
    without = model.generate(idx, new, temperature=0, pad_mask=mask, use_cache=False)
    assert with_cache.shape == (3, BLOCK)
    assert torch.equal(with_cache, without)
    for i, row in enumerate(rows):
        alone = model.generate(torch.tensor([row]), new, temperature=0)
        assert with_cache[i, idx.size(1) :].tolist() == alone[0, len(row) :].tolist()


# ----------------------------------------------------------------------------------------------
# sample.py


def test_sample_cli_seed_decides_the_text(tiny_base):
    """sample.py with the same --seed prints the same samples whatever the global RNG's state, with another seed
    other ones."""

    def run(seed, global_seed):
        torch.manual_seed(global_seed)
        return sample.main(
            [f"--base={tiny_base}", "--prompt=def ||x = ", "--max_new_tokens=20", "--temperature=1.0", f"--seed={seed}"]
        )

    first = run(1, global_seed=0)
    assert torch.equal(run(1, global_seed=1), first)
    assert not torch.equal(run(2, global_seed=0), first)
