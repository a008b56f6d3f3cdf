"""The core's rules, each on a case computed by hand: data windows and balanced batches (trainer.CorpusData),
the learning-rate schedule's corners, the optimizer's decay groups, what one training step hands the optimizer
(the schedule's rate, the clipped and accumulated gradient), atomic writes under a failing writer, the
safetensors layout, the base fingerprint, and the evaluation metrics.

Everything runs on hand-made token streams and tiny models: no session fixture, no real training.
"""

import copy
import json
import math
import os
import struct
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from batches import Batch, CorpusData
from config import UserError
from evaluate import corpus_losses, per_sample_loss
from files import fingerprint
from moa import MoA, add_experts, lora_layers
from model import GPT, GPTConfig
from storage import atomic_write, read_safetensors, write_safetensors
from trainer import TrainConfig, learning_rate, make_optimizer, train


def write_data(folder, streams, vocab_size=257):
    """A prepared data folder written by hand: corpus streams {source: (train tokens, val tokens)}, laid out as
    data/prepare.py lays it out (corpus/<source>/{train,val}.bin as uint16, and meta.json)."""
    meta = {
        "tokenizer": "bytes",
        "vocab_size": vocab_size,
        "eot": vocab_size - 1,
        "held_back": [],
        "corpus": {},
        "tasks": {},
    }
    for name, (train_tokens, val_tokens) in streams.items():
        os.makedirs(folder / "corpus" / name)
        for split, tokens in (("train", train_tokens), ("val", val_tokens)):
            np.asarray(tokens, dtype=np.uint16).tofile(folder / "corpus" / name / f"{split}.bin")
        meta["corpus"][name] = {"train_tokens": len(train_tokens), "val_tokens": len(val_tokens)}
    (folder / "meta.json").write_text(json.dumps(meta))
    return str(folder)


def three_domains(folder, block_size=8):
    """Domains a, b, c whose token values tell where they come from: domain i's train stream is
    10000 (i + 1) + 0, 1, 2, ..., its val stream 10000 (i + 1) + 5000, 5001, ..."""
    streams = {
        name: (10000 * (i + 1) + np.arange(300), 10000 * (i + 1) + 5000 + np.arange(120))
        for i, name in enumerate("abc")
    }
    return CorpusData(write_data(folder, streams, vocab_size=2**16), "a,b,c", block_size)  # ids up to 35119


# ----------------------------------------------------------------------------------------------
# Data windows and batches


def test_windows_targets_are_the_inputs_shifted_by_one(tmp_path):
    """windows(starts) gives, for each start s, inputs tokens[s : s+T] and targets tokens[s+1 : s+T+1]: the
    target at every position is the stream's next token, up to the last valid start len - T - 1."""
    stream = 3 * np.arange(100) % 251  # token j of the stream is 3j mod 251
    data = CorpusData(write_data(tmp_path, {"a": (stream, stream[:50])}), "a", block_size=8)
    x, y = data.windows("a", "train", [0, 5, 91])
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (3, 8)
    for row, s in enumerate([0, 5, 91]):
        assert x[row].tolist() == [3 * (s + j) % 251 for j in range(8)]
        assert y[row].tolist() == [3 * (s + j + 1) % 251 for j in range(8)]


