"""fast.py against moa.py: the speed paths give the plain method's numbers.

Every kind of route (none, one expert, per-sample ids, per-token weights), with and without gradients,
in float32 and under bfloat16 autocast; LoRA dropout; the hand-written backward against autograd; the
sorted mixed batch at inference; decoding with merged experts; and whole training runs with --fast
on and off. Marked assignment6: the optional speed chapter of the course.
"""

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

import fast
import train_lora
import train_router
from conftest import ops_of, randomize_B, randomize_biases
from evaluate import left_pad
from moa import LoRALinear, MoA, lora_layers
from model import GPT, GPTConfig

ROUTES = {
    "none": None,
    "one expert": 2,
    "per sample": torch.tensor([2, 0, 1, 2]),
    "per sample, all one expert": torch.tensor([1, 1, 1, 1]),  # a single request, say: the one-expert path
    "per token": F.softmax(torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(3)), dim=-1),
}


def layer_pair(dropout=0.0):
    """A LoRALinear (16 -> 24, 3 experts with random B) and a copy switched to the speed paths."""
    torch.manual_seed(0)
    plain = LoRALinear(torch.nn.Linear(16, 24), n_experts=3, rank=4, alpha=6.0, dropout=dropout)
    for B in plain.lora_B:
        torch.nn.init.normal_(B, std=0.1)
    return plain, fast.enable(copy.deepcopy(plain))


def close(a, b, dtype):
    """The difference's norm is within 1e-6 (float32) or 2% (bfloat16 autocast) of b's norm; None counts as 0."""
    a, b = (torch.zeros(()) if t is None else t.float() for t in (a, b))
    assert a.shape == b.shape or a.dim() == 0 or b.dim() == 0
    assert (a - b).norm() <= (1e-6 if dtype == torch.float32 else 0.02) * b.norm() + 1e-7, ((a - b).norm(), b.norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("kind", ROUTES)
def test_fast_layer_equals_plain_for_every_route(kind, grad, dtype):
    """For every kind of route, with and without gradients, in float32 and under CPU bfloat16 autocast,
    FastLoRALinear gives LoRALinear's output and the same gradients for x and every A and B (see close)."""
    plain, quick = layer_pair()
    x = torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(1))
    results = []
    for layer in (plain, quick):
        layer.route = ROUTES[kind]
        xi = x.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            y = layer(xi)
        grads = (
            torch.autograd.grad(y.float().square().mean(), [xi, *layer.lora_A, *layer.lora_B], allow_unused=True)
            if grad
            else []
        )
        results.append((y, grads))
    (y_plain, g_plain), (y_fast, g_fast) = results
    close(y_fast, y_plain, dtype)
    for a, b in zip(g_fast, g_plain):
        close(a, b, dtype)
    if grad:
        assert g_fast[0] is not None and g_fast[0].dtype == torch.float32  # x's gradient, in x's dtype


def test_fast_layer_with_dropout_is_the_plain_layer():
    """With LoRA dropout while training, the fast layer takes the plain path: the same output for the same seed,
    exactly, for one expert and for per-sample ids."""
    plain, quick = layer_pair(dropout=0.3)
    x = torch.randn(4, 5, 16)
    for route in (1, ROUTES["per sample"]):
        outs = []
        for layer in (plain.train(), quick.train()):
            layer.route = route
            torch.manual_seed(7)
            outs.append(layer(x))
        torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)


