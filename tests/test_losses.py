"""What the README's two tables state, pinned: which loss trains which parameters in each training mode, and
what each routing mode does at prefill and while decoding."""

import pytest
import torch

from conftest import randomize_B
from evaluate import left_pad
from moa import MoA, lora_layers
from model import GPT, GPTConfig

L, K = 3, 3  # blocks, experts


def moa_model(seed=0, **settings):
    """A MoA over a small random GPT: random experts (B too) and random routers (their per-token layers too, with
    router_hidden among `settings`), so every path carries signal."""
    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(block_size=24, vocab_size=40, n_layer=L, n_head=2, n_embd=16))
    moa = MoA(gpt, ["a", "b", "c"], rank=4, **settings)
    randomize_B(moa, seed)
    with torch.no_grad():
        for router in moa.routers:
            router.weight.normal_(0, 1.0)
            router.bias.normal_(0, 0.5)
        for p in moa.router_features.parameters():
            p.normal_(0, 0.5)
    for layer in lora_layers(moa):
        for p in [*layer.lora_A, *layer.lora_B]:
            p.requires_grad_(True)
    return moa


def batch(seed=1, B=6, T=10):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(40, (B, T), generator=g)
    return x, torch.roll(x, -1, 1), torch.arange(B) % K, torch.arange(T)[None, :].expand(B, -1) < 6


def grads(moa, mode, eta):
    """The gradient of every parameter of one training step's loss in `mode` -> {name: grad, or None if zero}."""
    x, y, domain, prompt = batch()
    moa.zero_grad()
    moa.eta = eta
    _, loss = moa(x, y, domain=domain, mode=mode, router_mask=prompt)
    loss.backward()
    return {n: None if p.grad is None or not p.grad.abs().sum() else p.grad.clone() for n, p in moa.named_parameters()}


def cls_of(moa, x, domain):
    """L_cls with its graph: the routers' cross-entropy against the labels, from a forward without targets."""
    router_logits = []
    hook = [r.register_forward_hook(lambda m, i, o: router_logits.append(o)) for r in moa.routers]
    moa(x, domain=domain, mode="label", router_mask=batch()[3])
    for h in hook:
        h.remove()
    logits = torch.stack(router_logits[: len(moa.routers)])  # (L, B, K)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), domain.repeat(len(moa.routers)))


def expert_block(name):
    """The block an expert parameter sits in: 'gpt.transformer.h.2.attn...' -> 2."""
    return int(name.split(".")[3])


def test_label_mode_lm_loss_trains_the_experts_and_never_a_router():
    """MoA's training (mode label, eta 0): L_LM reaches every block's experts and no router."""
    g = grads(moa_model(), "label", eta=0.0)
    assert all(g[n] is None for n in g if n.startswith("routers."))
    assert all(g[n] is not None for n in g if "lora_B" in n)


def test_cls_loss_trains_the_routers_and_the_experts_of_earlier_blocks():
    """L_cls alone (mode label): it reaches every router, and, because router i reads block i's input, the experts
    of blocks 0 .. L-2, never the experts of the last block (no router reads its output)."""
    moa = moa_model()
    x, _, domain, _ = batch()
    moa.zero_grad()
    cls_of(moa, x, domain).backward()
    named = dict(moa.named_parameters())
    assert all(named[f"routers.{i}.weight"].grad.abs().sum() > 0 for i in range(L))
    for name, p in named.items():
        if "lora_B" in name:
            reached = p.grad is not None and p.grad.abs().sum() > 0
            assert reached == (expert_block(name) < L - 1), name


def test_token_mode_lm_loss_reaches_the_routers():
    """MoE-LoRA (mode token, eta 0): L_LM reaches the experts (those in some token's top 2, in every block) and,
    through the per-token mixture weights, every router."""
    g = grads(moa_model(), "token", eta=0.0)
    assert all(g[f"routers.{i}.weight"] is not None for i in range(L))
    assert {expert_block(n) for n in g if "lora_B" in n and g[n] is not None} == set(range(L))


def test_eta_weights_the_cls_loss_in_token_mode_too():
    """In mode token the loss is L_LM + eta L_cls as in every mode (L_cls from the routers' pooled prompt): the
    losses at eta 2 and eta 0 differ by twice the L_cls the forward records (1e-5), which is not 0."""
    moa = moa_model()
    x, y, domain, prompt = batch()
    losses = []
    with torch.no_grad():
        for eta in (0.0, 2.0):
            moa.eta = eta
            losses.append(moa(x, y, domain=domain, mode="token", router_mask=prompt)[1].item())
    cls = moa.routing["cls_loss"].item()
    assert cls > 0.1
    torch.testing.assert_close(losses[1] - losses[0], 2 * cls, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["layer", "last", "vote"])