def test_batch_balances_domains_and_labels_each_window(tmp_path):
    """A batch of B windows over K domains holds each domain floor(B/K) or ceil(B/K) times, each label names the
    domain its window came from, each window comes from the requested split, and y is x shifted by one."""
    data = three_domains(tmp_path)
    for batch_size, seed in [(7, 0), (7, 1), (6, 2), (2, 3), (12, 4)]:
        for split, offset in (("train", 0), ("val", 5000)):
            b = data.batch(batch_size, seed, split)
            x, y, d, prompt = b.x, b.y, b.domain, b.prompt
            assert prompt is None  # corpus windows have no prompt
            assert x.shape == y.shape == (batch_size, 8) and d.shape == (batch_size,)
            counts = torch.bincount(d, minlength=3).tolist()
            assert sorted(counts) == sorted([batch_size // 3 + (i < batch_size % 3) for i in range(3)]), counts
            assert torch.equal(x // 10000 - 1, d[:, None].expand(-1, 8))  # the label is the window's domain
            start = x[:, 0] % 10000
            assert bool(((start >= offset) & (start < offset + 5000)).all()), split
            assert torch.equal(y, x + 1)


def test_batch_follows_its_seed(tmp_path):
    """The same seed gives the same batch, whatever the global RNG does; another seed another batch."""
    data = three_domains(tmp_path)
    torch.manual_seed(0)
    first = data.batch(8, 5)
    torch.manual_seed(1)
    again = data.batch(8, 5)
    other = data.batch(8, 6)
    for a, b in zip(first[:3], again[:3]):
        assert torch.equal(a, b)
    assert not torch.equal(first.x, other.x)


def test_eval_starts_are_fixed_and_reach_the_end(tmp_path):
    """eval_starts(name, n) is n starts spread evenly from 0 to the last valid start, len(val) - T - 1, the same
    on every call: a 120-token val split with T = 8 gives 0, 37, 74, 111 for n = 4."""
    data = three_domains(tmp_path)
    assert data.eval_starts("b", 4) == [0, 37, 74, 111]
    assert data.eval_starts("b", 4) == data.eval_starts("b", 4)
    x, y = data.windows("b", "val", [111])
    assert y[0, -1].item() == 20000 + 5000 + 119  # the last window's last target is the split's last token


# ----------------------------------------------------------------------------------------------
# Learning-rate schedule and optimizer

SCHEDULE = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=4, max_iters=20, lr_decay_iters=0)
HALF_AMPLITUDE = 0.45  # (learning_rate - min_lr) / 2


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 1 / 5),
        (1, 2 / 5),
        (3, 4 / 5),  # warmup: (step + 1) / (warmup + 1) of the rate, never 0
        (4, 1.0),  # the peak, where warmup ends
        (8, 0.1 + HALF_AMPLITUDE * (1 + math.sqrt(0.5))),  # a quarter into the cosine: cos(pi / 4)
        (12, 0.1 + HALF_AMPLITUDE),  # halfway: cos(pi / 2) = 0
        (20, 0.1),
        (25, 0.1),
        (1000, 0.1),  # at and after lr_decay_iters (here max_iters): min_lr
    ],
)
def test_schedule_corners(step, expected):
    """Linear warmup to learning_rate at warmup_iters, cosine to min_lr at lr_decay_iters (0: max_iters), then
    min_lr."""
    assert learning_rate(step, SCHEDULE) == pytest.approx(expected, abs=1e-12)


def test_schedule_decay_iters_and_no_warmup():
    """lr_decay_iters ends the cosine before max_iters (halfway at step 8 for warmup 4, decay 12, then min_lr);
    without warmup the first step runs at the full rate."""
    cfg = replace(SCHEDULE, lr_decay_iters=12)
    assert learning_rate(8, cfg) == pytest.approx(0.1 + HALF_AMPLITUDE, abs=1e-12)
    assert learning_rate(12, cfg) == learning_rate(16, cfg) == pytest.approx(0.1, abs=1e-12)
    assert learning_rate(0, replace(SCHEDULE, warmup_iters=0)) == pytest.approx(1.0, abs=1e-12)


def tiny_gpt(seed=0, **overrides):
    torch.manual_seed(seed)
    config = dict(block_size=8, vocab_size=11, n_layer=1, n_head=1, n_embd=8)
    return GPT(GPTConfig(**{**config, **overrides}))


def test_decay_groups_hold_matrices_only():
    """make_optimizer decays exactly the matrices (linear weights and embeddings), no bias and no LayerNorm
    parameter, leaves frozen parameters out, and uses the config's betas and weight decay."""
    model = tiny_gpt()
    model.transformer.ln_f.weight.requires_grad_(False)
    cfg = TrainConfig(weight_decay=0.25, beta1=0.8, beta2=0.95, learning_rate=0.5)
    optimizer = make_optimizer(model, cfg, "cpu")
    names = {id(p): n.removeprefix("transformer.") for n, p in model.named_parameters()}
    by_decay = {}
    for group in optimizer.param_groups:
        by_decay.setdefault(group["weight_decay"], set()).update(names[id(p)] for p in group["params"])
    block = "h.0."
    assert by_decay == {
        0.25: {
            "wte.weight",
            "wpe.weight",
            block + "attn.c_attn.weight",
            block + "attn.c_proj.weight",
            block + "mlp.c_fc.weight",
            block + "mlp.c_proj.weight",
        },
        0.0: {
            block + "ln_1.weight",
            block + "ln_1.bias",
            block + "attn.c_attn.bias",
            block + "attn.c_proj.bias",
            block + "ln_2.weight",
            block + "ln_2.bias",
            block + "mlp.c_fc.bias",
            block + "mlp.c_proj.bias",
            "ln_f.bias",
        },
    }  # ln_f.weight is frozen: in no group
    assert all(g["betas"] == (0.8, 0.95) and g["lr"] == 0.5 for g in optimizer.param_groups)


