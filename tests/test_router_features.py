"""The routers' per-token features (MoA(router_hidden=H), train_router.py's default): what a router computes, which
loss trains them, that bundles keep them (and older bundles load as the paper's linear routers), and that adding a
domain leaves them as they are. The paper's linear routers (router_hidden 0) are tests/test_moa.py's and
tests/test_adapt.py's; routers.json's description of them is in tests/test_export.py."""

import json

import pytest
import torch
import torch.nn.functional as F
from test_losses import moa_model as random_moa

import train_router
from batches import TaskData
from config import UserError
from conftest import bundle_and_addition
from evaluate import evaluate_tasks
from files import fingerprint, load_bundle, save_bundle
from moa import MoA
from model import GPT, GPTConfig
from storage import read_safetensors, write_safetensors

L, K, C, H = 3, 3, 16, 8  # blocks, experts, width, the routers' hidden units


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=24, vocab_size=40, n_layer=L, n_head=2, n_embd=C))


def moa_model(hidden=H, seed=0, window=1):
    """A MoA whose routers read the frozen base through per-token features (over `window` tokens), every weight random
    (LayerNorm's too)."""
    return random_moa(seed, router_input="base", router_hidden=hidden, router_window=window)


def batch(seed=1, B=6, T=10):
    """Token ids, next-token targets, labels and a prompt mask whose prompts differ in length (3 to 8 tokens)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(40, (B, T), generator=g)
    prompt = torch.arange(T)[None, :] < torch.tensor([3, 5, 8, 4, 6, 7])[:, None]
    return x, torch.roll(x, -1, 1), torch.arange(B) % K, prompt


def grads(moa, mode, eta):
    """Whether each parameter gets a non-zero gradient from one training step's loss in `mode` -> {name: bool}."""
    x, y, domain, prompt = batch()
    moa.zero_grad()
    moa.eta = eta
    moa(x, y, domain=domain, mode=mode, router_mask=prompt)[1].backward()
    return {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in moa.named_parameters()}


def test_a_router_reads_each_tokens_features_then_pools():
    """Router i's logits are W mean_prompt(gelu(W1 layer_norm(h) + b1)) + b over the frozen base's block-i hidden
    states h (1e-5): the features per token, then the pooling over the prompt; not the features of the pooled
    state, which differ here by more than 0.1."""
    moa = moa_model().eval()
    x, _, domain, prompt = batch()
    with torch.no_grad():
        moa(x, domain=domain, mode="label", router_mask=prompt)
        logits = moa.routing["logits"]  # (L, B, K)
        h, _ = moa.gpt.embed(x)
        m = prompt[..., None].float()
        for i, block in enumerate(moa.gpt.transformer.h):
            norm, linear, router = moa.router_features[i][0], moa.router_features[i][1], moa.routers[i]
            f = F.gelu(F.layer_norm(h, (C,), norm.weight, norm.bias, norm.eps) @ linear.weight.t() + linear.bias)
            expected = ((f * m).sum(1) / m.sum(1)) @ router.weight.t() + router.bias
            torch.testing.assert_close(logits[i], expected, rtol=0, atol=1e-5)
            pooled = (h * m).sum(1) / m.sum(1)
            wrong = F.gelu(
                F.layer_norm(pooled, (C,), norm.weight, norm.bias, norm.eps) @ linear.weight.t() + linear.bias
            )
            wrong = wrong @ router.weight.t() + router.bias
            assert (wrong - expected).abs().max() > 0.1
            h = block(h)  # no expert: the frozen base


def test_hidden_zero_is_the_papers_linear_router():
    """router_hidden 0: no feature parameters, each router one (K, C) linear map, the file holding the same tensors
    as before the option existed; a bundle whose metadata has no router_hidden (written before) loads as linear."""
    moa = moa_model(hidden=0)
    names = {n for n, _ in moa.named_parameters() if n.startswith("router")}
    assert names == {f"routers.{i}.{p}" for i in range(L) for p in ("weight", "bias")}
    assert moa.routers[0].weight.shape == (K, C)
    assert moa_model().routers[0].weight.shape == (K, H)


