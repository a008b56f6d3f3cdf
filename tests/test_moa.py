"""Stage 2: K experts side by side, mixed batches, routers and routing modes, bundles (moa.MoA, train_router.py).

Mixed batches are checked against naive oracles on a small random GPT; routing is checked on a real
bundle trained by train_router.main on the session's tiny base. tests/test_fast.py checks fast.py.
"""

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F

import sample
import train_router
from batches import TaskData
from config import UserError
from conftest import (
    TASK_FLAGS,
    assert_one_line_error,
    ops_of,
    randomize_B,
    randomize_biases,
    run_script,
    train_tiny_experts,
)
from evaluate import evaluate_tasks, left_pad
from files import fingerprint, load_base, load_bundle, load_expert, save_bundle
from moa import MODES, LoRALinear, MoA, add_experts, lora_layers, pool, set_route, vote
from model import GPT, GPTConfig
from storage import read_safetensors, write_safetensors

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOMAINS = "arith,reverse"  # two tasks whose prompts differ in kind: a tiny router tells them apart
# --fast=False: the graded tests run the plain method (the student's code); tests/test_fast.py checks fast.py
COMMON = TASK_FLAGS
ROUTER_ITERS = 200  # with the shared phrasings a tiny base needs ~200 steps to tell the tasks apart


def tiny_gpt(seed=0):
    """A small random GPT whose linear maps have non-zero biases."""
    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=16)).eval()
    randomize_biases(gpt, seed)
    return gpt


def padded_batch(vocab=50):
    """4 left-padded rows of lengths 12, 7, 12, 3 -> idx (4, 12), pad_mask (4, 12)."""
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(vocab, (n,), generator=g).tolist() for n in (12, 7, 12, 3)]
    return left_pad(rows, 0)


def single_expert_copy(base, model, k):
    """A fresh copy of `base` with one expert, expert k of `model`, on every sample."""
    single = add_experts(copy.deepcopy(base), n_experts=1, rank=4)
    with torch.no_grad():
        for mine, theirs in zip(lora_layers(single), lora_layers(model)):
            mine.lora_A[0].copy_(theirs.lora_A[k])
            mine.lora_B[0].copy_(theirs.lora_B[k])
    set_route(single, 0)
    return single


@pytest.fixture(scope="module")
def trained(tiny_data, tiny_base, tmp_path_factory):
    """Stage-1 arith and reverse experts, then routers trained by train_router.main (experts frozen):
    {"moa", "losses", "out", "experts", "bundle"}."""
    out = tmp_path_factory.mktemp("moa")
    experts = str(out / "experts")
    train_tiny_experts(tiny_data, tiny_base, experts, DOMAINS.split(","))
    moa, losses = train_router.main(
        COMMON
        + [
            f"--data_dir={tiny_data}",
            f"--base={tiny_base}",
            f"--experts={experts}",
            f"--out_dir={out}",
            f"--domains={DOMAINS}",
            "--train_experts=False",
            f"--max_iters={ROUTER_ITERS}",
            f"--eval_interval={ROUTER_ITERS}",
            "--learning_rate=0.1",
            "--router_lr=0.1",
            "--router_input=block",  # the block's input, as the paper draws it: what the assignments build
            "--router_hidden=0",  # the paper's linear routers (tests/test_router_features.py: the per-token layer)
            "--min_lr=0.01",
            "--warmup_iters=5",
            "--schedule=cosine",
        ]
    )
    return {
        "moa": moa.eval(),
        "losses": losses,
        "out": str(out),
        "experts": experts,
        "bundle": str(out / "moa.safetensors"),
    }


def prompts(moa):
    """Two left-padded byte prompts, one per domain: idx (2, T), pad_mask (2, T), labels (2,)."""
    texts = {"arith": "What is 31 plus 8?\n", "reverse": "Reverse the word table.\n"}
    rows = [list(texts[d].encode()) for d in moa.domains]
    idx, mask = left_pad(rows, 256)
    return idx, mask, torch.arange(len(rows))


def loop_forward(self, x):
    """LoRALinear's forward the obvious way, for a (B,) route: each sample through its own expert, one at a time."""
    y = self.base(x)
    if torch.is_tensor(self.route) and self.route.dim() == 1:
        delta = [x[b] @ self.lora_A[k].t() @ self.lora_B[k].t() * self.scale for b, k in enumerate(self.route.tolist())]
        return y + torch.stack(delta)
    return LoRALinear.forward(self, x)


