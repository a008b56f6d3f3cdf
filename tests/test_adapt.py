"""Adding and removing domains of a trained bundle (train_router.py --add_domain / --remove_domain), and training
one on (--init_bundle).

One module fixture trains stage-1 arith, reverse and count experts and a bundle over arith and reverse
(the two domains a tiny router tells apart, see test_moa.py), then adds the held-back count domain.
"""

import os
import shutil

import pytest
import torch

import train_lora
import train_router
from batches import TaskData
from config import UserError
from conftest import TASK_FLAGS, assert_one_line_error, bundle_and_addition, run_script
from evaluate import evaluate_tasks, left_pad
from files import load_base, load_bundle, read_meta
from moa import MoA, lora_layers
from model import GPT, GPTConfig
from storage import read_safetensors

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# --fast=False: the graded tests run the plain method (the student's code); tests/test_fast.py checks fast.py
COMMON = TASK_FLAGS
ROUTER = [
    "--learning_rate=0.1",
    "--router_lr=0.1",
    "--router_input=block",
    "--router_hidden=0",  # the paper's linear routers, as assignment 5 has them (test_router_features.py: the MLP's)
    "--min_lr=0.01",
    "--warmup_iters=5",
    "--max_iters=200",
    "--eval_interval=200",
    "--schedule=cosine",
]


@pytest.fixture(scope="module")
def adapted(tiny_data, tiny_base, tmp_path_factory):
    """Paths: the bundle over arith, reverse ("bundle"), it + count ("added"), the experts folder, the common flags;
    and what trained in the add ("trainable")."""
    out = tmp_path_factory.mktemp("adapt")
    _, moa, flags = bundle_and_addition(tiny_data, tiny_base, out, ROUTER)
    bundle = str(out / "moa.safetensors")
    return {
        "trainable": trainable(moa),
        "bundle": bundle,
        "added": str(out / "moa+count.safetensors"),
        "experts": str(out / "experts"),
        "flags": flags,
        "out": out,
    }


def trainable(moa):
    """The names of the parameters of moa that train."""
    return {name for name, p in moa.named_parameters() if p.requires_grad}


def new_expert_names(moa):
    """The names of the added expert's tensors (its slot is the last)."""
    slot = str(len(moa.domains) - 1)
    return {name for name, _ in moa.named_parameters() if "lora_" in name and name.rsplit(".", 1)[1] == slot}


def expert_tensors_of(path):
    """{name: tensor} of every expert tensor in a bundle file."""
    return {name: t for name, t in read_safetensors(path)[0].items() if "lora_" in name}


def logits(bundle, tiny_base, mode, domain=None):
    """A bundle's logits on two left-padded prompts (arith, reverse) in routing mode `mode`."""
    base, tokenizer = load_base(tiny_base)
    moa, _ = load_bundle(bundle, base, tokenizer)
    rows = [list(b"What is 31 plus 8?\n"), list(b"Reverse the word table.\n")]
    idx, mask = left_pad(rows, 256)
    with torch.no_grad():
        return moa.eval()(idx, pad_mask=mask, domain=domain, mode=mode)[0]


