"""Routers whose per-token features read a window of tokens (MoA(router_window=W), train_router.py --router_window):
what a router computes, that it never reads a later token or padding (so prefill, training and any padding agree),
which loss reaches the window's weights, that bundles keep it, and the errors. Window 1 is
tests/test_router_features.py's router."""

import json

import pytest
import torch
import torch.nn.functional as F
from test_router_features import C, H, L, assert_routes_alike, batch, grads, moa_model, rewrite, tiny_gpt

import train_router
from batches import TaskData
from config import UserError, parse_config
from evaluate import evaluate_tasks, left_pad
from files import fingerprint, load_bundle, save_bundle
from moa import MoA
from storage import read_safetensors, write_safetensors

W = 3


def window_moa(seed=0):
    """test_router_features.moa_model, every weight random, its routers' features over W tokens."""
    return moa_model(seed=seed, window=W)


def test_a_router_reads_each_token_and_the_ones_before_it():
    """Router i's logits are R mean_prompt(gelu(W1 [n(h_t); n(h_t-1); n(h_t-2)] + b1)) + b, n the LayerNorm, over
    the frozen base's hidden states, a state outside the prompt counting as zeros (1e-5, one token at a time); the
    window's first C columns alone (each token by itself) differ by more than 0.1."""
    moa = window_moa().eval()
    x, _, domain, prompt = batch()
    with torch.no_grad():
        moa(x, domain=domain, mode="label", router_mask=prompt)
        logits = moa.routing["logits"]
        h, _ = moa.gpt.embed(x)
        B, T = x.shape
        m = prompt[..., None].float()
        for i, block in enumerate(moa.gpt.transformer.h):
            norm, linear, router = moa.router_features[i][0], moa.router_features[i][1], moa.routers[i]
            n = F.layer_norm(h, (C,), norm.weight, norm.bias, norm.eps) * m
            f = torch.zeros(B, T, H)
            for t in range(T):
                v = torch.cat([n[:, t - j] if t - j >= 0 else torch.zeros(B, C) for j in range(W)], -1)
                f[:, t] = F.gelu(v @ linear.weight.t() + linear.bias)
            expected = ((f * m).sum(1) / m.sum(1)) @ router.weight.t() + router.bias
            torch.testing.assert_close(logits[i], expected, rtol=0, atol=1e-5)
            alone = F.gelu(n @ linear.weight[:, :C].t() + linear.bias)
            wrong = ((alone * m).sum(1) / m.sum(1)) @ router.weight.t() + router.bias
            assert (wrong - expected).abs().max() > 0.1
            h = block(h)


def test_the_window_never_reads_a_later_token_or_padding():
    """Changing the tokens after the prompt leaves the routers' logits as they were (exactly): the window looks
    back only, so training (prompt + response) and prefill (prompt) read the same. A prompt left-padded beside a
    longer one gets the logits it gets alone (1e-5): the padding before it is read as zeros."""
    moa = window_moa().eval()
    x, _, domain, prompt = batch()
    changed = torch.where(prompt, x, (x + 7) % 40)
    with torch.no_grad():
        moa(x, mode="last", router_mask=prompt)
        before = moa.routing["logits"]
        moa(changed, mode="last", router_mask=prompt)
        torch.testing.assert_close(moa.routing["logits"], before, rtol=0, atol=0)
        short, long = x[0, :3].tolist(), x[2, :8].tolist()
        idx, mask = left_pad([short, long], 39)
        moa(idx, pad_mask=mask, mode="last")
        together = moa.routing["logits"][:, 0]
        moa(torch.tensor([short]), mode="last")
        torch.testing.assert_close(together, moa.routing["logits"][:, 0], rtol=0, atol=1e-5)


def test_l_cls_reaches_the_whole_window():
    """In mode label, L_cls gives every router's feature map a gradient in each of the window's W blocks of
    columns (the tokens before, too); L_LM reaches no router."""
    moa = window_moa()
    x, y, domain, prompt = batch()
    moa.zero_grad()
    moa(x, y, domain=domain, mode="label", router_mask=prompt)[1].backward()
    for i in range(L):
        g = moa.router_features[i][1].weight.grad.view(H, W, C)
        assert (g.abs().sum((0, 2)) > 0).all(), i
    reached = grads(moa, "label", 0.0)
    assert not any(v for n, v in reached.items() if n.startswith("router"))