@pytest.mark.assignment2
def test_gather_equals_a_loop_over_samples_and_single_expert_models(monkeypatch):
    """A mixed batch through the batched gather equals a loop over samples and each sample alone through a
    single-expert model holding its expert (1e-5), with left padding."""
    base = tiny_gpt()
    model = add_experts(copy.deepcopy(base), n_experts=3, rank=4)
    randomize_B(model)
    idx, mask = padded_batch()
    route = torch.tensor([2, 0, 1, 2])
    set_route(model, route)
    gathered, _ = model(idx, pad_mask=mask)
    with monkeypatch.context() as m:
        m.setattr(LoRALinear, "forward", loop_forward)
        looped, _ = model(idx, pad_mask=mask)
    torch.testing.assert_close(gathered, looped, rtol=0, atol=1e-5)
    for i, k in enumerate(route.tolist()):
        alone, _ = single_expert_copy(base, model, k)(idx[i : i + 1], pad_mask=mask[i : i + 1])
        torch.testing.assert_close(gathered[i : i + 1], alone, rtol=0, atol=1e-5)
    assert (gathered[0] - gathered[2]).abs().max() > 0 and (gathered[0] - base(idx[:1])[0][0]).abs().max() > 1e-3


@pytest.mark.assignment2
def test_one_hot_token_mixture_equals_per_sample_route():
    """A per-token (B, T, K) mixture that is one-hot on each sample's expert equals the per-sample (B,) route (1e-5)."""
    model = add_experts(tiny_gpt(), n_experts=3, rank=4)
    randomize_B(model)
    idx, mask = padded_batch()
    route = torch.tensor([1, 2, 0, 1])
    set_route(model, route)
    per_sample, _ = model(idx, pad_mask=mask)
    set_route(model, F.one_hot(route, 3).float()[:, None, :].expand(-1, idx.size(1), -1))
    per_token, _ = model(idx, pad_mask=mask)
    torch.testing.assert_close(per_token, per_sample, rtol=0, atol=1e-5)


def test_token_mixture_is_the_weighted_sum_of_the_experts():
    """With per-token weights w (B, T, K), LoRALinear gives x W^T + b + s sum_k w[..., k] (x A_k^T B_k^T), and the
    gradients of x, w and every A_k and B_k are those of that sum (1e-5): MoE-LoRA's layer, by its definition."""
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(16, 24), n_experts=3, rank=4, alpha=6.0)
    for B in layer.lora_B:
        torch.nn.init.normal_(B)
    x = torch.randn(2, 5, 16, requires_grad=True)
    w = F.softmax(torch.randn(2, 5, 3), dim=-1).requires_grad_()
    layer.route = w
    ours = layer(x)
    terms = [w[..., k, None] * (x @ layer.lora_A[k].t() @ layer.lora_B[k].t()) for k in range(3)]
    expected = layer.base(x) + sum(terms) * (6.0 / 4)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    leaves = [x, w, *layer.lora_A, *layer.lora_B]
    grad_out = torch.randn_like(ours)
    for g, e in zip(torch.autograd.grad(ours, leaves, grad_out), torch.autograd.grad(expected, leaves, grad_out)):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-5)
    assert (ours - layer.base(x)).abs().max() > 0.1  # the experts count


@pytest.mark.assignment2
def test_gather_gradients_equal_a_loop_over_samples(monkeypatch):
    """A mixed batch's gradients for every expert's A and B through the gather equal a loop over samples' (1e-5)."""
    model = add_experts(tiny_gpt(), n_experts=3, rank=4)
    randomize_B(model)
    idx, mask = padded_batch()
    set_route(model, torch.tensor([2, 0, 2, 1]))
    grads = []
    for forward in (LoRALinear.forward, loop_forward):
        monkeypatch.setattr(LoRALinear, "forward", forward)
        model.zero_grad(set_to_none=True)
        logits, _ = model(idx, pad_mask=mask)
        logits[mask].square().mean().backward()
        grads.append([p.grad for layer in lora_layers(model) for p in [*layer.lora_A, *layer.lora_B]])
    assert all(g is not None for g in grads[0])
    for gathered, looped in zip(*grads):
        torch.testing.assert_close(gathered, looped, rtol=0, atol=1e-5)


