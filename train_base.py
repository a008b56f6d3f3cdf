"""Pretrains the base GPT on the corpus (data/prepare.py), from scratch or on from GPT-2 weights.

    python train_base.py                                  # the default: ~3 minutes on 2 CPU cores
    python train_base.py --max_iters=2000 --n_layer=6     # any field of BaseConfig as --key=value
    python train_base.py --init_from=resume               # continue an interrupted run
    torchrun --nproc_per_node=2 train_base.py             # DistributedDataParallel, one micro-batch each

This base is then frozen: every later stage trains only LoRA experts and routers beside it.
The loop itself lives in trainer.py; this file only builds the model and says how to evaluate it.

Read next: moa.py (LoRA experts), then train_lora.py.
"""

import os
from dataclasses import asdict, dataclass

import torch

from batches import CorpusData
from config import AT_LEAST_1, FRACTION, NAMES, UserError, parse_config, run
from evaluate import corpus_losses, unigram_entropy
from gpt2 import load_gpt2
from model import GPT, GPTConfig, checked_config
from storage import load_checkpoint
from trainer import TrainConfig, check_training_memory, train


@dataclass
class BaseConfig(TrainConfig):
    out_dir: str = "out/base"
    init_from: str = "scratch"  # scratch | resume | gpt2 | gpt2-medium | ... | a GPT-2 folder
    corpus: str = "all"  # comma-separated corpus sources (data/prepare.py), or all
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads per block (they split the width)
    n_embd: int = 128  # the width: channels of every token's vector
    dropout: float = 0.0  # dropout in the GPT's blocks while it trains
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2 has

    CHECKS = {
        "n_layer": AT_LEAST_1,
        "n_head": AT_LEAST_1,
        "n_embd": AT_LEAST_1,
        "dropout": FRACTION,
        "corpus": NAMES,
    }


def build_model(cfg, vocab_size):
    """A fresh GPT, GPT-2 weights, or (for resume) the architecture saved in the checkpoint."""
    if cfg.init_from == "scratch":
        if cfg.n_embd % cfg.n_head:
            raise UserError(f"--n_embd={cfg.n_embd} must be a multiple of --n_head={cfg.n_head}: heads split the width")
        config = GPTConfig(
            block_size=cfg.block_size,
            vocab_size=vocab_size,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            n_embd=cfg.n_embd,
            dropout=cfg.dropout,
            bias=cfg.bias,
        )
        with torch.device("meta"):  # its size, before anything is allocated
            params = GPT(config).num_params()
        check_training_memory(cfg, config, params, ("batch_size", "block_size", "n_layer", "n_embd"))
        return GPT(config)
    if cfg.init_from == "resume":
        path = os.path.join(cfg.out_dir, "ckpt.pt")
        ckpt = load_checkpoint(path)
        try:
            return GPT(checked_config(ckpt["meta"].get("model"), ckpt["model"]))  # sizes checked against tensors
        except ValueError as e:
            raise UserError(f"{path}: {e}") from None
    model = load_gpt2(cfg.init_from, dropout=cfg.dropout)
    if cfg.block_size > model.config.block_size:
        raise UserError(
            f"block_size {cfg.block_size} > {model.config.block_size}, the longest context of {cfg.init_from}"
        )
    return model


def main(argv=None):
    cfg = parse_config(BaseConfig, argv or [])
    data = CorpusData(cfg.data_dir, cfg.corpus, cfg.block_size)
    torch.manual_seed(cfg.seed)  # the initial weights are part of the run: same seed, same model, on every process
    model = build_model(cfg, data.vocab_size)
    if model.config.vocab_size < data.vocab_size:
        raise UserError(
            f"the data's tokenizer ({data.tokenizer}, {data.vocab_size} tokens) does not fit the model's "
            f"{model.config.vocab_size}; for GPT-2 weights run `python data/prepare.py --tokenizer=gpt2`"
        )
    print(f"base GPT: {model.num_params() / 1e6:.2f}M parameters, corpus: {', '.join(data.domains)}")

    def evaluate(m):
        return corpus_losses(m, data, cfg.eval_iters * cfg.batch_size, cfg.batch_size, next(m.parameters()).device)

    meta = {
        "kind": "base",
        "model": asdict(model.config),
        "tokenizer": data.tokenizer,
        "corpus": data.domains,
        "init_from": cfg.init_from,
    }

    def finish(m, _):  # once training is over (under torchrun: on process 0 only)
        final = evaluate(m.eval())
        for name in data.domains:
            print(
                f"{name:>8}: val loss {final[f'val/{name}']:.3f} nats/token, "
                f"unigram entropy {unigram_entropy(data, name):.3f}"
            )
        print(f"saved {os.path.join(cfg.out_dir, 'ckpt.pt')}")

    losses = train(cfg, model, data, evaluate, meta=meta, finish=finish)
    return model, losses


if __name__ == "__main__":
    run(main)
