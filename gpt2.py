"""OpenAI's GPT-2 weights for nanoMoA's GPT: from a Hugging Face folder (config.json with model.safetensors
or pytorch_model.bin), or downloaded once from the hub (gpt2, gpt2-medium, -large, -xl; needs the optional
huggingface_hub). GPT-2 stores its four linear maps as Conv1D, (in, out): they are transposed into
nn.Linear's (out, in). Everything is checked before it is used: the sizes in config.json against the
tensors (model.checked_config), every tensor's shape, dtype and finiteness, and that the file holds no
tensor we would drop unread.

Read next: files.py.
"""

import os

import torch

from config import UserError
from model import GPT, checked_config
from storage import check_weights, read_json, read_safetensors

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def load_gpt2(name_or_path, dropout=0.0):
    """GPT-2's weights in nanoMoA's GPT, from a local folder or, when online, from the hub."""
    folder = name_or_path if os.path.isdir(name_or_path) else download_gpt2(name_or_path)
    path = os.path.join(folder, "config.json")
    hf = read_json(path)
    sizes = {
        "block_size": hf.get("n_positions"),
        "vocab_size": hf.get("vocab_size"),
        "n_layer": hf.get("n_layer"),
        "n_head": hf.get("n_head"),
        "n_embd": hf.get("n_embd"),
        "dropout": dropout,
        "bias": True,
    }
    state = read_hf_weights(folder)
    try:
        model = GPT(checked_config(sizes, state))  # sizes checked against the weights
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None
    ours = model.state_dict()
    for key in ours:
        if key == "lm_head.weight":
            continue  # tied to wte
        src = state.get(key, state.get(key[len("transformer.") :]))  # some files drop the prefix
        if src is None:
            raise UserError(f"{folder}: weight {key} missing: not a GPT-2 checkpoint")
        if key.endswith(CONV1D):
            src = src.t()  # GPT-2 stores these as Conv1D: (in, out), nn.Linear wants (out, in)
        if src.shape != ours[key].shape:
            raise UserError(f"{folder}: {key} has shape {tuple(src.shape)}, expected {tuple(ours[key].shape)}")
        check_weights({key: src}, folder)  # copy_ would cast integers silently
        with torch.no_grad():
            ours[key].copy_(src)
    check_gpt2_names(state, ours, folder)
    return model


def check_gpt2_names(state, ours, folder):
    """A GPT-2 file holds GPT-2's weights and nothing else we would drop unread: besides our names (with or without
    "transformer."), only the attention masks older transformers saved, and an lm_head equal to wte (tied)."""
    known = set(ours) | {k.removeprefix("transformer.") for k in ours}
    for name, t in state.items():
        if name == "lm_head.weight" and not torch.equal(t.to(ours[name].dtype), ours["transformer.wte.weight"]):
            raise UserError(f"{folder}: its lm_head.weight is not its wte.weight; nanoMoA's GPT ties the two")
        if name not in known and not name.endswith((".attn.bias", ".attn.masked_bias")):
            raise UserError(f"{folder}: it holds {name}, which is not a GPT-2 weight")


def download_gpt2(name):
    """Fetches a GPT-2 checkpoint folder from the Hugging Face hub (needs the optional huggingface_hub)."""
    if name not in GPT2_NAMES:
        raise UserError(f"{name!r} is neither a folder nor one of {', '.join(GPT2_NAMES)}")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(
            f"openai-community/{name}", allow_patterns=["config.json", "model.safetensors", "vocab.json", "merges.txt"]
        )
    except Exception as e:
        raise UserError(
            f"cannot download {name} ({type(e).__name__}): with network, `pip install huggingface_hub`; "
            f"offline, copy the hub folder (config.json + model.safetensors) here and pass its path"
        ) from None


def read_hf_weights(folder):
    """The tensors of a Hugging Face checkpoint folder, as a dict name -> tensor."""
    st, pt = os.path.join(folder, "model.safetensors"), os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(st):
        return read_safetensors(st)[0]
    if os.path.isfile(pt):
        try:
            state = torch.load(pt, map_location="cpu", weights_only=True)  # no pickled code is executed
        except Exception as e:
            raise UserError(f"cannot read {pt}: corrupt, or not a PyTorch state dict ({type(e).__name__})") from None
        if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
            raise UserError(f"{pt} does not hold a dict of tensors")
        return state
    raise UserError(f"{folder} has neither model.safetensors nor pytorch_model.bin")