def test_router_hidden_must_be_a_count():
    """MoA(router_hidden=...) takes an integer >= 0, nothing else (not a bool, not a float or a string)."""
    for bad in (-1, 2.5, "8", True):
        with pytest.raises(UserError, match="router_hidden"):
            MoA(tiny_gpt(), ["a", "b"], router_hidden=bad)


def test_cls_loss_trains_the_features_and_the_lm_loss_never():
    """Mode label: L_LM (eta 0) reaches no router and no feature; L_cls (eta 1 minus eta 0) reaches every router and
    every feature parameter (LayerNorm's too) and, with the routers on the frozen base, no expert. Mode token: the
    per-token mixture reads the features, so L_LM reaches them."""
    moa = moa_model()
    lm = grads(moa, "label", 0.0)
    both = grads(moa, "label", 1.0)
    router_names = [n for n in lm if n.startswith("router")]
    assert len(router_names) == L * 6  # W, b; LayerNorm's weight and bias; W1, b1
    assert not any(lm[n] for n in router_names)
    assert all(both[n] for n in router_names)
    x, _, domain, prompt = batch()
    moa.zero_grad()
    logits = []
    hooks = [r.register_forward_hook(lambda mod, i, o: logits.append(o)) for r in moa.routers]
    moa(x, domain=domain, mode="label", router_mask=prompt)
    for hook in hooks:
        hook.remove()
    F.cross_entropy(torch.stack(logits).flatten(0, 1), domain.repeat(L)).backward()
    for n, p in moa.named_parameters():
        reached = p.grad is not None and bool(p.grad.abs().sum() > 0)
        assert reached == n.startswith("router"), n
    token = grads(moa, "token", 0.0)
    assert all(token[n] for n in router_names if n.startswith("router_features."))


def test_a_bundle_keeps_the_features(tmp_path):
    """save_bundle writes router_hidden and the feature tensors, load_bundle builds them: the same routing logits
    and outputs in mode last (1e-6)."""
    moa = moa_model().eval()
    path = str(tmp_path / "b.safetensors")
    save_bundle(path, moa, "bytes", fingerprint(moa))
    tensors, meta = read_safetensors(path)
    assert json.loads(meta["nanomoa"])["router_hidden"] == H
    assert tensors["router_features.0.1.weight"].shape == (H, C)
    loaded = load_bundle(path, tiny_gpt(), "bytes")[0].eval()
    assert loaded.router_hidden == H
    assert_routes_alike(loaded, moa)