@pytest.mark.assignment5
def test_add_domain_grows_every_expert_and_router():
    """MoA.add_domain keeps every old expert and router row bit-identical and adds an expert with B = 0 (so label 2
    gives the base's logits) and a router row with zero weights and the old biases' mean (1e-6)."""
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=16)).eval()
    idx = torch.randint(50, (3, 10))
    base_logits, _ = gpt(idx)
    moa = MoA(gpt, ["a", "b"], rank=4)
    for p in moa.parameters():
        if p.requires_grad:  # experts and routers
            torch.nn.init.normal_(p)
    before = [(list(layer.lora_A), list(layer.lora_B)) for layer in lora_layers(moa)]
    routers = [(r.weight.clone(), r.bias.clone()) for r in moa.routers]
    old_labels = torch.tensor([1, 0, 1])
    with torch.no_grad():
        old_logits, _ = moa(idx, domain=old_labels, mode="label")
    moa.add_domain("c")
    assert moa.domains == ["a", "b", "c"]
    for layer, (A, B) in zip(lora_layers(moa), before):
        assert len(layer.lora_A) == len(layer.lora_B) == 3
        for k in (0, 1):
            assert torch.equal(layer.lora_A[k], A[k]) and torch.equal(layer.lora_B[k], B[k])
        assert layer.lora_A[2].shape == A[0].shape and layer.lora_A[2].abs().max() > 0
        assert layer.lora_B[2].shape == B[0].shape and not layer.lora_B[2].any()
    x = torch.randn(5, 16)
    for r, (w, b) in zip(moa.routers, routers):
        assert torch.equal(r.weight[:2], w) and torch.equal(r.bias[:2], b)
        torch.testing.assert_close(r(x)[:, 2], b.mean().expand(5), rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(moa(idx, domain=old_labels, mode="label")[0], old_logits, rtol=0, atol=1e-6)
        torch.testing.assert_close(
            moa(idx, domain=torch.full((3,), 2), mode="label")[0], base_logits, rtol=0, atol=1e-6
        )


@pytest.mark.assignment5
@pytest.mark.parametrize("domains, gone", [("abc", "b"), ("abcd", "a"), ("abcd", "d")])
def test_remove_domain_drops_one_expert_and_router_row(domains, gone):
    """MoA.remove_domain keeps the other experts and router rows in their order, whichever domain goes: the middle
    of 3, the first of 4 (where moving the last one into the gap would reorder them) and the last (regression: it
    used `del` on an nn.ParameterList, which has none)."""
    torch.manual_seed(0)
    moa = MoA(GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=16)), list(domains), rank=4)
    for p in moa.parameters():
        torch.nn.init.normal_(p)
    before = [(list(layer.lora_A), list(layer.lora_B)) for layer in lora_layers(moa)]
    routers = [(r.weight.clone(), r.bias.clone()) for r in moa.routers]
    keep = [i for i, d in enumerate(domains) if d != gone]
    moa.remove_domain(gone)
    assert moa.domains == [d for d in domains if d != gone]
    for layer, (A, B) in zip(lora_layers(moa), before):
        assert len(layer.lora_A) == len(layer.lora_B) == len(keep)
        for j, i in enumerate(keep):
            assert torch.equal(layer.lora_A[j], A[i]) and torch.equal(layer.lora_B[j], B[i])
    for r, (w, b) in zip(moa.routers, routers):
        assert torch.equal(r.weight, w[keep]) and torch.equal(r.bias, b[keep])


@pytest.mark.assignment5
def test_add_and_remove_domain_keep_the_models_device():
    """add_domain and remove_domain make the new routers on the model's device, not the default one: on a MoA whose
    parameters live on the "meta" device (shapes without data, on any machine), every parameter stays there."""
    with torch.device("meta"):
        gpt = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=16))
    moa = MoA(gpt, ["a", "b"], rank=4)
    for change, name in ((moa.add_domain, "c"), (moa.remove_domain, "a")):
        try:
            change(name)
        except NotImplementedError as e:
            if "meta" not in str(e):
                raise
            pytest.fail(f"{change.__name__} copied the model's meta tensors into a tensor made elsewhere: {e}")
        assert {p.device.type for p in moa.parameters()} == {"meta"}, change.__name__
    assert moa.domains == ["b", "c"] and [tuple(r.weight.shape) for r in moa.routers] == [(2, 16)] * 2


@pytest.mark.assignment5
def test_adding_a_domain_keeps_old_experts_bit_identical(adapted):
    """After --add_domain, the old experts' tensors equal the original bundle's bit for bit, and the new one is the
    stage-1 expert."""
    old, new = expert_tensors_of(adapted["bundle"]), expert_tensors_of(adapted["added"])
    assert len(new) == len(old) * 3 // 2
    for name, t in old.items():
        assert torch.equal(new[name], t), name
    count_expert = read_safetensors(os.path.join(adapted["experts"], "count.safetensors"))[0]
    for name, t in count_expert.items():  # "transformer.h.0.attn.c_attn.lora_A" -> slot 2 of the bundle
        assert torch.equal(new[f"gpt.{name}.2"], t), name