def tiny_moa(domains=("a", "b", "c"), n_layer=2, seed=0, pooling="mean"):
    """A MoA over a small random GPT (non-zero biases) whose experts and routers all do something."""
    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=n_layer, n_head=2, n_embd=16))
    randomize_biases(gpt, seed)
    moa = MoA(gpt, list(domains), rank=4, pooling=pooling).eval()
    randomize_B(moa)
    for router in moa.routers:
        torch.nn.init.normal_(router.weight, std=1.0)
        torch.nn.init.normal_(router.bias, std=1.0)
    return moa


@pytest.mark.assignment3
def test_pool_is_the_mean_over_real_tokens():
    """pool(x, pad_mask, "mean") is each row's mean over its unpadded tokens, or over all without a mask (1e-6);
    pool(x, pad_mask, "last") is the last token (with a mask or without), and with a prefix mask the prefix's last
    token."""
    x = torch.randn(4, 12, 16, generator=torch.Generator().manual_seed(0))
    _, mask = padded_batch()
    expected = torch.stack([x[b, mask[b]].mean(0) for b in range(4)])
    torch.testing.assert_close(pool(x, mask, "mean"), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(pool(x, None, "mean"), x.mean(1), rtol=0, atol=1e-6)
    torch.testing.assert_close(pool(x, None, "last"), x[:, -1], rtol=0, atol=0)
    torch.testing.assert_close(pool(x, mask, "last"), x[:, -1], rtol=0, atol=0)
    prefix = torch.arange(12) < torch.tensor([[3], [12], [1], [7]])
    torch.testing.assert_close(pool(x, prefix, "last"), x[torch.arange(4), torch.tensor([2, 11, 0, 6])], rtol=0, atol=0)
    torch.testing.assert_close(pool(x, prefix, "mean")[0], x[0, :3].mean(0), rtol=0, atol=1e-6)


@pytest.mark.assignment3
def test_pool_and_vote_have_no_loop_over_samples():
    """The handout's rule: pool (each way, with a mask and without) and vote run the same number of tensor operations
    for 2 samples as for 6."""
    counts = []
    for n in (2, 6):
        g = torch.Generator().manual_seed(n)
        x, mask = torch.randn(n, 12, 16, generator=g), torch.arange(12) >= torch.randint(12, (n, 1), generator=g)
        probs = F.softmax(torch.randn(4, n, 3, generator=g), dim=-1)  # (L, B, K)
        pools = [(x, m, how) for m in (mask, None) for how in ("mean", "last")]
        votes = ops_of(vote, probs.argmax(-1), probs)
        counts.append([len(ops_of(pool, *args)) for args in pools] + [len(votes)])
    assert counts[0] == counts[1], counts


@pytest.mark.assignment3
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_routers_reading_a_prefix_see_what_the_prompt_gives(pooling):
    """With router_mask on each row's first L tokens, every router's logits equal those of the L-token prompt run alone
    (1e-5), with either pooling: attention is causal, so training on prefixes teaches the routers short prompts."""
    moa = tiny_moa(n_layer=3, pooling=pooling)
    idx = torch.randint(50, (3, 12), generator=torch.Generator().manual_seed(1))
    lengths = [4, 12, 9]
    with torch.no_grad():
        moa(idx, mode="layer", router_mask=torch.arange(12) < torch.tensor(lengths)[:, None])
        masked = moa.routing["logits"]  # (L, B, K)
        for b, n in enumerate(lengths):
            moa(idx[b : b + 1, :n], mode="layer")
            torch.testing.assert_close(masked[:, b], moa.routing["logits"][:, 0], rtol=0, atol=1e-5)
        moa(idx, mode="layer")
    assert (moa.routing["logits"][:, 0] - masked[:, 0]).abs().max() > 1e-3  # the whole row reads differently


@pytest.mark.assignment3
def test_vote_is_the_majority_and_ties_go_to_probability():
    """vote(routes, probs) picks the expert most layers chose, even against the mean probability; a tie goes to the
    expert with the higher probability averaged over the layers (not the last layer's, nor the lowest id)."""
    routes = torch.tensor([[2, 0, 1], [2, 1, 1], [2, 1, 0], [0, 0, 0]])  # (L=4, B=3): majority 2, tie 0/1, tie 0/1
    # sample 0: expert 0 has the highest probability, but 3 of 4 layers chose 2; the ties go to 1 and to 0
    probs = torch.tensor([[0.8, 0.1, 0.1], [0.25, 0.5, 0.25], [0.5, 0.25, 0.25]]).expand(4, 3, 3)  # (L, B, K)
    assert vote(routes, probs).tolist() == [2, 1, 0]
    assert vote(routes[:1], probs[:1]).tolist() == [2, 0, 1]  # one layer: its choice
    # two layers tie between experts 0 and 1 in both samples; the layers' probabilities differ
    routes = torch.tensor([[0, 0], [1, 1]])  # (L=2, B=2)
    probs = torch.tensor(
        [
            [[0.9, 0.1, 0.0], [0.6, 0.4, 0.0]],  # layer 0
            [[0.2, 0.8, 0.0], [0.1, 0.9, 0.0]],
        ]
    )  # layer 1 (the last)
    # mean over layers: sample 0 (0.55, 0.45) -> 0, though the last layer says 1; sample 1 (0.35, 0.65) -> 1, not id 0
    assert vote(routes, probs).tolist() == [0, 1]
    # four layers tie 2 to 2 in each sample, each layer voting for its most probable expert; each sample tells the
    # mean over layers from another rule: A the highest probability in any layer (0.65 for 1) and the higher id;
    # B the mean over the layers that voted for the expert (0.52 for 1); C the geometric mean (0.001 sinks 0);
    # D the most probable expert of all (2, which no layer chose) and the lowest id or the first layer (0)
    probs = torch.tensor(
        [  # samples A, B, C, D; layers 0..3
            [[0.6, 0.1, 0.3], [0.5, 0.2, 0.3], [0.9, 0.1, 0.0], [0.4, 0.25, 0.35]],
            [[0.6, 0.1, 0.3], [0.5, 0.2, 0.3], [0.9, 0.1, 0.0], [0.4, 0.25, 0.35]],
            [[0.4, 0.45, 0.15], [0.43, 0.52, 0.05], [0.3, 0.7, 0.0], [0.25, 0.4, 0.35]],
            [[0.3, 0.65, 0.05], [0.43, 0.52, 0.05], [0.001, 0.6, 0.399], [0.2, 0.45, 0.35]],
        ]
    )  # (L=4, B=4, K=3)
    mean = probs.mean(0)  # A (0.475, 0.325), B (0.465, 0.36), C (0.525, 0.375), D (0.3125, 0.3375) for (0, 1)
    routes = probs.argmax(-1)  # (L, B)
    assert (F.one_hot(routes, 3).sum(0)[:, :2] == 2).all()  # in every sample 2 layers chose 0 and 2 chose 1
    assert (mean[:, 0] > mean[:, 1]).tolist() == [True, True, True, False]
    assert vote(routes, probs).tolist() == [0, 0, 0, 1]


@pytest.mark.assignment3
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_router_logits_and_cls_loss_by_hand(pooling):
    """Router i's logits are its linear map (with its bias) of block i's input pooled as the MoA's setting says: the
    mean over real tokens, or the last real token (1e-5); in label mode every layer routes by the label; loss - L_LM
    is eta times the routers' cross-entropy averaged over layers (1e-6), and routing["cls_loss"] is that
    cross-entropy, detached, whether targets are given or not (without them the loss is the GPT's: None)."""
    moa = tiny_moa(pooling=pooling)
    idx, mask = padded_batch()
    targets = torch.where(mask, idx, -1)
    labels = torch.tensor([2, 0, 1, 2])
    inputs = {}  # block index -> the block's input x (B, T, C), recorded by a forward pre-hook

    def record(i):
        return lambda module, args: inputs.update({i: args[0]})

    hooks = [block.register_forward_pre_hook(record(i)) for i, block in enumerate(moa.gpt.transformer.h)]
    with torch.no_grad():
        moa.eta = 0.0
        _, lm_loss = moa(idx, targets, pad_mask=mask, domain=labels, mode="label")
        moa.eta = 0.7
        _, loss = moa(idx, targets, pad_mask=mask, domain=labels, mode="label")
    for h in hooks:
        h.remove()
    by_hand = []
    for i, router in enumerate(moa.routers):
        real = [inputs[i][b, mask[b]] for b in range(4)]  # each row's real tokens (n_b, C)
        pooled = torch.stack([r.mean(0) if pooling == "mean" else r[-1] for r in real])  # (B, C)
        by_hand.append(pooled @ router.weight.t() + router.bias)  # (B, K)
        torch.testing.assert_close(moa.routing["logits"][i], by_hand[-1], rtol=0, atol=1e-5)
    assert torch.equal(moa.routing["routes"], labels.expand(2, -1))
    cls_loss = sum(F.cross_entropy(logits, labels) for logits in by_hand) / len(by_hand)
    torch.testing.assert_close(loss - lm_loss, 0.7 * cls_loss, rtol=0, atol=1e-6)
    assert (loss - lm_loss).item() > 0.1  # the routers are random: L_cls is far from zero
    torch.testing.assert_close(moa.routing["cls_loss"], cls_loss, rtol=0, atol=1e-6)
    _, no_targets = moa(idx, pad_mask=mask, domain=labels, mode="label")  # with gradients: the routers train
    assert no_targets is None and not moa.routing["cls_loss"].requires_grad
    torch.testing.assert_close(moa.routing["cls_loss"], cls_loss, rtol=0, atol=1e-6)


@pytest.mark.assignment3
def test_layer_mode_routes_each_layer_by_its_own_router():
    """In layer mode each layer uses its own router's top-1 expert, and the logits equal those of the GPT with
    each layer set to that route by hand (1e-6)."""
    moa = tiny_moa()
    idx, mask = padded_batch()
    with torch.no_grad():
        logits, _ = moa(idx, pad_mask=mask, mode="layer")
        routes = moa.routing["logits"].argmax(-1)  # (L, B)
        assert torch.equal(moa.routing["routes"], routes)
        assert (routes[0] != routes[1]).any()  # the layers disagree somewhere, so each must use its own
        for block, route in zip(moa.gpt.transformer.h, routes):
            set_route(block, route)
        by_hand, _ = moa.gpt(idx, pad_mask=mask)
    torch.testing.assert_close(logits, by_hand, rtol=0, atol=1e-6)


@pytest.mark.assignment3
@pytest.mark.parametrize("mode", ["layer", "last", "vote"])
def test_labels_route_only_in_label_mode(mode):
    """Given domain labels in another mode (train_router.py --mode=layer passes them, for L_cls), each block is still
    routed by its own router's top-1, in training and in evaluation: the routes and logits (1e-6) are those without
    labels; and L_cls is recorded and added, loss - L_LM = eta * L_cls (1e-6)."""
    moa = tiny_moa()
    idx, mask = padded_batch()
    targets = torch.where(mask, idx, -1)
    with torch.no_grad():
        expected, lm_loss = moa(idx, targets, pad_mask=mask, mode=mode)
        predicted = moa.routing["predicted"]  # (L, B)
        labels = (predicted[-1] + 1) % 3  # no label is the last router's choice
        for training in (True, False):
            logits, loss = moa.train(training)(idx, targets, pad_mask=mask, domain=labels, mode=mode)
            assert torch.equal(moa.routing["routes"], predicted), training
            torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
            assert moa.routing["cls_loss"] > 0.1  # random routers, labels none of them chose last
            torch.testing.assert_close(loss - lm_loss, moa.eta * moa.routing["cls_loss"], rtol=0, atol=1e-6)
    moa.eval()


ROUTERS = [1, 1, 2]  # constant routers: blocks 0 and 1 pick expert 1, the last block expert 2
LABELS = [0, 2, 1, 0]


@pytest.mark.assignment4
@pytest.mark.parametrize(
    "mode, expected",
    [("layer", [[1] * 4, [1] * 4, [2] * 4]), ("last", [[2] * 4] * 3), ("vote", [[1] * 4] * 3), ("label", [LABELS] * 3)],
)
def test_decoding_uses_the_routes_stored_at_prefill(mode, expected):
    """Prefill stores in cache.route (L, B) each layer's own choice (layer), the one decision in every layer (last,
    vote) or the labels, not what the routers say (label); each decoding step (one expert per layer here: the plain
    path) equals the GPT routed by hand with cache.route (the gather; 1e-6), whatever the routers say now, and no
    router runs while decoding."""
    moa = tiny_moa(n_layer=3)
    domain = torch.tensor(LABELS) if mode == "label" else None
    with torch.no_grad():
        for router, k in zip(moa.routers, ROUTERS):
            router.weight.zero_()
            router.bias.copy_(F.one_hot(torch.tensor(k), 3) * 10.0)
        idx, mask = padded_batch()
        cache = moa.new_cache()
        moa(idx, pad_mask=mask, cache=cache, domain=domain, mode=mode)
        assert torch.equal(cache.route, torch.tensor(expected))
        for router in moa.routers:  # the routers now disagree with the stored decision: decoding must not ask them
            router.bias.copy_(F.one_hot(torch.tensor(0), 3) * 10.0)
        asked = []
        hooks = [router.register_forward_hook(lambda *args: asked.append(1)) for router in moa.routers]
        step, ones = torch.full((4, 1), 7), torch.ones(4, 1, dtype=torch.bool)
        decoded, _ = moa(step, pad_mask=ones, cache=copy.deepcopy(cache), domain=domain, mode=mode)
        for h in hooks:
            h.remove()
        assert asked == []
        for block, route in zip(moa.gpt.transformer.h, cache.route):
            set_route(block, route)
        by_hand, _ = moa.gpt(step, pad_mask=ones, cache=copy.deepcopy(cache))
    torch.testing.assert_close(decoded, by_hand, rtol=0, atol=1e-6)


@pytest.mark.assignment3
def test_router_learns_separable_domains(trained, tiny_data):
    """Training the routers lowers the loss and the routers then pick the right expert for >95% of the
    validation prompts of arith and reverse (64 each), at every layer and by vote."""
    losses = trained["losses"]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.2
    with open(os.path.join(trained["out"], "moa", "log.jsonl")) as f:
        first = json.loads(f.readline())
    assert first["step"] == 0 and first["route_mean"] == 0.5  # zero-initialised routers: all pick expert 0
    moa = trained["moa"]
    data = TaskData(tiny_data, ",".join(moa.domains))
    for mode in ("layer", "vote"):
        result = evaluate_tasks(moa, data, 64, 32, generate=False, served=False, mode=mode)
        assert result["route_mean"] > 0.95 and min(result["route_layers"]) > 0.95, (
            mode,
            result["route_layers"],
            result["confusion"],
        )


@pytest.mark.assignment3
def test_every_mode_runs_and_label_mode_gives_each_sample_its_expert(trained):
    """Every routing mode returns (B, T, vocab) logits, and label mode's logits equal each sample run alone on its
    label's expert."""
    moa = trained["moa"]
    idx, mask, labels = prompts(moa)
    with torch.no_grad():
        for mode in MODES:
            domain = labels if mode == "label" else None
            logits, _ = moa(idx, pad_mask=mask, domain=domain, mode=mode)
            assert logits.shape == (2, idx.size(1), 257), mode
        labelled, _ = moa(idx, pad_mask=mask, domain=labels.flip(0), mode="label")
        for i, k in enumerate(labels.flip(0).tolist()):
            set_route(moa.gpt, k)
            alone, _ = moa.gpt(idx[i : i + 1], pad_mask=mask[i : i + 1])
            set_route(moa.gpt, None)
            torch.testing.assert_close(labelled[i : i + 1], alone, rtol=0, atol=1e-5)
    assert torch.equal(moa.routing["routes"], labels.flip(0).expand(2, -1))


@pytest.mark.assignment4
@pytest.mark.parametrize("mode", ["last", "vote"])
def test_last_and_vote_fix_one_decision_at_prefill(trained, mode):
    """With last/vote, prefill stores one decision for every layer in cache.route, and decoding uses it, not the
    routers."""
    moa = copy.deepcopy(trained["moa"])
    with torch.no_grad():
        moa.routers[-1].bias.copy_(torch.tensor([-100.0, 100.0]))  # the last layer disagrees: always expert 1
    idx, mask, _ = prompts(moa)
    cache = moa.new_cache()
    with torch.no_grad():
        moa(idx, pad_mask=mask, cache=cache, mode=mode)
        assert torch.equal(moa.routing["predicted"], torch.tensor([[0, 1], [1, 1]]))  # the layers disagree on sample 0
        assert cache.route.shape == (moa.config.n_layer, 2)
        assert torch.equal(cache.route, moa.routing["decision"].expand(moa.config.n_layer, -1))
        step = torch.tensor([[10], [10]])
        ones = torch.ones_like(step, dtype=torch.bool)
        kept, _ = moa(step, pad_mask=ones, cache=copy.deepcopy(cache), mode=mode)
        scrambled = copy.deepcopy(moa)
        for router in scrambled.routers:
            torch.nn.init.normal_(router.weight, std=10.0)
        ignored, _ = scrambled(step, pad_mask=ones, cache=copy.deepcopy(cache), mode=mode)
        torch.testing.assert_close(ignored, kept, rtol=0, atol=0)  # routers are not consulted while decoding
        flipped = copy.deepcopy(cache)
        flipped.route = 1 - flipped.route
        other, _ = moa(step, pad_mask=ones, cache=flipped, mode=mode)
        assert (other - kept).abs().max() > 1e-4  # ... cache.route is


@pytest.mark.assignment4
def test_layer_mode_keeps_each_layers_route(trained):
    """With mode layer, prefill stores each layer's own router choice in cache.route."""
    moa = trained["moa"]
    idx, mask, _ = prompts(moa)
    cache = moa.new_cache()
    with torch.no_grad():
        moa(idx, pad_mask=mask, cache=cache, mode="layer")
    assert torch.equal(cache.route, moa.routing["predicted"])


@pytest.mark.parametrize("mode", ["label", "layer"])
@pytest.mark.assignment4
def test_kv_cache_greedy_parity_with_bundle(trained, mode):
    """Greedy decoding of a trained bundle with the KV cache gives exactly the tokens of recomputing the context."""
    moa = trained["moa"]
    idx, mask, labels = prompts(moa)
    kwargs = {"mode": mode, "domain": labels if mode == "label" else None}
    with_cache = moa.generate(idx, 8, temperature=0, pad_mask=mask, use_cache=True, **kwargs)
    without = moa.generate(idx, 8, temperature=0, pad_mask=mask, use_cache=False, **kwargs)
    assert torch.equal(with_cache, without)


def test_routers_and_experts_learn_at_their_own_rates(trained, tiny_data, tiny_base, tmp_path):
    """One joint step without warmup moves router weights (which start at 0) by at most --router_lr and expert weights
    by at most --learning_rate, each reaching its bound to 2%: Adam's first step is lr * sign(gradient) per weight."""
    moa, _ = train_router.main(
        COMMON
        + [
            f"--data_dir={tiny_data}",
            f"--base={tiny_base}",
            f"--experts={trained['experts']}",
            f"--out_dir={tmp_path}",
            f"--domains={DOMAINS}",
            "--max_iters=1",
            "--eval_interval=1",
            "--warmup_iters=0",
            "--learning_rate=1e-3",
            "--router_lr=2e-2",
        ]
    )
    router_step = max(p.abs().max().item() for p in moa.routers.parameters())
    stage1 = read_safetensors(os.path.join(trained["experts"], "arith.safetensors"))[0]
    expert_step = max(
        (getattr(layer, part)[0].detach() - stage1[f"{name.removeprefix('gpt.')}.{part}"]).abs().max().item()
        for name, layer in moa.named_modules()
        if name.endswith(("c_attn", "c_proj", "c_fc"))
        for part in ("lora_A", "lora_B")
    )
    assert 0.98 * 2e-2 <= router_step <= 2e-2 * 1.0001, router_step
    assert 0.98 * 1e-3 <= expert_step <= 1e-3 * 1.0001, expert_step


def test_moa_runs_under_bfloat16_autocast():
    """Under CPU bfloat16 autocast (what --dtype=bfloat16 does on a GPU), label and token training steps backpropagate
    and mixed-batch generation runs (regression: in-place updates mixed bfloat16 and float32); the label-mode loss is
    within 2% of float32's."""
    moa = tiny_moa(n_layer=2).train()
    idx = torch.randint(50, (4, 12), generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 2, 0])
    loss32 = moa(idx[:, :-1], idx[:, 1:], domain=labels, mode="label")[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16 = moa(idx[:, :-1], idx[:, 1:], domain=labels, mode="label")[1]
        token_loss = moa(idx[:, :-1], idx[:, 1:], mode="token")[1]
    (loss16 + token_loss).backward()
    assert abs(loss16.item() / loss32.item() - 1) < 0.02
    assert all(p.grad is not None for p in moa.routers.parameters())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert moa.eval().generate(idx[:, :4], 3, temperature=0, mode="layer").shape == (4, 7)


def test_bundle_round_trip(trained, tiny_base, tmp_path):
    """save_bundle then load_bundle onto a fresh base gives the same tensors and identical logits."""
    moa = trained["moa"]
    base, tokenizer = load_base(tiny_base)
    path = str(tmp_path / "copy.safetensors")
    save_bundle(path, moa, tokenizer, fingerprint(base))
    loaded, meta = load_bundle(path, base, tokenizer)
    assert meta["domains"] == moa.domains == loaded.domains == DOMAINS.split(",")
    theirs = dict(loaded.named_parameters())
    for name, p in moa.named_parameters():
        assert torch.equal(theirs[name], p), name
    idx, mask, _ = prompts(moa)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.eval()(idx, pad_mask=mask, mode="layer")[0], moa(idx, pad_mask=mask, mode="layer")[0], rtol=0, atol=0
        )


