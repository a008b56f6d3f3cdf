"""export.py: every output loaded by transformers / peft computes what nanoMoA computes, and back.

All on a tiny random GPT-2 (2 layers, n_embd 32, vocab 300) saved with transformers' save_pretrained,
which nanoMoA loads as it loads OpenAI's GPT-2.
"""

import json
import os
import re
import shutil
import sys
from dataclasses import asdict

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # standalone runs

import export  # noqa: E402
from config import UserError  # noqa: E402
from files import add_expert_file, expert_tensors, fingerprint, load_base, read_meta, save_bundle, save_expert  # noqa
from gpt2 import load_gpt2  # noqa: E402
from moa import TARGETS, MoA, add_experts, lora_layers  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from storage import read_safetensors  # noqa: E402


def hf():
    """(transformers, peft), imported by the tests that use them and skipped where missing: imported at the top of
    this file, they would add 4 s to every collection of tests/, each grading command `-m assignmentN` included."""
    transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    transformers.logging.set_verbosity_error()
    return transformers, peft


pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft's, not ours

ATOL = 1e-4
IDX = torch.randint(300, (3, 12), generator=torch.Generator().manual_seed(0))  # (B, T) token ids


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A folder holding a random GPT-2 as transformers saves it, weights made large enough to matter."""
    transformers, _ = hf()
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=300, bos_token_id=299, eos_token_id=299
    )
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    folder = str(tmp_path_factory.mktemp("gpt2"))
    model.save_pretrained(folder)
    return folder


def hf_model(folder):
    return hf()[0].GPT2LMHeadModel.from_pretrained(folder).eval()


def random_expert(base, path, targets, rank=4, alpha=8.0, seed=1):
    """An expert file on `base` whose B matrices are random (a fresh expert, B = 0, would change nothing)."""
    torch.manual_seed(seed)
    model, tokenizer = load_base(base)
    base_fp = fingerprint(model)
    add_experts(model, 1, rank, alpha, targets=targets)
    with torch.no_grad():
        for layer in lora_layers(model):
            layer.lora_B[0].normal_(std=0.3)
    save_expert(path, model, 0, "python", tokenizer, base_fp)
    return path


@torch.no_grad()
def nanomoa_logits(base, expert=None):
    model, tokenizer = load_base(base)
    if expert:
        add_expert_file(model, expert, tokenizer)
    return model.eval()(IDX)[0]


def test_peft_export_matches(gpt2, tmp_path):
    """PeftModel with an exported expert gives nanoMoA's logits, LoRA sits on exactly the chosen layers
    (attn.c_proj, not mlp.c_proj), and its scale is alpha / r."""
    expert = random_expert(gpt2, str(tmp_path / "e.safetensors"), ["attn.c_proj", "mlp.c_fc"], rank=4, alpha=12.0)
    out = str(tmp_path / "peft")
    export.main(["peft", f"--expert={expert}", f"--base={gpt2}", f"--out={out}"])
    model = hf()[1].PeftModel.from_pretrained(hf_model(gpt2), out).eval()
    with torch.no_grad():
        logits = model(IDX).logits
    ours = nanomoa_logits(gpt2, expert)
    torch.testing.assert_close(logits, ours, atol=ATOL, rtol=0)
    assert (ours - nanomoa_logits(gpt2)).abs().max() > 0.1  # the expert matters
    wrapped = {n for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert wrapped == {f"base_model.model.transformer.h.{i}.{t}" for i in range(2) for t in ("attn.c_proj", "mlp.c_fc")}
    assert model.base_model.model.transformer.h[0].mlp.c_fc.scaling["default"] == 12.0 / 4


def test_peft_export_writes_every_field(gpt2, tmp_path):
    """adapter_config.json holds exactly these fields, each with the expert's value: plain LoRA for a causal LM,
    r, lora_alpha, target_modules as written in the expert, fan_in_fan_out (GPT-2's maps are Conv1D), no bias,
    no dropout, the base it was exported for; adapter_model.safetensors holds exactly the expert's A (r, in)
    and B (out, r) under PEFT's names."""
    expert = random_expert(gpt2, str(tmp_path / "e.safetensors"), ["attn.c_proj", "mlp.c_fc"], rank=4, alpha=12.0)
    out = str(tmp_path / "peft")
    export.main(["peft", f"--expert={expert}", f"--base={gpt2}", f"--out={out}"])
    with open(os.path.join(out, "adapter_config.json")) as f:
        config = json.load(f)
    assert config == {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": gpt2,
        "r": 4,
        "lora_alpha": 12.0,
        "target_modules": ["attn.c_proj", "mlp.c_fc"],
        "fan_in_fan_out": True,
        "bias": "none",
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }
    tensors, metadata = read_safetensors(os.path.join(out, "adapter_model.safetensors"))
    assert metadata == {"format": "pt"}
    ours = read_safetensors(expert)[0]  # {"transformer.h.0.attn.c_proj.lora_A": (r, in), ...}
    assert sorted(tensors) == sorted(f"base_model.model.{name}.weight" for name in ours) and len(ours) == 8
    for name, t in ours.items():
        torch.testing.assert_close(tensors[f"base_model.model.{name}.weight"], t, atol=0, rtol=0)
    assert tensors["base_model.model.transformer.h.1.mlp.c_fc.lora_A.weight"].shape == (4, 32)
    assert tensors["base_model.model.transformer.h.1.mlp.c_fc.lora_B.weight"].shape == (128, 4)


def peft_folder(base, folder, target_modules, rank=4, alpha=12):
    """A LoRA adapter written by peft itself, with random B's."""
    _, peft = hf()
    torch.manual_seed(2)
    model = peft.get_peft_model(
        hf_model(base), peft.LoraConfig(r=rank, lora_alpha=alpha, fan_in_fan_out=True, target_modules=target_modules)
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "target_modules, targets",
    [
        (r".*\.(attn\.c_attn|mlp\.c_proj)", ["attn.c_attn", "mlp.c_proj"]),  # a regex
        (["c_attn", "c_proj"], ["attn.c_attn", "attn.c_proj", "mlp.c_proj"]),  # suffixes: c_proj is both
    ],
)
def test_peft_import_matches(gpt2, tmp_path, target_modules, targets):
    """An adapter saved by peft, imported as an expert file, gives PeftModel's logits in nanoMoA, with
    target_modules read by PEFT's rule."""
    folder = peft_folder(gpt2, str(tmp_path / "peft"), target_modules)
    expert = str(tmp_path / "imported.safetensors")
    export.main(["import-peft", f"--peft={folder}", f"--base={gpt2}", "--domain=imported", f"--out={expert}"])
    with torch.no_grad():
        theirs = hf()[1].PeftModel.from_pretrained(hf_model(gpt2), folder).eval()(IDX).logits
    torch.testing.assert_close(nanomoa_logits(gpt2, expert), theirs, atol=ATOL, rtol=0)
    meta = read_meta(expert, "expert")[1]
    assert meta["domain"] == "imported" and meta["rank"] == 4 and meta["alpha"] == 12.0
    assert meta["targets"] == targets


@pytest.fixture(scope="module")
def valid_peft(gpt2, tmp_path_factory):
    return peft_folder(gpt2, str(tmp_path_factory.mktemp("valid") / "peft"), ["c_attn"])


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"use_dora": True}, "use_dora"),
        ({"use_rslora": True}, "use_rslora"),
        ({"bias": "all"}, "bias none"),
        ({"rank_pattern": {"c_attn": 2}}, "rank_pattern"),
        ({"alpha_pattern": {"c_attn": 2}}, "alpha_pattern"),
        ({"target_modules": ["wte"]}, "transformer.wte"),
        ({"target_modules": ["lm_head"]}, "lm_head"),
        ({"target_modules": ["ln_1"]}, "0 layers"),
        ({"target_modules": r"transformer\.h\.0\.attn\.c_attn"}, "1 layers"),
        ({"layers_to_transform": [0]}, "layers_to_transform"),
        ({"target_modules": ["c_fc"]}, "exactly the layers"),
        ({"r": 8}, "r=8"),
    ],
)
def test_peft_import_rejects_unsupported(gpt2, valid_peft, tmp_path, change, reason):
    """An adapter nanoMoA cannot represent (DoRA, rsLoRA, per-layer ranks, biases, other modules, some
    blocks only, a config that doesn't fit its tensors) is one UserError, and nothing is written."""
    folder = str(tmp_path / "peft")
    shutil.copytree(valid_peft, folder)
    with open(os.path.join(folder, "adapter_config.json")) as f:
        config = json.load(f)
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump({**config, **change}, f)
    out = str(tmp_path / "x.safetensors")
    with pytest.raises(UserError, match=re.escape(reason)):
        export.main(["import-peft", f"--peft={folder}", f"--base={gpt2}", "--domain=x", f"--out={out}"])
    assert not os.path.exists(out)