def test_a_bundle_keeps_the_window(tmp_path):
    """save_bundle writes router_window and (H, W C) feature maps, load_bundle builds them: the same logits and
    outputs (1e-6). A bundle without the key (older files) loads as window 1; one whose window does not match its
    tensors, or is not a count, is refused."""
    moa = window_moa().eval()
    path = str(tmp_path / "w.safetensors")
    save_bundle(path, moa, "bytes", fingerprint(moa))
    tensors, meta = read_safetensors(path)
    assert json.loads(meta["nanomoa"])["router_window"] == W
    assert tensors["router_features.0.1.weight"].shape == (H, W * C)
    loaded = load_bundle(path, tiny_gpt(), "bytes")[0].eval()
    assert loaded.router_window == W
    assert_routes_alike(loaded, moa)
    one = moa_model()
    older = str(tmp_path / "older.safetensors")
    save_bundle(older, one, "bytes", fingerprint(one))
    rewrite(older, router_window=None)
    assert load_bundle(older, tiny_gpt(), "bytes")[0].router_window == 1
    for i, (value, words) in enumerate([(2, "its metadata says"), (None, "its metadata says"), (0, "router_window")]):
        bad = str(tmp_path / f"bad{i}.safetensors")
        write_safetensors(bad, tensors, meta)
        rewrite(bad, router_window=value)
        with pytest.raises(UserError, match=words):
            load_bundle(bad, tiny_gpt(), "bytes")


def test_what_a_window_needs():
    """router_window is a count; a window needs per-token features; routing per token (mode token) refuses it in
    MoA. train_router.py's --router_window (3 by default) is 1 for the paper's linear routers and for mode token,
    and what it says elsewhere."""
    for bad in (0, True, 2.5, "3"):
        with pytest.raises(UserError, match="router_window"):
            MoA(tiny_gpt(), ["a", "b"], router_hidden=H, router_window=bad)
    with pytest.raises(UserError, match="router_hidden"):
        MoA(tiny_gpt(), ["a", "b"], router_window=2)
    with pytest.raises(UserError, match="token"):
        window_moa()(batch()[0], mode="token")
    assert train_router.RouterConfig.router_window == 3
    for flags, want in (([], 3), (["--mode=layer"], 3), (["--router_window=5"], 5), (["--router_window=1"], 1)):
        assert train_router.window(parse_config(train_router.RouterConfig, flags)) == want, flags
    for flags in (["--mode=token", "--eta=0"], ["--router_hidden=0"], ["--router_window=4", "--mode=token"]):
        assert train_router.window(parse_config(train_router.RouterConfig, flags)) == 1, flags
    with pytest.raises(UserError, match="router_window"):
        train_router.main(["--router_window=0"])


def test_train_router_trains_a_window_that_routes(tiny_data, tiny_base, tmp_path):
    """train_router.py --router_window=3 over two tiny experts (routers only, 150 steps): the bundle says its
    window, routes at least 95% of the validation prompts of arith and reverse right, and takes a new domain with
    its features kept bit for bit."""
    from conftest import bundle_and_addition

    steps = ["--max_iters=150", "--eval_interval=150", "--warmup_iters=5", "--router_window=3"]
    moa, added, _ = bundle_and_addition(tiny_data, tiny_base, tmp_path, steps)
    assert moa.router_window == 3 and added.router_window == 3
    scores = evaluate_tasks(moa.eval(), TaskData(tiny_data, "arith,reverse"), 64, 16, generate=False, mode="last")
    assert scores["route_mean"] >= 0.95
    old = read_safetensors(str(tmp_path / "moa.safetensors"))[0]
    new = read_safetensors(str(tmp_path / "moa+count.safetensors"))[0]
    for n in (n for n in old if n.startswith("router_features.")):
        assert torch.equal(new[n], old[n]), n