@pytest.mark.assignment6
def test_lora_function_backward_equals_autograd():
    """LoRAFunction gives the output and the gradients autograd derives from x W^T + b + s x A^T B^T: for x, A and B,
    and for W and b when the base trains (1e-10 in float64); a frozen base gets no gradient."""
    torch.manual_seed(0)
    x, W, b = torch.randn(2, 5, 6), torch.randn(7, 6), torch.randn(7)
    A, B = torch.randn(3, 6), torch.randn(7, 3)
    leaves = [t.double().requires_grad_() for t in (x, W, b, A, B)]
    grad_out = torch.randn(2, 5, 7, dtype=torch.float64)
    ours = fast.LoRAFunction.apply(*leaves, 1.5)
    ours_grads = torch.autograd.grad(ours, leaves, grad_out)
    expected = leaves[0] @ leaves[1].t() + leaves[2] + (leaves[0] @ leaves[3].t() @ leaves[4].t()) * 1.5
    expected_grads = torch.autograd.grad(expected, leaves, grad_out)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-10)
    for name, g, e in zip("xWbAB", ours_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-10, msg=f"gradient of {name}")
    leaves[1].requires_grad_(False)
    leaves[2].requires_grad_(False)
    out = fast.LoRAFunction.apply(*leaves, 1.5)
    out.backward(grad_out)
    assert leaves[1].grad is None and leaves[2].grad is None
    torch.testing.assert_close(leaves[3].grad, expected_grads[3], rtol=0, atol=1e-10)


@pytest.mark.assignment6
@pytest.mark.parametrize("trains", list(itertools.product([False, True], repeat=3)), ids=str)
def test_lora_function_computes_only_the_gradients_needed(trains):
    """LoRAFunction.backward returns a gradient for x, W and b exactly when that input trains (x, the weight and the
    bias each on its own flag), equal to autograd's (1e-10 in float64), and None for the others."""
    torch.manual_seed(1)
    x, W, b, A, B = (torch.randn(*shape, dtype=torch.float64) for shape in [(2, 5, 6), (7, 6), (7,), (3, 6), (7, 3)])
    for t, flag in zip((x, W, b, A, B), trains + (True, True)):
        t.requires_grad_(flag)
    grad_out = torch.randn(2, 5, 7, dtype=torch.float64)
    out = fast.LoRAFunction.apply(x, W, b, A, B, 1.5)
    returned = fast.LoRAFunction.backward(out.grad_fn, grad_out)  # out.grad_fn is the ctx forward filled in
    leaves = [t for t in (x, W, b, A, B) if t.requires_grad]
    autograd = torch.autograd.grad(x @ W.t() + b + (x @ A.t() @ B.t()) * 1.5, leaves, grad_out)
    expected = dict(zip(map(id, leaves), autograd))
    for name, t, g in zip("xWbAB", (x, W, b, A, B), returned):
        if not t.requires_grad:
            assert g is None, f"a gradient for {name}, which does not train"
        else:
            torch.testing.assert_close(g, expected[id(t)], rtol=0, atol=1e-10, msg=f"gradient of {name}")


def tiny_moa(bias=True, n_layer=2, seed=0):
    """A plain MoA over a small random GPT (3 experts with random B, random routers, non-zero biases if any)."""
    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(block_size=48, vocab_size=50, n_layer=n_layer, n_head=2, n_embd=16, bias=bias))
    randomize_biases(gpt, seed)
    moa = MoA(gpt, ["a", "b", "c"], rank=4).eval()
    randomize_B(moa)
    for router in moa.routers:
        torch.nn.init.normal_(router.weight, std=1.0)
        torch.nn.init.normal_(router.bias, std=1.0)
    return moa


def padded_batch(lengths=(12, 7, 12, 3), vocab=50):
    """Left-padded rows of the given lengths -> idx (B, T), pad_mask (B, T)."""
    g = torch.Generator().manual_seed(0)
    return left_pad([torch.randint(vocab, (n,), generator=g).tolist() for n in lengths], 0)