def test_hf_merged_export_matches(gpt2, tmp_path):
    """GPT2LMHeadModel loading the merged export gives nanoMoA's logits with the (unmerged) expert."""
    expert = random_expert(gpt2, str(tmp_path / "e.safetensors"), list(TARGETS))
    out = str(tmp_path / "hf")
    export.main(["hf", f"--base={gpt2}", f"--expert={expert}", f"--out={out}"])
    with torch.no_grad():
        logits = hf_model(out)(IDX).logits
    torch.testing.assert_close(logits, nanomoa_logits(gpt2, expert), atol=ATOL, rtol=0)


def test_hf_base_export_matches(tmp_path):
    """A train_base.py checkpoint (byte vocabulary 257, no biases) exported alone gives the same logits
    in GPT2LMHeadModel, and nanoMoA reads the folder back as the same model."""
    torch.manual_seed(3)
    config = GPTConfig(block_size=32, vocab_size=257, n_layer=2, n_head=2, n_embd=32, bias=False)
    gpt = GPT(config).eval()
    with torch.no_grad():
        for p in gpt.parameters():
            p.add_(0.3 * torch.randn_like(p))
    state = {k: v for k, v in gpt.state_dict().items() if k != "lm_head.weight"}
    meta = {"kind": "base", "model": asdict(config), "tokenizer": "bytes", "step": 0}
    ckpt = str(tmp_path / "ckpt.pt")
    torch.save({"model": state, "meta": json.dumps(meta)}, ckpt)
    out = str(tmp_path / "hf")
    export.main(["hf", f"--base={ckpt}", f"--out={out}"])
    idx = IDX[:, :10] % 257
    with torch.no_grad():
        ours, theirs, back = gpt(idx)[0], hf_model(out)(idx).logits, load_gpt2(out).eval()(idx)[0]
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)
    torch.testing.assert_close(back, ours, atol=ATOL, rtol=0)