class FixedBatches:
    """Stands in for CorpusData: hands out the given batches in turn."""

    def __init__(self, batches):
        self.batches, self.calls = batches, 0

    def batch(self, batch_size, seed, split="train"):
        self.calls += 1
        return self.batches[(self.calls - 1) % len(self.batches)]


def random_batches(n, seed=0, B=4, T=8, vocab=11):
    g = torch.Generator().manual_seed(seed)
    return [
        Batch(
            torch.randint(vocab, (B, T), generator=g),
            torch.randint(vocab, (B, T), generator=g),
            torch.zeros(B, dtype=torch.long),
        )
        for _ in range(n)
    ]


def train_and_watch(tmp_path, model, batches, lr_scales=None, **overrides):
    """Runs trainer.train on `batches` and records, just before each optimizer step, every group's rate (by its
    lr_scale) and every parameter's gradient -> [(rates {lr_scale: lr}, grads {name: tensor})] per step."""
    settings = dict(
        out_dir=str(tmp_path / "run"),
        device="cpu",
        progress=False,
        batch_size=4,
        block_size=8,
        eval_interval=1000,
        warmup_iters=0,
    )
    cfg = TrainConfig(**{**settings, **overrides})
    names = {id(p): n for n, p in model.named_parameters()}
    seen = []

    def watch(optimizer, args, kwargs):
        rates = {g["lr_scale"]: g["lr"] for g in optimizer.param_groups}
        grads = {names[id(p)]: p.grad.clone() for g in optimizer.param_groups for p in g["params"]}
        seen.append((rates, grads))

    handle = register_optimizer_step_pre_hook(watch)
    try:
        train(cfg, model, FixedBatches(batches), lambda m: {}, lr_scales=lr_scales)
    finally:
        handle.remove()
    return seen


def mean_gradient(model, batches):
    """The plain-autograd gradient of the mean loss over the batches, on a copy of the model: {name: tensor}."""
    model = copy.deepcopy(model)
    for x, y, *_ in batches:
        (model(x, y)[1] / len(batches)).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def total_norm(grads):
    return math.sqrt(sum(float(g.double().square().sum()) for g in grads.values()))


def test_each_step_runs_at_the_scheduled_rate_times_its_scale(tmp_path):
    """The optimizer steps at learning_rate(step) for steps 0..4 (warmup 2, cosine to 0.1 at 5), and a group
    given an lr_scale at that rate times its scale."""
    seen = train_and_watch(
        tmp_path,
        tiny_gpt(),
        random_batches(1),
        lr_scales={"transformer.h.": 0.5},
        max_iters=5,
        warmup_iters=2,
        learning_rate=1.0,
        min_lr=0.1,
    )
    by_hand = [1 / 3, 2 / 3, 1.0, 0.1 + 0.45 * 1.5, 0.1 + 0.45 * 0.5]  # cosine 0, 1/3, 2/3 of the way: 1, 0.5, -0.5
    assert [rates[1.0] for rates, _ in seen] == pytest.approx(by_hand, abs=1e-12)
    assert [rates[0.5] for rates, _ in seen] == pytest.approx([r / 2 for r in by_hand], abs=1e-12)


@pytest.mark.parametrize("clip_ratio", [0.25, 4.0, 0.0])
def test_clipping_scales_the_total_gradient_norm(tmp_path, clip_ratio):
    """With grad_clip = c, the optimizer sees the gradient times min(1, c / its total norm over all parameters):
    scaled down to norm c when larger, unchanged when smaller; grad_clip = 0 never clips."""
    model = tiny_gpt()
    batches = random_batches(1)
    expected = mean_gradient(model, batches)
    norm = total_norm(expected)
    clip = clip_ratio * norm
    ((_, grads),) = train_and_watch(tmp_path, model, batches, max_iters=1, grad_clip=clip)
    factor = min(1.0, clip / norm) if clip else 1.0
    assert sorted(grads) == sorted(expected)
    for name, g in grads.items():
        torch.testing.assert_close(g, expected[name] * factor, atol=1e-7, rtol=1e-5, msg=name)
    assert total_norm(grads) == pytest.approx(min(clip, norm) if clip else norm, rel=1e-5)