@pytest.mark.assignment5
def test_adding_a_domain_trains_only_the_new_router_row(adapted):
    """After --add_domain only the routers train (their old rows bit for bit the original bundle's) and the new row
    learns, weights and bias (the weights are no longer zero, the bias no longer the old biases' mean); with
    --train_old_rows=True the old rows move too."""
    old, new = read_safetensors(adapted["bundle"])[0], read_safetensors(adapted["added"])[0]
    train_router.main(
        adapted["flags"]
        + ROUTER
        + ["--add_domain=count", f"--bundle={adapted['bundle']}", "--train_old_rows=True", "--name=allrows"]
    )
    allrows = read_safetensors(str(adapted["out"] / "allrows.safetensors"))[0]
    names = [n for n in old if n.startswith("routers.")]
    assert len(names) == 2 * 2  # weight and bias of 2 routers (tiny base: 2 layers)
    for name in names:
        assert new[name].shape[0] == old[name].shape[0] + 1
        assert torch.equal(new[name][:2], old[name]), name
        assert not torch.equal(allrows[name][:2], old[name]), name
    for i in range(2):
        assert new[f"routers.{i}.weight"][2].abs().max() > 1e-3
        assert abs(new[f"routers.{i}.bias"][2] - old[f"routers.{i}.bias"].mean()) > 1e-3
    assert adapted["trainable"] == {f"routers.{i}.{p}" for i in range(2) for p in ("weight", "bias")}


@pytest.mark.assignment5
def test_train_new_expert_tunes_the_new_expert_only(adapted):
    """With --train_new_expert the added domain's expert trains with the routers, every one of its tensors moving
    away from its stage-1 file, while every old expert stays bit-identical; without it (the default) the new expert
    is exactly its stage-1 file."""
    moa, _ = train_router.main(
        adapted["flags"]
        + ROUTER
        + ["--add_domain=count", f"--bundle={adapted['bundle']}", "--train_new_expert=True", "--name=tuned"]
    )
    old, tuned = expert_tensors_of(adapted["bundle"]), expert_tensors_of(str(adapted["out"] / "tuned.safetensors"))
    for name, t in old.items():
        assert torch.equal(tuned[name], t), name
    stage1 = read_safetensors(os.path.join(adapted["experts"], "count.safetensors"))[0]
    moved = min((tuned[f"gpt.{name}.2"] - t).abs().max().item() for name, t in stage1.items())
    assert moved > 1e-3
    assert trainable(moa) == adapted["trainable"] | new_expert_names(moa)
    default = expert_tensors_of(adapted["added"])
    assert all(torch.equal(default[f"gpt.{name}.2"], t) for name, t in stage1.items())


def test_add_domain_with_weight_decay_on_frozen_rows_is_an_error(adapted):
    """Weight decay would shrink the frozen old router rows, so --add_domain with --weight_decay > 0 is a UserError."""
    with pytest.raises(UserError, match="--weight_decay would shrink the frozen old router rows"):
        train_router.main(
            adapted["flags"]
            + ["--add_domain=count", f"--bundle={adapted['bundle']}", "--weight_decay=0.1", "--name=decayed"]
        )


@pytest.mark.assignment5
def test_old_domains_still_routed_after_adding(adapted, tiny_data, tiny_base):
    """After adding count, the routers send the validation prompts of arith and reverse to their own expert nearly as
    often as before the add (the new row, trained on replay, claims at most 8 points of them on this tiny base), and
    more than 85% of the time."""
    base, tokenizer = load_base(tiny_base)
    rates = []
    for path, domains in ((adapted["bundle"], ["arith", "reverse"]), (adapted["added"], ["arith", "reverse", "count"])):
        moa, _ = load_bundle(path, load_base(tiny_base)[0], tokenizer)
        assert moa.domains == domains
        result = evaluate_tasks(
            moa.eval(), TaskData(tiny_data, ",".join(domains)), 64, 32, generate=False, served=False, mode="last"
        )
        rates.append((result["route/arith"], result["route/reverse"]))
    (arith, reverse), (arith_after, reverse_after) = rates
    assert arith_after >= arith - 0.08 and reverse_after >= reverse - 0.08, rates
    assert min(arith_after, reverse_after) > 0.85, rates