def test_hf_export_writes_every_field(gpt2, tmp_path):
    """config.json holds exactly these fields, describing our GPT as a GPT2LMHeadModel: its sizes, the tanh GELU
    (gelu_new), LayerNorm epsilon 1e-5, no dropout, tied embeddings, <|endoftext|> (the last id) as bos and eos,
    float32; model.safetensors gives back the tensors of the GPT-2 folder the base came from, same names, same
    Conv1D (in, out) layout, bit for bit."""
    out = str(tmp_path / "hf")
    export.main(["hf", f"--base={gpt2}", f"--out={out}"])
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config == {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": 300,
        "n_positions": 64,
        "n_embd": 32,
        "n_layer": 2,
        "n_head": 4,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "tie_word_embeddings": True,
        "bos_token_id": 299,
        "eos_token_id": 299,
        "dtype": "float32",
    }
    ours, metadata = read_safetensors(os.path.join(out, "model.safetensors"))
    theirs = read_safetensors(os.path.join(gpt2, "model.safetensors"))[0]
    assert metadata == {"format": "pt"} and sorted(ours) == sorted(theirs)
    for name, t in theirs.items():
        torch.testing.assert_close(ours[name], t, atol=0, rtol=0, msg=name)
    assert ours["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # (in, out)


def test_bundle_export_writes_every_field(gpt2, tmp_path):
    """routers.json holds exactly the domains in the bundle's order, its pooling, a description of what router i
    reads, and for each block i the router reading hidden_states[i] with the bundle's weight (K, n_embd) and
    bias (K,); each domain's folder is that domain's expert as a PEFT adapter with the bundle's rank, alpha,
    targets and base."""
    torch.manual_seed(5)
    gpt, tokenizer = load_base(gpt2)
    base_fp = fingerprint(gpt)
    moa = MoA(
        gpt, ["python", "prose", "arith"], rank=2, alpha=6.0, targets=["attn.c_attn", "mlp.c_proj"], pooling="last"
    )
    with torch.no_grad():
        for name, p in moa.named_parameters():
            if "lora_B" in name or name.startswith("routers."):
                p.normal_(std=0.3)
    bundle = str(tmp_path / "moa.safetensors")
    save_bundle(bundle, moa, tokenizer, base_fp)
    out = str(tmp_path / "moa")
    export.main(["bundle", f"--bundle={bundle}", f"--base={gpt2}", f"--out={out}"])
    with open(os.path.join(out, "routers.json")) as f:
        routers = json.load(f)
    assert sorted(routers) == ["domains", "pooling", "reads", "routers"]
    assert routers["domains"] == ["python", "prose", "arith"] and routers["pooling"] == "last"
    assert "hidden_states[i]" in routers["reads"] and "input of block i" in routers["reads"]
    assert [r["hidden_state"] for r in routers["routers"]] == [0, 1]
    for saved, router in zip(routers["routers"], moa.routers):
        assert sorted(saved) == ["bias", "features", "hidden_state", "weight"] and saved["features"] is None
        assert torch.equal(torch.tensor(saved["weight"]), router.weight)  # (K, n_embd)
        assert torch.equal(torch.tensor(saved["bias"]), router.bias)  # (K,)
    for k, domain in enumerate(moa.domains):
        with open(os.path.join(out, domain, "adapter_config.json")) as f:
            config = json.load(f)
        assert (config["r"], config["lora_alpha"], config["target_modules"], config["base_model_name_or_path"]) == (
            2,
            6.0,
            ["attn.c_attn", "mlp.c_proj"],
            gpt2,
        )
        tensors = read_safetensors(os.path.join(out, domain, "adapter_model.safetensors"))[0]
        expected = expert_tensors(moa, k)
        assert sorted(tensors) == sorted(f"base_model.model.{name}.weight" for name in expected)
        for name, t in expected.items():
            torch.testing.assert_close(tensors[f"base_model.model.{name}.weight"], t, atol=0, rtol=0)


def test_bundle_export(gpt2, tmp_path):
    """A bundle becomes one PEFT folder per domain plus routers.json holding the bundle's router weights;
    router i applied to transformers' mean-pooled hidden_states[i] gives nanoMoA's router logits."""
    torch.manual_seed(4)
    gpt, tokenizer = load_base(gpt2)
    base_fp = fingerprint(gpt)
    moa = MoA(gpt, ["python", "prose"], rank=4, alpha=8.0).eval()
    with torch.no_grad():
        for name, p in moa.named_parameters():
            if "lora_B" in name or name.startswith("routers."):
                p.normal_(std=0.3)
    bundle = str(tmp_path / "moa.safetensors")
    save_bundle(bundle, moa, tokenizer, base_fp)
    out = str(tmp_path / "moa")
    export.main(["bundle", f"--bundle={bundle}", f"--base={gpt2}", f"--out={out}"])
    assert sorted(os.listdir(out)) == ["prose", "python", "routers.json"]
    with open(os.path.join(out, "routers.json")) as f:
        routers = json.load(f)
    assert routers["domains"] == ["python", "prose"] and len(routers["routers"]) == 2
    for saved, r in zip(routers["routers"], moa.routers):
        assert torch.equal(torch.tensor(saved["weight"]), r.weight) and torch.equal(torch.tensor(saved["bias"]), r.bias)
    k = 1  # route every sample to "prose", in nanoMoA and by loading prose's adapter
    with torch.no_grad():
        ours = moa(IDX, domain=torch.full((3,), k), mode="label")[0]
        model = hf()[1].PeftModel.from_pretrained(hf_model(gpt2), os.path.join(out, "prose")).eval()
        result = model(IDX, output_hidden_states=True)
    torch.testing.assert_close(result.logits, ours, atol=ATOL, rtol=0)
    for i, saved in enumerate(routers["routers"]):
        logits = result.hidden_states[i].mean(1) @ torch.tensor(saved["weight"]).t() + torch.tensor(saved["bias"])
        torch.testing.assert_close(logits, moa.routing["logits"][i], atol=ATOL, rtol=0)


@pytest.mark.parametrize("window", [1, 3])
def test_bundle_export_describes_the_routers_features(gpt2, tmp_path, window):
    """With per-token features (router_hidden, over a window of tokens or not), routers.json holds them, and the
    recipe its "reads" states, applied to transformers' hidden_states of the base, gives nanoMoA's router logits
    (routers on the frozen base)."""
    torch.manual_seed(6)
    gpt, tokenizer = load_base(gpt2)
    moa = MoA(gpt, ["python", "prose"], rank=4, alpha=8.0, router_input="base", router_hidden=5, router_window=window)
    moa.eval()
    with torch.no_grad():
        for name, p in moa.named_parameters():
            if name.startswith("router"):
                p.normal_(std=0.3)
    bundle, out = str(tmp_path / "moa.safetensors"), str(tmp_path / "moa")
    save_bundle(bundle, moa, tokenizer, fingerprint(gpt))
    export.main(["bundle", f"--bundle={bundle}", f"--base={gpt2}", f"--out={out}"])
    with open(os.path.join(out, "routers.json")) as f:
        routers = json.load(f)
    assert "layer_norm" in routers["reads"] and "gelu" in routers["reads"] and "window" in routers["reads"]
    with torch.no_grad():
        moa(IDX, mode="layer")
        hidden = hf_model(gpt2)(IDX, output_hidden_states=True).hidden_states
    for i, saved in enumerate(routers["routers"]):
        f, t = saved["features"], torch.tensor
        assert sorted(f) == ["bias", "eps", "norm_bias", "norm_weight", "weight", "window"] and len(f["weight"]) == 5
        assert f["window"] == window and len(f["weight"][0]) == 32 * window
        h = torch.nn.functional.layer_norm(hidden[i], (32,), t(f["norm_weight"]), t(f["norm_bias"]), f["eps"])
        v = torch.cat([torch.cat([torch.zeros_like(h[:, :j]), h[:, : h.size(1) - j]], 1) for j in range(window)], -1)
        h = torch.nn.functional.gelu(v @ t(f["weight"]).t() + t(f["bias"]))
        logits = h.mean(1) @ t(saved["weight"]).t() + t(saved["bias"])
        torch.testing.assert_close(logits, moa.routing["logits"][i], atol=ATOL, rtol=0)


def test_refuses_to_overwrite(gpt2, tmp_path):
    """An existing non-empty output folder is kept unless --force, and --force replaces only a folder export.py
    wrote (a folder is replaced whole: never one of the user's); a missing flag is a UserError."""
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="--force"):
        export.main(["hf", f"--base={gpt2}", f"--out={out}"])
    with pytest.raises(UserError, match="not a folder export.py wrote"):
        export.main(["hf", f"--base={gpt2}", f"--out={out}", "--force=True"])
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    os.remove(out / "keep.txt")
    export.main(["hf", f"--base={gpt2}", f"--out={out}"])
    (out / "config.json").write_text("{}")
    export.main(["hf", f"--base={gpt2}", f"--out={out}", "--force=True"])
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text())["n_layer"] == 2  # replaced
    with pytest.raises(UserError, match="--expert"):
        export.main(["peft", f"--base={gpt2}", f"--out={tmp_path / 'p'}"])
