"""Stage 1: LoRA experts beside a frozen GPT (moa.LoRALinear, add_experts, expert files, train_lora.py).

Unit tests use a small random GPT; the rest train one real arith expert on the session's tiny base.
"""

import copy
import json
import math
import os

import pytest
import torch

import sample
import train_lora
from config import UserError, parse_config
from conftest import ops_of, randomize_B, randomize_biases
from files import expert_tensors, fingerprint, load_base, load_expert, save_expert
from moa import LoRALinear, add_experts, count_params, lora_layers, set_route
from model import GPT, GPTConfig

LORA_ITERS = 60  # arith's drop is the largest for seeds 1..3 (checked); other tasks' losses rise


def tiny_gpt(seed=0, **overrides):
    """A small random GPT whose linear maps have non-zero biases."""
    torch.manual_seed(seed)
    config = dict(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=16)
    gpt = GPT(GPTConfig(**{**config, **overrides})).eval()
    randomize_biases(gpt, seed)
    return gpt


def tokens(seed=0, B=3, T=12, vocab=50):
    return torch.randint(vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def arith_run(tiny_data, tiny_base, tmp_path_factory):
    """A stage-1 arith expert trained by train_lora.main: (model, out_dir)."""
    out = str(tmp_path_factory.mktemp("experts"))
    model, _ = train_lora.main(
        [
            f"--data_dir={tiny_data}",
            f"--base={tiny_base}",
            f"--out_dir={out}",
            "--domain=arith",
            f"--max_iters={LORA_ITERS}",
            f"--eval_interval={LORA_ITERS}",
            "--batch_size=8",
            "--eval_iters=1",
            "--progress=False",
            "--device=cpu",
            "--seed=1",
            "--fast=False",
        ]
    )  # graded: the plain method
    return model.eval(), out


@pytest.mark.assignment1
def test_expert_adds_its_low_rank_update():
    """LoRALinear with route k returns x W^T + b + (x A_k^T B_k^T) * alpha / r (1e-5), delta_weight(k) is
    B_k A_k * alpha / r (1e-6), and a backward pass reaches expert k's A and B only."""
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(16, 24), n_experts=3, rank=4, alpha=6.0)
    for B in layer.lora_B:
        torch.nn.init.normal_(B)
    x = torch.randn(2, 5, 16)
    W, b = layer.base.weight, layer.base.bias
    for k in range(3):
        A_k, B_k = layer.lora_A[k], layer.lora_B[k]
        layer.route = k
        expected = x @ W.t() + b + (x @ A_k.t() @ B_k.t()) * (6.0 / 4)
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(layer.delta_weight(k), B_k @ A_k * (6.0 / 4), rtol=0, atol=1e-6)
    layer.route = 1
    layer(x).square().sum().backward()
    assert layer.lora_A[1].grad.abs().max() > 0 and layer.lora_B[1].grad.abs().max() > 0
    for k in (0, 2):
        assert layer.lora_A[k].grad is None and layer.lora_B[k].grad is None


IN, OUT = 48, 64  # a layer whose (out, in) product is larger than any tensor of a forward over 2 x 3 tokens


def weight_sized(ops):
    """The operations that computed a tensor of in * out elements or more (B_k A_k, A_k^T B_k^T, a merged weight);
    views aside (the base's W^T is one)."""
    return [(name, shapes) for name, shapes, view in ops if not view and any(math.prod(s) >= IN * OUT for s in shapes)]


def rule_layer(n_experts):
    """A LoRALinear (48 -> 64, rank 4) with random B and a non-zero bias."""
    torch.manual_seed(n_experts)
    layer = LoRALinear(torch.nn.Linear(IN, OUT), n_experts=n_experts, rank=4)
    for B in layer.lora_B:
        torch.nn.init.normal_(B)
    return layer


@pytest.mark.assignment1
def test_one_expert_never_forms_an_out_by_in_product():
    """The handout's rule: the one-expert forward multiplies (B, T, in) -> (B, T, r) -> (B, T, out); none of its
    operations makes a tensor of in * out elements (B_k A_k, A_k^T B_k^T, W + delta_weight(k)), which would cost
    in * out per token instead of r * (in + out)."""
    layer = rule_layer(2)
    layer.route = 1
    x = torch.randn(2, 3, IN)
    assert weight_sized(ops_of(layer, x)) == []


@pytest.mark.assignment2
def test_gather_has_no_loop_over_samples_or_experts():
    """The handout's rules: a mixed batch runs the same number of tensor operations for 2 samples of 2 experts as for
    6 samples of 5 (no Python loop over samples or experts), and none makes a tensor of in * out elements (no
    per-sample B_k A_k)."""
    counts = []
    for n_experts, n_samples in ((2, 2), (5, 6)):
        layer = rule_layer(n_experts)
        layer.route = torch.arange(n_samples) % n_experts
        ops = ops_of(layer, torch.randn(n_samples, 3, IN))
        assert weight_sized(ops) == []
        counts.append(len(ops))
    assert counts[0] == counts[1], counts