def test_bundle_refuses_another_base(trained, tiny_base):
    """Loading a bundle onto a base with other weights is a UserError naming another base."""
    base, tokenizer = load_base(tiny_base)
    with torch.no_grad():
        base.transformer.wte.weight[0, 0] += 1e-3
    with pytest.raises(UserError, match="another base"):
        load_bundle(trained["bundle"], base, tokenizer)


def test_bundle_with_wrong_expert_count_is_an_error(trained, tiny_base, tmp_path):
    """A bundle whose metadata names 3 domains but holds 2 experts is a UserError, not a crash."""
    tensors, meta = read_safetensors(trained["bundle"])
    info = json.loads(meta["nanomoa"])
    info["domains"] = info["domains"] + ["cpp"]
    path = str(tmp_path / "three.safetensors")
    write_safetensors(path, tensors, {"nanomoa": json.dumps(info)})
    base, tokenizer = load_base(tiny_base)
    with pytest.raises(UserError, match="does not hold 3 experts"):
        load_bundle(path, base, tokenizer)


def test_expert_of_another_rank_is_an_error(trained, tiny_base):
    """Loading a rank-8 expert file into a MoA built with rank 4 is a UserError that names the shapes."""
    base, tokenizer = load_base(tiny_base)
    base_fp = fingerprint(base)
    moa = MoA(base, DOMAINS.split(","), rank=4)
    with pytest.raises(UserError, match="rank"):
        load_expert(os.path.join(trained["experts"], "arith.safetensors"), moa, 0, base_fp, tokenizer)