@pytest.mark.assignment5
def test_add_then_remove_without_training_restores_the_bundle(adapted, tiny_base):
    """Adding count with 0 training steps and removing it again gives the original bundle: equal tensors, equal
    logits."""
    flags = adapted["flags"]
    train_router.main(flags + ["--max_iters=0", "--add_domain=count", f"--bundle={adapted['bundle']}", "--name=zero"])
    train_router.main(
        flags + ["--remove_domain=count", f"--bundle={adapted['out'] / 'zero.safetensors'}", "--name=back"]
    )
    original, back = (
        read_safetensors(adapted["bundle"])[0],
        read_safetensors(str(adapted["out"] / "back.safetensors"))[0],
    )
    assert set(back) == set(original)
    for name, t in original.items():
        assert torch.equal(back[name], t), name
    torch.testing.assert_close(
        logits(str(adapted["out"] / "back.safetensors"), tiny_base, "layer"),
        logits(adapted["bundle"], tiny_base, "layer"),
        rtol=0,
        atol=0,
    )


@pytest.mark.assignment5
def test_add_trained_then_remove_gives_back_the_bundle(adapted, tiny_base):
    """Removing the added domain from the trained bundle gives the original bundle bit for bit (experts and router
    rows: the add trained only the new row), and so the same routed and label-mode logits."""
    moa, _ = train_router.main(adapted["flags"] + ["--remove_domain=count", f"--bundle={adapted['added']}"])
    assert moa.domains == ["arith", "reverse"]
    removed = str(adapted["out"] / "moa+count-count.safetensors")
    original, back = read_safetensors(adapted["bundle"])[0], read_safetensors(removed)[0]
    assert set(back) == set(original)
    for name, t in original.items():
        assert torch.equal(back[name], t), name
    labels = torch.tensor([0, 1])
    torch.testing.assert_close(
        logits(removed, tiny_base, "label", labels),
        logits(adapted["bundle"], tiny_base, "label", labels),
        rtol=0,
        atol=0,
    )
    torch.testing.assert_close(
        logits(removed, tiny_base, "layer"), logits(adapted["bundle"], tiny_base, "layer"), rtol=0, atol=0
    )


@pytest.mark.assignment5
def test_adding_twice_chains_k_to_k_plus_2(adapted, tiny_data, tiny_base):
    """A second add (upper onto arith, reverse + count) keeps all three earlier experts and router rows
    bit-identical."""
    out = adapted["out"]
    train_lora.main(
        COMMON
        + [
            f"--data_dir={tiny_data}",
            f"--base={tiny_base}",
            f"--out_dir={out / 'experts'}",
            "--domain=upper",
            "--max_iters=5",
            "--eval_interval=5",
            "--warmup_iters=2",
        ]
    )
    moa, _ = train_router.main(
        adapted["flags"] + ROUTER + ["--max_iters=10", "--add_domain=upper", f"--bundle={adapted['added']}"]
    )
    assert moa.domains == ["arith", "reverse", "count", "upper"]
    before, after = read_safetensors(adapted["added"])[0], read_safetensors(str(out / "moa+count+upper.safetensors"))[0]
    for name, t in before.items():
        kept = after[name][:3] if name.startswith("routers.") else after[name]  # expert tensors are per slot
        assert torch.equal(kept, t), name


def test_adding_an_existing_domain_is_an_error(adapted):
    """--add_domain with a name the bundle already has is a UserError that lists the bundle's domains."""
    with pytest.raises(UserError, match="'arith' is already in the bundle"):
        train_router.main(adapted["flags"] + ["--add_domain=arith", f"--bundle={adapted['bundle']}", "--name=again"])


def test_adding_a_domain_without_expert_or_data_is_an_error(adapted, tmp_path):
    """--add_domain of a domain without an expert file says to train it with train_lora.py; with an expert but no
    data it names the prepared domains."""
    with pytest.raises(UserError, match=r"train the expert first, `python train_lora.py --domain=klingon`"):
        train_router.main(adapted["flags"] + ["--add_domain=klingon", f"--bundle={adapted['bundle']}"])
    experts = tmp_path / "experts"
    shutil.copytree(adapted["experts"], experts)
    shutil.copy(experts / "count.safetensors", experts / "klingon.safetensors")
    with pytest.raises(UserError, match="unknown domain 'klingon'; prepared"):
        train_router.main(
            adapted["flags"] + ["--add_domain=klingon", f"--bundle={adapted['bundle']}", f"--experts={experts}"]
        )


