"""The data as data/prepare.py writes it, and the batches every stage trains on.

<data_dir>/corpus/<source>/{train,val}.bin   token streams, for the base (CorpusData: random windows)
<data_dir>/tasks/<task>/<split>.{bin,idx}   (prompt, response) records, for the experts and routers
                                             (TaskData: right-padded batches of whole records)
<data_dir>/meta.json                         the tokenizer, the sources and tasks, which tasks are held back

Every batch is drawn from a seed alone (`batch(batch_size, seed)`), so a run's records, and the LoRA
dropout masks drawn for them, are a function of the run's seed, the step and the micro-batch, and of
nothing else: resuming needs the step number only, N processes draw what one process draws, and
JointData can draw several runs' batches side by side exactly as each run alone would draw its own.

Read next: trainer.py.
"""

import os
import sys
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from config import UserError, is_name
from storage import read_json


class Batch(NamedTuple):
    x: torch.Tensor  # (B, T) input token ids
    y: torch.Tensor  # (B, T) targets: the next token, -1 where no loss is taken
    domain: torch.Tensor  # (B,) each sample's domain label (task, or corpus source)
    prompt: torch.Tensor | None = None  # (B, T) bool, True on a record's prompt: what the routers may read
    length: torch.Tensor | None = None  # (B,) each row's real tokens (the rest is padding)
    seed: torch.Tensor | None = None  # (B,) int64: the seed of each row's LoRA dropout masks (moa.LoRADropout)
    run: torch.Tensor | None = None  # (B,) JointData: which of the runs trained side by side each row belongs to

    def to(self, device):
        return Batch(*(None if t is None else t.to(device) for t in self))

    def rows(self, index):
        """The rows `index` (a (n,) tensor of row numbers), cropped to the longest of them."""
        T = int(self.length[index].max())
        return Batch(*(None if t is None else t[index, :T] if t.dim() == 2 else t[index] for t in self))


def read_data_meta(data_dir):
    """<data_dir>/meta.json, checked: what every reader of the data relies on is there, of its type."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        raise UserError(f"{path} not found: run `python data/prepare.py` first")
    meta = read_json(path)
    if not (
        all(isinstance(meta.get(k), dict) for k in ("corpus", "tasks"))
        and isinstance(meta.get("tokenizer"), str)
        and all(isinstance(meta.get(k), int) for k in ("vocab_size", "eot"))
        and 1 <= meta["vocab_size"] <= 2**16
        and 0 <= meta["eot"] < meta["vocab_size"]
        and isinstance(meta.get("held_back", []), list)
    ):
        raise UserError(f"{path} is not a meta.json written by data/prepare.py; run it again")
    odd = next((n for kind in ("corpus", "tasks") for n in meta[kind] if not is_name(n)), None)
    if odd is not None:  # each name is a folder of data_dir: never a path out of it
        raise UserError(f"{path} names {odd!r}, not a name of letters, digits, _ and -; run data/prepare.py again")
    return meta


def read_tokens(path, vocab_size):
    """A .bin file of uint16 token ids, memory-mapped, checked: a whole number of ids, each below vocab_size."""
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: run `python data/prepare.py` again")
    size = os.path.getsize(path)
    if size % 2:
        raise UserError(
            f"{path} is corrupt ({size} bytes, not a whole number of uint16 token ids); run "
            f"`python data/prepare.py` again"
        )
    tokens = np.memmap(path, dtype=np.uint16, mode="r") if size else np.zeros(0, np.uint16)  # mmap: not empty
    if size and tokens.max() >= vocab_size:
        raise UserError(
            f"{path} holds token id {tokens.max()}, beyond the vocabulary of {vocab_size} of its "
            f"meta.json; run `python data/prepare.py` again"
        )
    return tokens


def choose(names, known, held_back, kind):
    """--domains-style selection: "all" is every known name but the held-back ones; else a comma list."""
    chosen = (
        [n for n in known if n not in held_back]
        if names == "all"
        else [n.strip() for n in names.split(",") if n.strip()]
    )
    for name in chosen:
        if name not in known:
            raise UserError(f"unknown {kind} {name!r}; prepared: {', '.join(known) or 'none'}")
        if chosen.count(name) > 1:  # one label per name: a second would make an expert or bundle its loader refuses
            raise UserError(f"{kind} {name!r} is selected twice in {names!r}")
    if not chosen:
        raise UserError(f"no {kind} selected: prepare some with `python data/prepare.py`")
    return chosen


def generator(seed):
    """A fresh CPU random generator: the same draws as torch.manual_seed(seed) gives the global one."""
    return torch.Generator().manual_seed(seed)


def balanced_labels(batch_size, K, gen):
    """(B,) labels 0..K-1 in turn from a random offset: every label equally often, to within one."""
    offset = int(torch.randint(K, (1,), generator=gen))
    return (torch.arange(batch_size) + offset) % K


class CorpusData:
    """Memory-mapped token streams of the corpus sources (what the base is pretrained on), and batches
    of random windows with every source equally represented."""

    def __init__(self, data_dir, sources="all", block_size=128):
        self.meta = read_data_meta(data_dir)
        self.domains = choose(sources, list(self.meta["corpus"]), [], "corpus source")
        self.block_size = block_size
        self.tokenizer, self.vocab_size = self.meta["tokenizer"], self.meta["vocab_size"]
        self.splits = {}
        for name in self.domains:
            for split in ("train", "val"):
                path = os.path.join(data_dir, "corpus", name, f"{split}.bin")
                tokens = read_tokens(path, self.vocab_size)
                if len(tokens) < block_size + 2:
                    raise UserError(f"{path} has {len(tokens)} tokens, fewer than one block of {block_size + 1}")
                self.splits[name, split] = tokens

    def windows(self, name, split, starts):
        """Token windows starting at `starts` -> x, y (len(starts), block_size) int64, y = x shifted by one."""
        data, T = self.splits[name, split], self.block_size
        x = torch.from_numpy(np.stack([data[s : s + T].astype(np.int64) for s in starts]))
        y = torch.from_numpy(np.stack([data[s + 1 : s + 1 + T].astype(np.int64) for s in starts]))
        return x, y

    def batch(self, batch_size, seed, split="train"):
        """A random batch with every source equally represented (counts differ by at most one)."""
        gen = generator(seed)
        d = balanced_labels(batch_size, len(self.domains), gen)
        xs, ys = [], []
        for label in d.tolist():
            n = len(self.splits[self.domains[label], split]) - self.block_size - 1
            x, y = self.windows(self.domains[label], split, [int(torch.randint(n, (1,), generator=gen))])
            xs.append(x)
            ys.append(y)
        return Batch(torch.cat(xs), torch.cat(ys), d)

    def eval_starts(self, name, n):
        """n fixed window starts spread evenly over a source's validation split (no randomness)."""
        last = len(self.splits[name, "val"]) - self.block_size - 1
        return np.linspace(0, last, n).astype(np.int64).tolist()