def test_unknown_domain_cli_error(tiny_data, tiny_base, tmp_path):
    """train_router.py --domains=nope exits 1 with one stderr line starting "error:" and no traceback."""
    proc = run_script(
        "train_router.py",
        "--domains=nope",
        f"--data_dir={tiny_data}",
        f"--base={tiny_base}",
        f"--out_dir={tmp_path}",
        f"--experts={tmp_path}",
    )
    assert_one_line_error(proc, "nope")


def test_sample_with_bundle_names_each_prompts_domain(trained, tiny_base, capsys):
    """sample.py --bundle with "||"-separated prompts prints, above each sample, the domain its router chose."""
    sample.main(
        [
            f"--base={tiny_base}",
            f"--bundle={trained['bundle']}",
            "--mode=last",
            "--max_new_tokens=6",
            "--prompt=What is 31 plus 8?\\n||Reverse the word table.\\n",
        ]
    )
    heads = [line for line in capsys.readouterr().out.splitlines() if line.startswith("--- prompt")]
    assert len(heads) == 2
    assert "prompt 1, sample 1 -> expert 'arith'" in heads[0]
    assert "prompt 2, sample 1 -> expert 'reverse'" in heads[1]


def test_sample_routes_by_vote_unless_told(trained, tiny_base, tmp_path, capsys):
    """sample.py with no --mode decides by the routers' vote (README: the default), --mode=last by the last router:
    the last router made to say 'reverse' on every prompt, barely (probability 0.52), ties the two routers, and
    the tie goes to the higher mean probability: router 0's 'arith'."""
    gpt, tokenizer = load_base(tiny_base)
    moa = load_bundle(trained["bundle"], gpt, tokenizer)[0]
    assert moa.domains == ["arith", "reverse"]
    with torch.no_grad():
        moa.routers[-1].weight.zero_()
        moa.routers[-1].bias.copy_(torch.tensor([0.0, 0.1]))
    skewed = str(tmp_path / "skewed.safetensors")
    save_bundle(skewed, moa, tokenizer, fingerprint(gpt))
    chosen = {}
    for mode in ("", "last", "vote"):
        flags = [f"--base={tiny_base}", f"--bundle={skewed}", "--max_new_tokens=2", "--prompt=What is 31 plus 8?\\n"]
        sample.main(flags + ([f"--mode={mode}"] if mode else []))
        heads = [line for line in capsys.readouterr().out.splitlines() if line.startswith("--- prompt")]
        chosen[mode] = heads[0].split("-> expert ")[1].split()[0]
    assert chosen == {"": "'arith'", "last": "'reverse'", "vote": "'arith'"}