def test_add_domain_without_bundle_cli_error(tiny_data, tiny_base, tmp_path):
    """train_router.py --add_domain without --bundle exits 1 with one stderr line starting "error:" and no traceback."""
    proc = run_script(
        "train_router.py",
        "--add_domain=count",
        f"--data_dir={tiny_data}",
        f"--base={tiny_base}",
        f"--out_dir={tmp_path}",
    )
    assert_one_line_error(proc, "--bundle")


@pytest.fixture(scope="module")
def naive(tiny_data, tiny_base, tmp_path_factory):
    """MoE-LoRA naive over arith and reverse (random experts mixed per token, top 2, no label loss), 4 steps ->
    (its path, the flags to train it on with)."""
    out = tmp_path_factory.mktemp("naive")
    flags = COMMON + [f"--data_dir={tiny_data}", f"--base={tiny_base}", f"--experts={out}", f"--out_dir={out}"]
    flags += ["--domains=arith,reverse", "--mode=token", "--eta=0", "--max_iters=4", "--eval_interval=4"]
    train_router.main(flags + ["--expert_init=random", "--name=naive"])
    return str(out / "naive.safetensors"), flags


def moved(before, after):
    """The tensors of a bundle file that changed from another's, split into (experts, routers)."""
    a, b = read_safetensors(before)[0], read_safetensors(after)[0]
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    return {k for k in changed if "lora_" in k}, {k for k in changed if "lora_" not in k}


def test_init_bundle_goes_on_from_the_bundles_weights_and_settings(naive):
    """--init_bundle starts from the bundle: at a learning rate of 1e-9 its weights come out as they went in; the
    new bundle keeps the old one's settings (random experts, top 2, though this run says top 1) and counts its
    records on from the old one's."""
    path, flags = naive
    train_router.main(flags + [f"--init_bundle={path}", "--learning_rate=1e-9", "--router_lr=1e-9", "--top_k=1"])
    after = path.replace("naive.safetensors", "naive_continued.safetensors")  # the default name
    a, b = read_safetensors(path)[0], read_safetensors(after)[0]
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    old, new = read_meta(path, "bundle")[1], read_meta(after, "bundle")[1]
    assert (new["expert_init"], new["top_k"], new["mode"], new["steps"]) == ("random", 2, "token", 4)
    assert new["samples"] == old["samples"] + 4 * 8 > 4 * 8


@pytest.mark.parametrize("train_experts, trains_experts", [("True", True), ("False", False)])
def test_init_bundle_trains_its_experts_and_routers_on(naive, train_experts, trains_experts):
    """Trained on at a real rate, every router tensor moves, and every expert tensor unless --train_experts=False
    (then none does)."""
    path, flags = naive
    name = f"on_{train_experts}"
    train_router.main(
        flags + [f"--init_bundle={path}", "--learning_rate=0.01", f"--train_experts={train_experts}", f"--name={name}"]
    )
    experts, routers = moved(path, path.replace("naive.safetensors", f"{name}.safetensors"))
    tensors = read_safetensors(path)[0]
    assert routers == {k for k in tensors if "lora_" not in k} and routers
    assert experts == ({k for k in tensors if "lora_" in k} if trains_experts else set())


def test_init_bundle_errors(naive):
    """Going on in the other kind of routing, beside --bundle, or from a missing file is a UserError."""
    path, flags = naive
    label = [f for f in flags if f != "--mode=token"]
    with pytest.raises(UserError, match="--mode=token"):
        train_router.main(label + [f"--init_bundle={path}", "--name=x"])
    with pytest.raises(UserError, match="give one"):
        train_router.main(flags + [f"--init_bundle={path}", f"--bundle={path}", "--name=x"])
    with pytest.raises(UserError, match="not found"):
        train_router.main(flags + [f"--init_bundle={path}.missing", "--name=x"])