def test_prefill_routes_each_block_by_its_own_router_and_decoding_keeps_the_decision(mode):
    """At prefill every block is routed by its own router's choice (in modes last and vote too: their one
    decision exists only once the last block has run); decoding then uses, in every block, the route kept in the
    cache: each block's own choice in mode layer, the one decision in modes last and vote; no router runs."""
    moa = moa_model(3).eval()
    g = torch.Generator().manual_seed(5)
    idx, mask = left_pad([torch.randint(40, (n,), generator=g).tolist() for n in (9, 5, 7, 9)], 0)
    cache = moa.new_cache()
    with torch.no_grad():
        moa(idx, pad_mask=mask, cache=cache, mode=mode)
    routing = moa.routing
    assert torch.equal(routing["routes"], routing["predicted"])  # prefill: each block by its own router
    expected = routing["predicted"] if mode == "layer" else routing["decision"].expand(L, -1)
    assert torch.equal(cache.route, expected)
    calls = []
    hooks = [r.register_forward_hook(lambda *a: calls.append(1)) for r in moa.routers]
    with torch.no_grad():
        moa(torch.zeros(4, 1, dtype=torch.long), pad_mask=torch.ones(4, 1, dtype=torch.bool), cache=cache, mode=mode)
    for h in hooks:
        h.remove()
    assert calls == []  # no router runs while decoding
    if mode != "layer":
        assert bool((routing["decision"] != routing["predicted"]).any())  # the case is not trivial


def test_token_mode_calls_each_router_once_per_block_and_token_and_runs_no_frozen_copy():
    """Mode token at inference: each block's router runs once per forward (its per-token mixture), in prefill and
    in every decoding step; nothing else runs for it: no pooled router (only L_cls needs it), no frozen base block
    for routers that read the base. A forward with labels still pools (L_cls)."""
    moa = moa_model(3).eval()
    moa.router_input = "base"
    g = torch.Generator().manual_seed(6)
    idx, mask = left_pad([torch.randint(40, (n,), generator=g).tolist() for n in (9, 5)], 0)
    calls, frozen = [], []
    hooks = [r.register_forward_hook(lambda *a: calls.append(1)) for r in moa.routers]
    real = moa.base_block
    moa.base_block = lambda *a: frozen.append(1) or real(*a)
    cache = moa.new_cache()
    with torch.no_grad():
        moa(idx, pad_mask=mask, cache=cache, mode="token")
        assert len(calls) == L and frozen == []
        moa(torch.zeros(2, 1, dtype=torch.long), pad_mask=torch.ones(2, 1, dtype=torch.bool), cache=cache, mode="token")
        assert len(calls) == 2 * L and frozen == []
        moa(idx, pad_mask=mask, domain=torch.tensor([0, 1]), mode="token")
    for h in hooks:
        h.remove()
    assert len(calls) == 4 * L and "cls_loss" in moa.routing  # with labels: the mixture and the pooled router
    assert len(frozen) == L - 1  # and the frozen blocks the routers after the first read


def test_routers_reading_the_base_see_the_frozen_base_and_train_alone():
    """With router_input base, router i's logits are its linear map of the frozen base's block-i hidden states
    pooled over the prompt (1e-5), whatever the experts do; L_cls then reaches the routers and no expert."""
    moa = moa_model()
    moa.router_input = "base"
    x, y, domain, prompt = batch()
    with torch.no_grad():
        moa(x, domain=domain, mode="label", router_mask=prompt)
        logits = moa.routing["logits"]  # (L, B, K)
        h, _ = moa.gpt.embed(x)
        for i, block in enumerate(moa.gpt.transformer.h):
            pooled = (h * prompt[..., None]).sum(1) / prompt.sum(1, keepdim=True)
            torch.testing.assert_close(logits[i], moa.routers[i](pooled), rtol=0, atol=1e-5)
            h = block(h)  # route None: the frozen base alone
    moa.zero_grad()
    cls_of(moa, x, domain).backward()
    named = dict(moa.named_parameters())
    assert all(named[f"routers.{i}.weight"].grad.abs().sum() > 0 for i in range(L))
    assert all(p.grad is None or not p.grad.abs().sum() for n, p in named.items() if "lora_" in n)


def test_a_bundle_keeps_what_its_routers_read(tmp_path):
    """save_bundle writes router_input and load_bundle builds the MoA with it: the same logits in mode last."""
    from files import fingerprint, load_bundle, save_bundle

    moa = moa_model().eval()
    moa.router_input = "base"
    path = str(tmp_path / "b.safetensors")
    save_bundle(path, moa, "bytes", fingerprint(moa))
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(block_size=24, vocab_size=40, n_layer=L, n_head=2, n_embd=16))
    loaded = load_bundle(path, gpt, "bytes")[0].eval()
    assert loaded.router_input == "base"
    x = batch()[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, mode="last")[0], moa(x, mode="last")[0], rtol=0, atol=1e-6)