def test_accumulation_averages_the_micro_batches(tmp_path):
    """With grad_accum = 3, one step's gradient is the mean of the three micro-batches' gradients."""
    model = tiny_gpt()
    batches = random_batches(3, seed=1)
    expected = mean_gradient(model, batches)
    ((_, grads),) = train_and_watch(tmp_path, model, batches, max_iters=1, grad_accum=3, grad_clip=0.0)
    for name, g in grads.items():
        torch.testing.assert_close(g, expected[name], atol=1e-7, rtol=1e-5, msg=name)


def test_each_step_starts_from_zero_gradients(tmp_path):
    """The gradient of step 2 is that batch's own gradient at the weights after step 1: nothing carries over."""
    model = tiny_gpt()
    batches = random_batches(2, seed=2)
    seen = train_and_watch(tmp_path, model, batches, max_iters=2, grad_clip=0.0, learning_rate=0.0, min_lr=0.0)
    expected = mean_gradient(model, batches[1:])  # lr 0: the weights never move
    for name, g in seen[1][1].items():
        torch.testing.assert_close(g, expected[name], atol=1e-7, rtol=1e-5, msg=name)


# ----------------------------------------------------------------------------------------------
# Files: atomic writes and the safetensors layout


def failing_writer(tmp):
    with open(tmp, "wb") as f:
        f.write(b"the first half of the new")
    raise OSError("disk full")


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    """A writer that fails half-way leaves the old file byte-identical and no temporary file, and its error
    reaches the caller as one line naming the file; a writer that succeeds replaces the file whole."""
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"old contents")
    with pytest.raises(UserError, match=f"cannot write {path}: disk full"):
        atomic_write(str(path), failing_writer)
    assert path.read_bytes() == b"old contents" and os.listdir(tmp_path) == ["ckpt.pt"]
    atomic_write(str(path), lambda tmp: open(tmp, "wb").write(b"new contents"))
    assert path.read_bytes() == b"new contents" and os.listdir(tmp_path) == ["ckpt.pt"]


def test_atomic_folder_write_keeps_the_old_folder_when_the_writer_fails(tmp_path):
    """With folder=True (how data/prepare.py writes a data set), a writer that fails half-way leaves the old
    folder's files byte-identical and no temporary folder; one that succeeds replaces the folder whole."""
    out = tmp_path / "data"
    out.mkdir()
    (out / "meta.json").write_text("old")

    def failing(tmp):
        with open(os.path.join(tmp, "train.bin"), "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(UserError, match="disk full"):
        atomic_write(str(out), failing, folder=True)
    assert os.listdir(tmp_path) == ["data"] and os.listdir(out) == ["meta.json"]
    atomic_write(str(out), lambda tmp: open(os.path.join(tmp, "new.bin"), "wb").write(b"x"), folder=True)
    assert os.listdir(tmp_path) == ["data"] and os.listdir(out) == ["new.bin"]


def test_safetensors_layout_read_by_hand(tmp_path):
    """write_safetensors writes an 8-byte little-endian header length, a JSON header padded so that the data
    starts 8-byte aligned, with each tensor's dtype name, shape and [start, end) byte range, the ranges tiling
    the data; each range holds the tensor's little-endian bytes; read_safetensors gives back every tensor."""
    tensors = {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.tensor([1, -2, 3], dtype=torch.int16),
        "h": torch.tensor([0.5, -2.0], dtype=torch.float16),
        "bf": torch.tensor([[1.5], [-3.0]], dtype=torch.bfloat16),
    }
    path = tmp_path / "t.safetensors"
    write_safetensors(path, tensors, {"note": "x"})
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert (8 + n) % 8 == 0
    header = json.loads(raw[8 : 8 + n])
    assert header.pop("__metadata__") == {"note": "x"}
    assert {k: (v["dtype"], v["shape"]) for k, v in header.items()} == {
        "a": ("F32", [2, 3]),
        "b": ("I16", [3]),
        "h": ("F16", [2]),
        "bf": ("BF16", [2, 1]),
    }
    ranges = sorted(v["data_offsets"] for v in header.values())
    assert ranges[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])) and ranges[-1][1] == 38
    data = raw[8 + n :]
    assert len(data) == 38
    part = {k: data[v["data_offsets"][0] : v["data_offsets"][1]] for k, v in header.items()}
    assert part["a"] == np.arange(6, dtype="<f4").tobytes() and part["b"] == np.array([1, -2, 3], "<i2").tobytes()
    assert part["h"] == np.array([0.5, -2.0], "<f2").tobytes()
    assert part["bf"] == bytes([0xC0, 0x3F, 0x40, 0xC0])  # bfloat16 1.5 = 0x3FC0, -3.0 = 0xC040, little-endian
    loaded, metadata = read_safetensors(path)
    assert metadata == {"note": "x"}
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype
        torch.testing.assert_close(loaded[name], t, atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------
# The base fingerprint


def random_base(seed=0):
    torch.manual_seed(seed)
    gpt = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=16))
    with torch.no_grad():
        for p in gpt.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return gpt