@pytest.mark.assignment6
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("labels", [[1, 0, 2, 0], [2, 0, 2, 0]], ids=["experts 0 1 2", "experts 0 2"])
def test_sorted_runs_equal_plain_in_the_callers_order(bias, labels, monkeypatch):
    """Label mode at inference on an unsorted mixed batch: FastMoA sorts it, runs each expert's samples as one
    merged-weight matmul (forward_runs, in every map) and gives the plain logits (1e-5), routes and decision in
    the caller's order, with biases or without, whichever experts the runs use; with runs shorter than min_run_rows
    the gather runs instead, with the same logits."""
    plain = tiny_moa(bias)
    quick = fast.enable(copy.deepcopy(plain))
    idx, mask = padded_batch()
    labels = torch.tensor(labels)  # sorted: runs of 2, 1, 1 or of 2, 2 samples, 12 tokens each
    ran = []
    forward_runs = fast.FastLoRALinear.forward_runs
    monkeypatch.setattr(
        fast.FastLoRALinear, "forward_runs", lambda self, *args: ran.append(forward_runs(self, *args)) or ran[-1]
    )
    with torch.no_grad():
        expected, _ = plain(idx, pad_mask=mask, domain=labels, mode="label")
        routing = plain.routing
        for rows, used in ((12, True), (25, False)):  # rows per run needed: 12 is the shortest run, 25 too many
            for layer in lora_layers(quick):
                layer.min_run_rows = rows
            ran.clear()
            logits, _ = quick(idx, pad_mask=mask, domain=labels, mode="label")
            assert len(ran) == 8 and all((y is not None) == used for y in ran)  # 2 blocks x 4 maps
            torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    for key in ("routes", "decision", "predicted"):
        assert torch.equal(quick.routing[key], routing[key]), key
    assert torch.equal(quick.routing["routes"], labels.expand(2, -1))
    torch.testing.assert_close(quick.routing["logits"], routing["logits"], rtol=0, atol=1e-5)


@pytest.mark.assignment6
def test_forward_runs_is_one_matmul_per_run():
    """forward_runs on a sorted batch gives each sample x W^T + b + s x A_k^T B_k^T for its expert k (1e-5), and
    runs as many tensor operations for runs of 1, 1, 1 samples as for runs of 2, 3, 1: no loop over a run's samples."""
    torch.manual_seed(0)
    layer = fast.enable(LoRALinear(torch.nn.Linear(16, 24), n_experts=3, rank=4, alpha=6.0))
    layer.min_run_rows = 1  # runs of any length pay here
    for B in layer.lora_B:
        torch.nn.init.normal_(B, std=0.1)
    counts = []
    for runs in ([1, 1, 1], [2, 3, 1]):
        route = torch.repeat_interleave(torch.arange(3), torch.tensor(runs))  # (B,) sorted
        x = torch.randn(len(route), 5, 16)
        with torch.no_grad():
            ops = ops_of(layer.forward_runs, x, [0, 1, 2], runs)
            y = layer.forward_runs(x, [0, 1, 2], runs)
            delta = torch.stack([x[j] @ layer.lora_A[k].t() @ layer.lora_B[k].t() for j, k in enumerate(route)])
        torch.testing.assert_close(y, layer.base(x) + delta * 1.5, rtol=0, atol=1e-5)
        counts.append(len(ops))
    assert counts[0] == counts[1], counts


@pytest.mark.assignment6
def test_merged_decoding_equals_plain_decoding():
    """Decoding with each block's one expert merged into its weights (where every sample uses one expert) gives the
    plain path's greedy tokens, and a decoding step's logits (1e-5); blocks whose samples differ use the gather."""
    plain = tiny_moa(n_layer=3)
    with torch.no_grad():  # block 0: every sample expert 1; blocks 1, 2: the routers decide (they differ per sample)
        plain.routers[0].weight.zero_()
        plain.routers[0].bias.copy_(torch.tensor([0.0, 5.0, 0.0]))
    quick = fast.enable(copy.deepcopy(plain))
    idx, mask = padded_batch()
    for model in (plain, quick):
        assert model.generate(idx, 20, temperature=0, pad_mask=mask, mode="layer").shape == (4, 32)
    tokens = [m.generate(idx, 20, temperature=0, pad_mask=mask, mode="layer") for m in (plain, quick)]
    assert torch.equal(tokens[0], tokens[1])
    caches = [plain.new_cache(), quick.new_cache()]
    with torch.no_grad():
        for model, cache in zip((plain, quick), caches):
            model(idx, pad_mask=mask, cache=cache, mode="layer")
        step, ones = torch.full((4, 1), 7), torch.ones(4, 1, dtype=torch.bool)
        steps = [m(step, pad_mask=ones, cache=c, mode="layer")[0] for m, c in zip((plain, quick), caches)]
    torch.testing.assert_close(steps[1], steps[0], rtol=0, atol=1e-5)
    merged = [w is not None for w in caches[1].merged]
    assert merged[0] and not all(merged), merged  # both paths were taken
    single = [m.generate(idx[:1], 12, temperature=0, pad_mask=mask[:1], mode="last") for m in (plain, quick)]
    assert torch.equal(single[0], single[1])