def assert_routes_alike(loaded, moa):
    """A bundle's MoA and the one it was saved from give the same outputs and routing logits in mode last (1e-6)."""
    x = batch()[0]
    with torch.no_grad():
        out = moa(x, mode="last")[0], moa.routing["logits"]
        torch.testing.assert_close(loaded(x, mode="last")[0], out[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(loaded.routing["logits"], out[1], rtol=0, atol=1e-6)


def rewrite(path, tensors=None, **changes):
    """The bundle at path with its tensors replaced and metadata keys changed (None: removed)."""
    old, meta = read_safetensors(path)
    nanomoa = json.loads(meta["nanomoa"])
    for key, value in changes.items():
        if value is None:
            nanomoa.pop(key)
        else:
            nanomoa[key] = value
    write_safetensors(path, old if tensors is None else tensors, {"nanomoa": json.dumps(nanomoa)})


def test_older_bundles_load_as_linear_routers_and_lying_files_are_refused(tmp_path):
    """A linear bundle without the key (older files) loads as router_hidden 0; a bundle whose router_hidden does
    not match its tensors, that lacks a feature tensor, or has a router_hidden that is not a count is refused
    with an error naming what is wrong."""
    linear, path = moa_model(hidden=0), str(tmp_path / "old.safetensors")
    save_bundle(path, linear, "bytes", fingerprint(linear))
    rewrite(path, router_hidden=None)
    assert load_bundle(path, tiny_gpt(), "bytes")[0].router_hidden == 0
    moa = moa_model()
    good = str(tmp_path / "good.safetensors")
    save_bundle(good, moa, "bytes", fingerprint(moa))
    tensors = read_safetensors(good)[0]
    cases = [
        ({"router_hidden": 2 * H}, None, "its metadata says"),
        ({"router_hidden": None}, None, "does not hold"),
        ({}, {k: v for k, v in tensors.items() if k != "router_features.1.0.bias"}, "does not hold"),
        ({"router_hidden": -1}, None, "router_hidden"),
        ({"router_hidden": True}, None, "router_hidden"),
    ]
    for i, (changes, replaced, words) in enumerate(cases):
        path = str(tmp_path / f"bad{i}.safetensors")
        write_safetensors(path, tensors, read_safetensors(good)[1])
        rewrite(path, replaced, **changes)
        with pytest.raises(UserError, match=words.replace(".", r"\.")):
            load_bundle(path, tiny_gpt(), "bytes")


def test_adding_and_removing_a_domain_keep_the_features():
    """add_domain keeps every router's features (the same values) and its old rows; the new row starts at weight 0
    and the old biases' mean, so the old domains' logits are unchanged; removing it gives them back (0)."""
    moa = moa_model().eval()
    x = batch()[0]
    before = {n: p.clone() for n, p in moa.named_parameters() if n.startswith("router")}
    with torch.no_grad():
        moa(x, mode="layer")
        old_logits = moa.routing["logits"]
        moa.add_domain("d")
        moa(x, mode="layer")
        grown = moa.routing["logits"]
        moa.remove_domain("d")
        moa(x, mode="layer")
    torch.testing.assert_close(grown[..., :K], old_logits, rtol=0, atol=0)
    for i in range(L):
        torch.testing.assert_close(
            grown[i, :, K], torch.full_like(grown[i, :, K], before[f"routers.{i}.bias"].mean().item())
        )
    for n, p in moa.named_parameters():
        if n.startswith("router"):
            assert torch.equal(p, before[n]), n


@pytest.fixture(scope="module")
def mlp_bundle(tiny_data, tiny_base, tmp_path_factory):
    """arith and reverse experts (20 steps), then train_router.py's default routers (per-token features) over them,
    experts frozen; then count added (new row only) and added with every row retrained."""
    out = tmp_path_factory.mktemp("features")
    steps = ["--max_iters=150", "--eval_interval=150", "--warmup_iters=5"]
    moa, added, flags = bundle_and_addition(tiny_data, tiny_base, out, steps)
    bundle = str(out / "moa.safetensors")
    add_all = ["--add_domain=count", f"--bundle={bundle}", "--train_old_rows=True", "--name=allrows"]
    train_router.main(flags + steps + add_all)
    trainable = {n for n, p in added.named_parameters() if p.requires_grad}
    return {"moa": moa.eval(), "out": out, "bundle": bundle, "trainable": trainable, "data": tiny_data}


def test_train_router_defaults_to_features_that_route(mlp_bundle):
    """train_router.py's default routers have per-token features (64 units) and, trained 150 steps on the tiny
    base, route at least 95% of the validation prompts of arith and reverse right."""
    moa = mlp_bundle["moa"]
    assert moa.router_hidden == 64 and moa.routers[0].weight.shape == (2, 64)
    data = TaskData(mlp_bundle["data"], "arith,reverse")
    scores = evaluate_tasks(moa, data, 64, 16, generate=False, served=False, mode="last")
    assert scores["route_mean"] >= 0.95


def test_adding_a_domain_trains_the_new_row_and_keeps_the_features(mlp_bundle):
    """--add_domain trains only the routers' weights and biases (the new row: old rows and features bit for bit the
    bundle's); with --train_old_rows=True the features move too."""
    assert mlp_bundle["trainable"] == {f"routers.{i}.{p}" for i in range(2) for p in ("weight", "bias")}
    old = read_safetensors(mlp_bundle["bundle"])[0]
    new = read_safetensors(str(mlp_bundle["out"] / "moa+count.safetensors"))[0]
    allrows = read_safetensors(str(mlp_bundle["out"] / "allrows.safetensors"))[0]
    features = [n for n in old if n.startswith("router_features.")]
    assert len(features) == 2 * 4
    for n in features:
        assert torch.equal(new[n], old[n]), n
        assert not torch.equal(allrows[n], old[n]), n
    for i in range(2):
        assert torch.equal(new[f"routers.{i}.weight"][:2], old[f"routers.{i}.weight"])
        assert new[f"routers.{i}.weight"][2].abs().max() > 1e-3
