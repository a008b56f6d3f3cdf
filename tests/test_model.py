"""model.py: shapes, causality, KV-cache parity, GPT-2 weight loading (against transformers), and the
safetensors reader/writer in trainer.py (against the safetensors package)."""

import os

import pytest
import torch

from config import UserError
from gpt2 import load_gpt2
from model import GPT, GPTConfig
from storage import read_safetensors, write_safetensors

TINY = GPTConfig(block_size=64, vocab_size=50, n_layer=2, n_head=2, n_embd=32)


def tiny_gpt(seed=0, **overrides):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**TINY.__dict__, **overrides}))
    with torch.no_grad():  # larger weights than GPT-2's init, so positions and tokens matter
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def left_padded(rows, pad_id=0):
    """Token lists -> idx (B, T_max) padded on the left and pad_mask (B, T_max)."""
    T = max(len(r) for r in rows)
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        idx[i, T - len(r) :] = torch.tensor(r)
        mask[i, T - len(r) :] = True
    return idx, mask


def test_output_shapes():
    """Logits are (B, T, vocab), the loss a scalar; targets of -1 are ignored."""
    model = tiny_gpt()
    idx = torch.randint(50, (3, 10))
    logits, loss = model(idx, targets=idx)
    assert logits.shape == (3, 10, 50) and loss.shape == ()
    ignored = idx.clone()
    ignored[:, :5] = -1
    _, loss_half = model(idx, targets=ignored)
    expected = torch.nn.functional.cross_entropy(logits[:, 5:].reshape(-1, 50), idx[:, 5:].reshape(-1))
    torch.testing.assert_close(loss_half, expected, atol=1e-6, rtol=1e-6)
    assert model(idx)[1] is None


@pytest.mark.parametrize("padded", [False, True])
def test_causality(padded):
    """Changing the token at position t never changes the logits before t (with or without pad_mask)."""
    model = tiny_gpt()
    idx = torch.randint(50, (2, 16))
    pad_mask = None
    if padded:
        pad_mask = torch.ones(2, 16, dtype=torch.bool)
        pad_mask[1, :5] = False  # sample 1 has 5 padding tokens on the left
    base, _ = model(idx, pad_mask=pad_mask)
    for t in (6, 10, 15):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 50
        logits, _ = model(changed, pad_mask=pad_mask)
        torch.testing.assert_close(logits[:, :t], base[:, :t], atol=1e-6, rtol=0)
        assert (logits[:, t] - base[:, t]).abs().max() > 1e-3  # the change is seen from t on


def test_padding_is_invisible():
    """A left-padded sample's logits at its real tokens equal the same tokens run alone, whatever the padding holds."""
    model = tiny_gpt()
    short = torch.randint(50, (1, 7))
    alone, _ = model(short)
    idx, mask = left_padded([short[0].tolist(), list(range(12))])
    for pad_token in (0, 33):
        idx[0, :5] = pad_token
        logits, _ = model(idx, pad_mask=mask)
        torch.testing.assert_close(logits[0, 5:], alone[0], atol=1e-5, rtol=1e-5)


def test_eval_mode_turns_dropout_off():
    """In eval mode a model built with dropout 0.5 gives, every time, the logits of the same weights built with
    dropout 0 (1e-6); in train mode its dropout changes them."""
    idx = torch.randint(50, (2, 12), generator=torch.Generator().manual_seed(0))
    dropped, plain = tiny_gpt(dropout=0.5), tiny_gpt(dropout=0.0)
    with torch.no_grad():
        expected = plain(idx)[0]
        for _ in range(2):
            torch.testing.assert_close(dropped(idx)[0], expected, atol=1e-6, rtol=0)
        assert (dropped.train()(idx)[0] - expected).abs().max() > 1e-2


def test_kv_cache_parity():
    """Greedy decoding with the KV cache gives exactly the tokens of recomputing the whole context."""
    model = tiny_gpt()
    idx = torch.randint(50, (3, 5))
    with_cache = model.generate(idx, 30, temperature=0, use_cache=True)
    without = model.generate(idx, 30, temperature=0, use_cache=False)
    assert with_cache.shape == (3, 35)
    assert torch.equal(with_cache, without)