def test_fast_moa_under_bfloat16_autocast():
    """Under CPU bfloat16 autocast, a fast MoA's label-mode training loss is within 2% of the plain one's and both
    backpropagate to every router; mixed-batch generation runs."""
    plain = tiny_moa().train()
    quick = fast.enable(copy.deepcopy(plain))
    idx = torch.randint(50, (4, 12), generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 2, 0])
    losses = []
    for moa in (plain, quick):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = moa(idx[:, :-1], idx[:, 1:], domain=labels, mode="label")[1]
        loss.backward()
        assert all(p.grad is not None for p in moa.routers.parameters())
        losses.append(loss.item())
    assert abs(losses[1] / losses[0] - 1) < 0.02
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert quick.eval().generate(idx[:, :4], 3, temperature=0, mode="layer").shape == (4, 7)


def test_enable_swaps_classes_and_keeps_every_parameter():
    """fast.enable turns every LoRALinear and the MoA into their fast classes and back, with the same parameters
    (the same tensors, under the same names)."""
    moa = tiny_moa()
    params = dict(moa.named_parameters())
    fast.enable(moa)
    assert type(moa) is fast.FastMoA and all(type(m) is fast.FastLoRALinear for m in lora_layers(moa))
    assert {n: p for n, p in moa.named_parameters()} == params
    fast.enable(moa, False)
    assert type(moa) is MoA and all(type(m) is LoRALinear for m in lora_layers(moa))


COMMON = [
    "--batch_size=8",
    "--eval_iters=1",
    "--progress=False",
    "--device=cpu",
    "--seed=1",
    "--max_iters=4",
    "--eval_interval=4",
    "--warmup_iters=1",
]


def test_scripts_train_alike_with_and_without_fast(tiny_data, tiny_base, tmp_path):
    """train_lora.py and train_router.py give the same training losses (1e-5) and final models (logits within 1e-4)
    with --fast on and off: the speed paths change nothing a run learns. (Weights are not compared one by one:
    Adam turns rounding-level differences of a near-zero gradient into steps of the learning rate's size.)"""
    runs = {}
    for speed in (True, False):
        out = tmp_path / str(speed)
        args = COMMON + [f"--data_dir={tiny_data}", f"--base={tiny_base}", f"--fast={speed}"]
        expert, expert_losses = train_lora.main(args + [f"--out_dir={out}", "--domain=arith"])
        train_lora.main(args + [f"--out_dir={out}", "--domain=reverse"])
        moa, moa_losses = train_router.main(args + [f"--out_dir={out}", f"--experts={out}", "--domains=arith,reverse"])
        runs[speed] = (expert, expert_losses, moa, moa_losses)
    (e1, l1, m1, r1), (e0, l0, m0, r0) = runs[True], runs[False]
    torch.testing.assert_close(torch.tensor(l1), torch.tensor(l0), rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor(r1), torch.tensor(r0), rtol=0, atol=1e-5)
    idx = torch.randint(257, (4, 32), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 0, 1])
    with torch.no_grad():
        torch.testing.assert_close(e1.eval()(idx)[0], e0.eval()(idx)[0], rtol=0, atol=1e-4)
        torch.testing.assert_close(
            m1.eval()(idx, domain=labels)[0], m0.eval()(idx, domain=labels)[0], rtol=0, atol=1e-4
        )