class TaskData:
    """The (prompt, response) records of several tasks, the domains MoA routes between, and right-padded
    batches of them. The loss is taken on the response tokens (and the EOT that ends it) only, unless
    prompt_loss; `Batch.prompt` marks each record's prompt.

    sampling: "balanced" draws every domain equally often (to within one record per batch), as the paper's
    stage 2 does; "pooled" draws from all records pooled, so a task with fewer records is drawn less often
    (one LoRA on the mixed data, as it would be trained on them concatenated)."""

    SPLITS = ("train", "val", "unseen", "calib")  # unseen and calib: where prepare.py wrote them

    def __init__(self, data_dir, domains="all", block_size=128, prompt_loss=False, sampling="balanced"):
        self.meta = read_data_meta(data_dir)
        self.domains = choose(domains, list(self.meta["tasks"]), self.meta.get("held_back", []), "domain")
        self.block_size, self.prompt_loss, self.sampling = block_size, prompt_loss, sampling
        self.tokenizer, self.vocab_size, self.eot = self.meta["tokenizer"], self.meta["vocab_size"], self.meta["eot"]
        self.tokens, self.index = {}, {}
        for name in self.domains:
            for split in self.SPLITS:
                if split in ("train", "val") or os.path.isfile(os.path.join(data_dir, "tasks", name, f"{split}.idx")):
                    self.tokens[name, split], self.index[name, split] = read_records(
                        data_dir, name, split, self.vocab_size
                    )

    def count(self, name, split):
        return len(self.index[name, split]) if (name, split) in self.index else 0

    def record(self, name, split, i):
        """Record i -> (prompt token ids, response token ids ending with EOT), as lists."""
        start, n_prompt, length = self.index[name, split][i].tolist()
        tokens = self.tokens[name, split][start : start + length].tolist()
        return tokens[:n_prompt], tokens[n_prompt:]

    def pad(self, records, domain):
        """[(prompt, response)] -> a right-padded Batch; records longer than block_size + 1 tokens are cut."""
        rows = [(p + r)[: self.block_size + 1] for p, r in records]
        T = max(len(row) for row in rows) - 1
        x = torch.full((len(rows), T), self.eot, dtype=torch.long)
        y = torch.full((len(rows), T), -1, dtype=torch.long)
        prompt = torch.zeros(len(rows), T, dtype=torch.bool)
        for b, (row, (p, _)) in enumerate(zip(rows, records)):
            n = len(row) - 1
            x[b, :n], y[b, :n] = torch.tensor(row[:-1]), torch.tensor(row[1:])
            prompt[b, : min(len(p), n)] = True
            if not self.prompt_loss:
                y[b, : len(p) - 1] = -1  # targets that are prompt tokens: no loss
        return Batch(x, y, domain, prompt, torch.tensor([len(row) - 1 for row in rows]))

    def batch(self, batch_size, seed, split="train"):
        """A random batch of records (see `sampling`), and the seed of its LoRA dropout masks."""
        gen = generator(seed)
        counts = [self.count(name, split) for name in self.domains]
        if self.sampling == "pooled":
            picks = torch.randint(sum(counts), (batch_size,), generator=gen).tolist()
            bounds = np.cumsum(counts)
            d = torch.tensor([int(np.searchsorted(bounds, i, side="right")) for i in picks])
            ids = [i - (bounds[k] - counts[k]) for i, k in zip(picks, d.tolist())]
        else:
            d = balanced_labels(batch_size, len(self.domains), gen)
            ids = [int(torch.randint(counts[k], (1,), generator=gen)) for k in d.tolist()]
        batch = self.pad([self.record(self.domains[k], split, i) for k, i in zip(d.tolist(), ids)], d)
        return batch._replace(seed=torch.randint(2**62, (batch_size,), generator=gen))


