"""Tokenizers for nanoMoA, all of them tiktoken Encodings.

- "bytes" (the offline default): one token per UTF-8 byte (ids 0..255) plus <|endoftext|> (256).
  Needs no download, round-trips any Unicode text, and keeps the vocabulary (and the model) tiny.
- "gpt2": OpenAI's GPT-2 BPE (50257 tokens), for runs on GPT-2 weights. tiktoken downloads it once
  and caches it in TIKTOKEN_CACHE_DIR.
- a folder holding GPT-2's Hugging Face tokenizer files (vocab.json + merges.txt): the same BPE,
  read from disk with no network.

Read next: model.py.
"""

import hashlib
import os

import tiktoken

from config import UserError

EOT = "<|endoftext|>"
# GPT-2's pre-tokenizer regex. With the byte tokenizer there are no merges, so it only decides how
# text is cut into pieces before encoding; any pattern would give the same ids.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def byte_tokenizer() -> tiktoken.Encoding:
    ranks = {bytes([i]): i for i in range(256)}
    return tiktoken.Encoding("bytes", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: 256})


def gpt2_from_folder(folder: str) -> tiktoken.Encoding:
    """GPT-2 BPE from a Hugging Face folder (vocab.json + merges.txt), no network."""
    vocab, merges = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    for f in (vocab, merges):
        if not os.path.isfile(f):
            raise UserError(f"{f} not found: a GPT-2 tokenizer folder needs vocab.json and merges.txt")
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks  # reads local paths without network

    # tiktoken caches files by path; passing the contents' hashes makes it re-read edited files
    sha256 = {}
    for f in (vocab, merges):
        with open(f, "rb") as fh:
            sha256[f] = hashlib.sha256(fh.read()).hexdigest()
    try:
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=merges,
            encoder_json_file=vocab,
            vocab_bpe_hash=sha256[merges],
            encoder_json_hash=sha256[vocab],
        )
    except (AssertionError, KeyError, ValueError) as e:  # tiktoken asserts that the two files agree
        raise UserError(
            f"{folder}: vocab.json and merges.txt are not a valid GPT-2 BPE pair ({type(e).__name__})"
        ) from None
    return tiktoken.Encoding(
        "gpt2-local", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: len(ranks)}
    )


def get_tokenizer(name: str) -> tiktoken.Encoding:
    """Returns the tokenizer called `name` ("bytes", "gpt2", or a folder with GPT-2's files)."""
    if name == "bytes":
        return byte_tokenizer()
    if os.path.isdir(name):
        return gpt2_from_folder(name)
    if name == "gpt2":
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:  # tiktoken raises requests/OS errors of many kinds when offline
            raise UserError(
                f"cannot load the GPT-2 BPE ({type(e).__name__}): run once with network, or point "
                f"TIKTOKEN_CACHE_DIR at a folder holding tiktoken's cached gpt2 files, or pass a "
                f"folder with vocab.json + merges.txt"
            ) from None
    raise UserError(f"unknown tokenizer {name!r}: use 'bytes', 'gpt2' or a folder with vocab.json + merges.txt")


def encode(enc: tiktoken.Encoding, text: str) -> list:
    """Encodes plain text; "<|endoftext|>" written in the text is kept as text, never as the special token."""
    return enc.encode_ordinary(text)