def test_kv_cache_parity_left_padded():
    """With left-padded prompts of different lengths, cached and uncached greedy decoding agree, and each
    padded prompt continues exactly as the same prompt alone, unpadded."""
    model = tiny_gpt()
    rows = [[3, 1, 4], [1, 5, 9, 2, 6, 5, 3], [5, 8, 9, 7, 9]]
    idx, mask = left_padded(rows)
    with_cache = model.generate(idx, 20, temperature=0, pad_mask=mask, use_cache=True)
    without = model.generate(idx, 20, temperature=0, pad_mask=mask, use_cache=False)
    assert torch.equal(with_cache, without)
    for i, row in enumerate(rows):
        alone = model.generate(torch.tensor([row]), 20, temperature=0)
        assert with_cache[i, idx.size(1) :].tolist() == alone[0, len(row) :].tolist()


def random_hf_gpt2(seed=0):
    """A random tiny transformers GPT-2 whose biases and LayerNorms are not at their init values."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=300)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return hf


def assert_same_logits(ours, hf):
    idx = torch.randint(300, (2, 40))
    with torch.no_grad():
        expected = hf(idx).logits
        logits, _ = ours(idx)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_from_pretrained_safetensors_matches_transformers(tmp_path):
    """A random GPT-2 saved by save_pretrained (model.safetensors) loads into GPT with the same logits (1e-4)."""
    hf = random_hf_gpt2()
    hf.save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / "model.safetensors")
    ours = load_gpt2(str(tmp_path)).eval()
    assert ours.config.n_layer == 2 and ours.config.block_size == 64 and ours.config.vocab_size == 300
    assert_same_logits(ours, hf)


def test_from_pretrained_padded_matches_transformers(tmp_path):
    """Left-padded prompts give transformers' logits when it is given the attention mask and real-token positions."""
    hf = random_hf_gpt2()
    hf.save_pretrained(tmp_path)
    ours = load_gpt2(str(tmp_path)).eval()
    idx, mask = left_padded([list(range(10, 30)), list(range(40, 52))])
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf(idx, attention_mask=mask.long(), position_ids=positions).logits
        logits, _ = ours(idx, pad_mask=mask)
    torch.testing.assert_close(logits[mask], expected[mask], atol=1e-4, rtol=1e-4)


def test_from_pretrained_pytorch_bin_matches_transformers(tmp_path):
    """A folder holding config.json and pytorch_model.bin (torch.save of the state dict) loads the same way."""
    hf = random_hf_gpt2(seed=1)
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    ours = load_gpt2(str(tmp_path)).eval()
    assert_same_logits(ours, hf)


def test_gpt2_offline_hub_name(monkeypatch):
    """A hub name while offline fails at once with a UserError that says what to do."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        import huggingface_hub.constants

        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at import
    except ImportError:
        pass  # then download_gpt2 reports the missing package, also as a UserError
    try:
        load_gpt2("gpt2")
    except UserError as e:
        assert "cannot download gpt2" in str(e) and "pass its path" in str(e)
    else:
        pytest.skip("gpt2 is in the local Hugging Face cache")
    with pytest.raises(UserError, match="neither a folder nor"):
        load_gpt2("no-such-model")


def example_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 4, generator=g),
        "f16": torch.randn(5, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "i64": torch.arange(-3, 3),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "u8": torch.arange(7, dtype=torch.uint8),
    }


def assert_same_tensors(a, b):
    assert list(a) == list(b) or sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        torch.testing.assert_close(a[name], b[name], atol=0, rtol=0)


def test_safetensors_round_trip(tmp_path):
    """Tensors of every dtype (including 0-d and empty) and metadata written by write_safetensors read back
    unchanged."""
    tensors = example_tensors()
    write_safetensors(tmp_path / "a.safetensors", tensors, {"step": 3, "name": "x"})
    loaded, metadata = read_safetensors(tmp_path / "a.safetensors")
    assert_same_tensors(loaded, tensors)
    assert metadata == {"step": "3", "name": "x"}


def test_safetensors_interoperates_with_the_package(tmp_path):
    """Our files are read by safetensors.torch.load_file, and its files by read_safetensors, unchanged."""
    st = pytest.importorskip("safetensors.torch")
    tensors = example_tensors()
    write_safetensors(tmp_path / "ours.safetensors", tensors)
    assert_same_tensors(st.load_file(tmp_path / "ours.safetensors"), tensors)
    st.save_file(tensors, tmp_path / "theirs.safetensors", metadata={"format": "pt"})
    loaded, metadata = read_safetensors(tmp_path / "theirs.safetensors")
    assert_same_tensors(loaded, tensors)
    assert metadata == {"format": "pt"}