def dropout_layer(route):
    """A LoRALinear with LoRA dropout 0.5 in training mode, random B, route set; and the outputs of its
    lora_dropout module during the next forward, recorded by a hook."""
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(16, 24), n_experts=3, rank=4, alpha=6.0, dropout=0.5).train()
    for B in layer.lora_B:
        torch.nn.init.normal_(B)
    layer.route = route
    dropped = []
    layer.lora_dropout.register_forward_hook(lambda module, args, out: dropped.append(out))
    return layer, dropped


@pytest.mark.assignment1
def test_lora_dropout_drops_the_expert_input_only():
    """In training with LoRA dropout, route k gives x W^T + b + (h A_k^T B_k^T) * alpha / r with h the output of the
    layer's lora_dropout in this call (1e-5): dropout is applied to the expert's input only, never to the base's."""
    layer, dropped = dropout_layer(2)
    x = torch.randn(2, 5, 16)
    out = layer(x)
    assert len(dropped) == 1 and (dropped[0] == 0).any() and (x != 0).all()  # dropout ran and dropped something
    expected = layer.base(x) + (dropped[0] @ layer.lora_A[2].t() @ layer.lora_B[2].t()) * 1.5
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


@pytest.mark.assignment2
def test_lora_dropout_in_a_mixed_batch():
    """With LoRA dropout, a mixed batch gives each sample x W^T + b + (h_b A_k^T B_k^T) * alpha / r for its expert k,
    with h the output of the layer's lora_dropout in this call (1e-5)."""
    route = torch.tensor([2, 0, 1])
    layer, dropped = dropout_layer(route)
    x = torch.randn(3, 5, 16)
    out = layer(x)
    assert len(dropped) == 1 and (dropped[0] == 0).any()
    delta = torch.stack([dropped[0][b] @ layer.lora_A[k].t() @ layer.lora_B[k].t() for b, k in enumerate([2, 0, 1])])
    torch.testing.assert_close(out, layer.base(x) + delta * 1.5, rtol=0, atol=1e-5)


@pytest.mark.assignment2
def test_fresh_expert_changes_nothing():
    """A fresh LoRALinear / add_experts leaves every output of the GPT exactly unchanged, in every route form."""
    gpt = tiny_gpt()
    idx = tokens()
    expected, _ = gpt(idx)
    model = add_experts(copy.deepcopy(gpt), n_experts=3, rank=4)
    for route in (None, 0, 2, torch.tensor([0, 1, 2]), torch.full((3, 12, 3), 1 / 3)):
        set_route(model, route)
        torch.testing.assert_close(model(idx)[0], expected, rtol=0, atol=0)
    layer = LoRALinear(torch.nn.Linear(16, 24), n_experts=2, rank=4)
    layer.route = 1
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(layer(x), layer.base(x), rtol=0, atol=0)


@pytest.mark.assignment1
def test_merged_equals_unmerged():
    """With a non-zero B, merging expert k into the weight gives the unmerged output (1e-5); unmerging restores
    the weight (1e-6)."""
    gpt = add_experts(tiny_gpt(), n_experts=2, rank=4)
    randomize_B(gpt)
    idx = tokens()
    set_route(gpt, 1)
    unmerged, _ = gpt(idx)
    assert (unmerged - tiny_gpt()(idx)[0]).abs().max() > 1e-3  # the expert does something
    weights = [layer.base.weight.clone() for layer in lora_layers(gpt)]
    for layer in lora_layers(gpt):
        layer.merge(1)
    torch.testing.assert_close(gpt(idx)[0], unmerged, rtol=0, atol=1e-5)
    for layer, w in zip(lora_layers(gpt), weights):
        layer.unmerge()
        torch.testing.assert_close(layer.base.weight, w, rtol=0, atol=1e-6)


@pytest.mark.assignment1
def test_eval_never_merges():
    """model.eval() and an eval forward leave every expert unmerged and the base weights untouched."""
    gpt = add_experts(tiny_gpt(), n_experts=1, rank=4)
    randomize_B(gpt)
    weights = [layer.base.weight.clone() for layer in lora_layers(gpt)]
    set_route(gpt.eval(), 0)
    with torch.no_grad():
        gpt(tokens())
    assert all(layer.merged is None for layer in lora_layers(gpt))
    for layer, w in zip(lora_layers(gpt), weights):
        assert torch.equal(layer.base.weight, w)


def test_only_lora_params_train():
    """After add_experts, count_params counts as trainable exactly the A and B matrices: r * (in + out) per map
    and expert."""
    gpt = tiny_gpt()
    total_before = gpt.num_params()
    add_experts(gpt, n_experts=2, rank=4)
    C, L = 16, 2
    per_block = 4 * ((C + 3 * C) + (C + C) + (C + 4 * C) + (4 * C + C))  # c_attn, attn c_proj, c_fc, mlp c_proj
    trainable, total = count_params(gpt)
    assert trainable == 2 * L * per_block
    assert total == total_before + trainable
    assert all(("lora_" in name) == p.requires_grad for name, p in gpt.named_parameters())