@pytest.mark.parametrize(
    "name",
    [
        "transformer.wte.weight",
        "transformer.wpe.weight",  # token and position embeddings
        "transformer.h.1.attn.c_attn.weight",
        "transformer.h.0.mlp.c_proj.weight",  # weights
        "transformer.h.1.attn.c_attn.bias",
        "transformer.h.0.mlp.c_fc.bias",  # biases
        "transformer.h.0.ln_1.weight",
        "transformer.h.1.ln_2.bias",  # LayerNorm gains and biases
        "transformer.ln_f.weight",
        "transformer.ln_f.bias",
    ],
)
def test_fingerprint_changes_with_any_base_tensor(name):
    """Changing one value of any single base tensor (an embedding, a weight, a bias, a LayerNorm gain or bias)
    changes the fingerprint, so an expert never loads onto a base that differs from its own."""
    gpt = random_base()
    before = fingerprint(gpt)
    assert fingerprint(random_base()) == before  # the same weights, built again: the same fingerprint
    with torch.no_grad():
        t = dict(gpt.named_parameters())[name]
        t.view(-1)[t.numel() // 2 + 1] += 1e-3  # one value, away from the start of the tensor
    assert fingerprint(gpt) != before


def test_fingerprint_ignores_experts_and_knows_the_config():
    """Adding experts, changing their weights, or wrapping the base in a MoA leaves the fingerprint as it was;
    the same weights under another config (n_head) give another fingerprint."""
    gpt = random_base()
    before = fingerprint(gpt)
    add_experts(gpt, n_experts=2, rank=4)
    assert fingerprint(gpt) == before
    with torch.no_grad():
        for layer in lora_layers(gpt):
            layer.lora_B[1].normal_()
    assert fingerprint(gpt) == before
    assert fingerprint(MoA(random_base(), ["a", "b"], rank=4)) == before
    other = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=4, n_embd=16))
    other.load_state_dict(random_base().state_dict())
    assert fingerprint(other)["sha256"] == before["sha256"] and fingerprint(other) != before


# ----------------------------------------------------------------------------------------------
# Evaluation metrics


def test_per_sample_loss_by_hand():
    """per_sample_loss is, for each sequence, the mean over its tokens of -log p(target): logits built so that
    each target's probability is known (B = 2, T = 3)."""
    p_target = torch.tensor([[0.5, 0.25, 0.125], [0.9, 0.5, 0.1]])  # (B, T)
    y = torch.tensor([[0, 3, 1], [2, 2, 0]])
    probs = ((1 - p_target) / 3)[..., None].expand(2, 3, 4).clone()  # the other 3 tokens share the rest
    probs.scatter_(2, y[..., None], p_target[..., None])
    loss = per_sample_loss(probs.log(), y)
    expected = torch.tensor([2 * math.log(2), -(math.log(0.9) + math.log(0.5) + math.log(0.1)) / 3])
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=0)


def test_corpus_losses_average_every_window_once(tmp_path):
    """corpus_losses gives each source the mean per-sample loss over its n fixed windows (in batches of any size,
    the last one short), each window counted once, and val_mean is the mean over sources."""
    streams = {"a": (np.arange(200), np.arange(120)), "b": (np.arange(200), 100 + np.arange(120))}
    data = CorpusData(write_data(tmp_path, streams), "a,b", block_size=8)
    model = tiny_gpt(vocab_size=257).eval()
    out = corpus_losses(model, data, n_windows=5, batch_size=2)
    starts = [0, 27, 55, 83, 111]  # linspace(0, 111, 5), truncated
    assert data.eval_starts("a", 5) == starts
    with torch.no_grad():
        for name in ("a", "b"):
            x, y = data.windows(name, "val", starts)
            assert out[f"val/{name}"] == pytest.approx(per_sample_loss(model(x)[0], y).mean().item(), abs=1e-6)
    assert out["val_mean"] == pytest.approx((out["val/a"] + out["val/b"]) / 2, abs=1e-12)
    assert out["val/a"] != pytest.approx(out["val/b"], abs=1e-4)  # the sources' windows differ