def check_records_fit(data):
    """Each task's training records against the context (data.block_size positions: a record of n tokens, its EOT
    included, fills n - 1): a warning on stderr counting those that are cut, and a UserError when none of a task's
    records keeps a token to train on (without --prompt_loss: each prompt alone fills the context)."""
    for name in data.domains:
        _, n_prompt, length = data.index[name, "train"].T
        cut, lost = int((length - 1 > data.block_size).sum()), int((n_prompt > data.block_size).sum())
        if lost == len(length) and not data.prompt_loss:
            raise UserError(
                f"task {name!r}: every training record's prompt fills the context of {data.block_size} tokens (the "
                f"shortest prompt is {n_prompt.min()}), so nothing would train; shorten the prompts, or use a base "
                "with a longer context"
            )
        if cut:
            print(
                f"warning: task {name!r}: {cut} of {len(length)} training records are longer than the context of "
                f"{data.block_size} tokens (the longest needs {length.max() - 1}) and are cut"
                + (f"; {lost} of them lose their whole response" if lost else ""),
                file=sys.stderr,
            )


def read_records(data_dir, name, split, vocab_size):
    """A task split's tokens (uint16, memory-mapped) and index (N, 3): start, prompt length, length; checked."""
    folder = os.path.join(data_dir, "tasks", name)
    bin_path, idx_path = os.path.join(folder, f"{split}.bin"), os.path.join(folder, f"{split}.idx")
    if not os.path.isfile(idx_path):
        raise UserError(f"{idx_path} not found: run `python data/prepare.py` again")
    tokens = read_tokens(bin_path, vocab_size)
    size = os.path.getsize(idx_path)
    if size == 0 or size % 24:
        raise UserError(
            f"{idx_path} is corrupt ({size} bytes, not rows of 3 int64); run `python data/prepare.py` again"
        )
    index = np.fromfile(idx_path, dtype=np.int64).reshape(-1, 3)
    start, n_prompt, length = index.T
    if (start < 0).any() or (n_prompt < 1).any() or (length <= n_prompt).any() or (start + length > len(tokens)).any():
        raise UserError(f"{idx_path} does not match {bin_path}: corrupt; run `python data/prepare.py` again")
    return tokens, index


class JointData:
    """Several runs' data side by side (train_lora.py trains their LoRAs at once). Run k learns from the tasks
    in parts[k] (one TaskData each): its rows are each TaskData's batch, drawn exactly as a run on that task
    alone would draw it from the same seed, records and LoRA dropout masks alike. The batch is all of them,
    right-padded to the longest; Batch.run says whose each row is; a run that has stopped draws nothing."""

    def __init__(self, parts):
        self.parts = parts  # [[TaskData, ...], ...]: per run, the tasks it learns

    def batch(self, batch_size, seed, split="train", active=None):
        drawn = [
            (k, data, data.batch(batch_size, seed, split))
            for k, datas in enumerate(self.parts)
            if active is None or active[k]
            for data in datas
        ]
        T = max(b.x.size(1) for _, _, b in drawn)  # right padding, after each record's end: it changes no output
        return Batch(
            torch.cat([F.pad(b.x, (0, T - b.x.size(1)), value=data.eot) for _, data, b in drawn]),
            torch.cat([F.pad(b.y, (0, T - b.y.size(1)), value=-1) for _, _, b in drawn]),
            torch.cat([b.domain for _, _, b in drawn]),
            torch.cat([F.pad(b.prompt, (0, T - b.prompt.size(1)), value=False) for _, _, b in drawn]),
            torch.cat([b.length for _, _, b in drawn]),
            torch.cat([b.seed for _, _, b in drawn]),
            torch.cat([torch.full((b.x.size(0),), k) for k, _, b in drawn]),
        )


def by_length(batch, rows=16):
    """A batch in pieces of `rows` rows (the last may be fewer) of similar length, each cropped to its longest
    row: far less padding than the whole batch padded to its longest record. -> [Batch]"""
    order = batch.length.argsort(stable=True)
    return [batch.rows(part) for part in order.split(rows)]