@pytest.mark.assignment1
def test_train_lora_keeps_base_bit_identical(arith_run, tiny_base):
    """After train_lora.main, every base weight equals the base checkpoint's bit for bit and only the LoRA
    tensors changed."""
    model, _ = arith_run
    base, _ = load_base(tiny_base)
    ours = {name.replace(".base.", "."): t for name, t in model.state_dict().items() if "lora_" not in name}
    reference = base.state_dict()
    assert set(ours) == set(reference)
    for name, t in reference.items():
        assert torch.equal(ours[name], t), name
    for layer in lora_layers(model):
        assert layer.lora_B[0].abs().max() > 0  # B started at zero: it trained


def test_expert_file_round_trip(arith_run, tiny_base, tmp_path):
    """save_expert then load_expert onto a fresh copy of the base gives equal tensors and the same logits."""
    model, out = arith_run
    base, tokenizer = load_base(tiny_base)
    base_fp = fingerprint(base)
    path = str(tmp_path / "arith.safetensors")
    save_expert(path, model, 0, "arith", tokenizer, base_fp)
    for file in (path, os.path.join(out, "arith.safetensors")):  # ours, and the one train_lora wrote
        fresh = add_experts(load_base(tiny_base)[0], 1, rank=8).eval()
        meta = load_expert(file, fresh, 0, base_fp, tokenizer)
        assert meta["domain"] == "arith" and meta["rank"] == 8
        for name, t in expert_tensors(model, 0).items():
            assert torch.equal(expert_tensors(fresh, 0)[name], t), name
        set_route(fresh, 0)
        idx = tokens(vocab=257, T=32)
        with torch.no_grad():
            torch.testing.assert_close(fresh(idx)[0], model(idx)[0], rtol=0, atol=0)


def test_expert_refuses_another_base(arith_run, tiny_base):
    """Loading an expert onto a base with other weights, or another config, is a UserError naming another base."""
    _, out = arith_run
    path = os.path.join(out, "arith.safetensors")
    other_weights, tokenizer = load_base(tiny_base)
    with torch.no_grad():
        other_weights.transformer.h[0].mlp.c_fc.weight[0, 0] += 1e-3
    other_config = GPT(GPTConfig(block_size=32, vocab_size=257, n_layer=2, n_head=2, n_embd=16))
    for other in (other_weights, other_config):
        base_fp = fingerprint(other)
        add_experts(other, 1, rank=8)
        with pytest.raises(UserError, match="another base"):
            load_expert(path, other, 0, base_fp, tokenizer)


def test_expert_refuses_another_tokenizer(arith_run, tiny_base):
    """Loading an expert trained with the byte tokenizer onto a base that says gpt2 is a UserError naming both."""
    _, out = arith_run
    base, _ = load_base(tiny_base)
    base_fp = fingerprint(base)
    add_experts(base, 1, rank=8)
    with pytest.raises(UserError, match="tokenizer 'bytes'.*'gpt2'"):
        load_expert(os.path.join(out, "arith.safetensors"), base, 0, base_fp, "gpt2")


@pytest.mark.assignment1
def test_expert_lowers_its_own_domain_most(arith_run):
    """From the first to the last eval of the run, the arith expert lowers arith's loss more than any other task's."""
    _, out = arith_run
    with open(os.path.join(out, "arith", "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    first, last = records[0], records[-1]
    assert first["step"] == 0 and last["step"] == LORA_ITERS
    drops = {k: first[k] - last[k] for k in first if k.startswith("loss/")}
    assert set(drops) == {"loss/upper", "loss/lower", "loss/double", "loss/reverse", "loss/arith"}  # not count
    assert drops["loss/arith"] > 0.1, drops
    assert max(drops, key=drops.get) == "loss/arith", drops


def test_train_lora_needs_a_domain(tiny_data, tiny_base, tmp_path):
    """train_lora without --domain is a UserError that says how to name one."""
    with pytest.raises(UserError, match="--domain=NAME"):
        train_lora.main([f"--data_dir={tiny_data}", f"--base={tiny_base}", f"--out_dir={tmp_path}"])


def test_sample_with_adapter_prints_text(arith_run, tiny_base, capsys):
    """sample.py --expert runs the base with that expert on every sample: its logits are the trained expert
    model's (1e-6), not the base's; it prints each sample under its header, continuing the prompt."""
    model, out = arith_run
    expert = f"--expert={os.path.join(out, 'arith.safetensors')}"
    loaded, _, _ = sample.load_model(parse_config(sample.SampleConfig, [f"--base={tiny_base}", expert]))
    x = tokens(vocab=257)
    with torch.no_grad():
        logits = loaded.eval()(x)[0]
        torch.testing.assert_close(logits, model(x)[0], atol=1e-6, rtol=0)
        set_route(model, None)
        assert (logits - model(x)[0]).abs().max() > 1e-4  # the base alone computes otherwise
        set_route(model, 0)
    result = sample.main([f"--base={tiny_base}", expert, "--prompt=12+34=", "--max_new_tokens=8", "--num_samples=2"])
    text = capsys.readouterr().out
    assert result.shape == (2, 7 + 8)  # the prompt, the newline sample.py ends it with, 8 new tokens
    assert text.count("--- prompt 1, sample") == 2
    assert text.count("12+34=") == 2
