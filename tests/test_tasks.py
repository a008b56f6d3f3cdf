"""The paper's setting: records routed from their prompt, scored as served (evaluate.py), the routing baselines
(baselines.py), and the GPT-2 path of the whole pipeline on a tiny random GPT-2 with local BPE files."""

import copy
import json
import os

import pytest
import torch
from test_data import write_gpt2_folder

import fast
import train_lora
import train_router
from baselines import Arrow, ClassifierRouted, PromptClassifier, prototype
from batches import TaskData
from conftest import randomize_B
from data.prepare import main as prepare
from evaluate import answers, evaluate_tasks, prefill, response_loss, rouge_l
from files import load_base
from moa import MoA
from model import GPT, GPTConfig


def tiny_moa(vocab=257, seed=0):
    """A MoA (3 experts with random B, random routers) over a small random GPT with the byte vocabulary."""
    torch.manual_seed(seed)
    moa = MoA(GPT(GPTConfig(block_size=64, vocab_size=vocab, n_layer=2, n_head=2, n_embd=16)), ["a", "b", "c"], rank=4)
    randomize_B(moa)
    for router in moa.routers:
        torch.nn.init.normal_(router.weight, std=1.0)
    return moa.eval()


def test_rouge_l_by_hand():
    """ROUGE-L is the F1 of the longest common subsequence over characters: 'abcd' vs 'acbd' share 3 of 4 (0.75);
    identical strings 1, nothing in common 0, an empty answer 0 unless the reference is empty too."""
    assert rouge_l("abcd", "acbd") == pytest.approx(0.75)
    assert rouge_l("ab", "abcd") == pytest.approx(2 * 1.0 * 0.5 / 1.5)  # precision 1, recall 1/2
    assert rouge_l("spam", "spam") == 1.0 and rouge_l("xyz", "spam") == 0.0
    assert rouge_l("", "spam") == 0.0 and rouge_l("", "") == 1.0


def test_a_response_never_changes_the_routing_decision():
    """The routers read the prompt only: two records with the same prompt and different responses get the same
    router logits in one pass (router_mask), and the same decision served; the prompt alone gives it too (1e-6)."""
    moa = tiny_moa()
    prompt, responses = list(b"Reverse the word: spam\n"), [list(b"maps"), list(b"something else entirely")]
    with torch.no_grad():
        logits = []
        for response in responses:
            x = torch.tensor([prompt + response])
            moa(x, mode="layer", router_mask=(torch.arange(x.size(1)) < len(prompt))[None])
            logits.append(moa.routing["logits"])
        moa(torch.tensor([prompt]), mode="layer")
        alone = moa.routing["logits"]
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits[0], alone, rtol=0, atol=1e-6)


def test_mixed_task_batch_equals_each_record_alone(tiny_data):
    """A right-padded batch of records of three tasks, each through its own expert (label mode, the routers
    reading each prompt), gives each record the logits it gets alone, at its real positions (1e-5)."""
    moa = tiny_moa()
    data = TaskData(tiny_data, "upper,reverse,arith", 64)
    batch = data.batch(6, 0)
    with torch.no_grad():
        logits, _ = moa(batch.x, domain=batch.domain, mode="label", router_mask=batch.prompt)
        routes = moa.routing["logits"]
        for b in range(6):
            n = int((batch.y[b] != -1).nonzero().max()) + 1  # real positions
            alone, _ = moa(
                batch.x[b : b + 1, :n],
                domain=batch.domain[b : b + 1],
                mode="label",
                router_mask=batch.prompt[b : b + 1, :n],
            )
            torch.testing.assert_close(logits[b : b + 1, :n], alone, rtol=0, atol=1e-5)
            torch.testing.assert_close(routes[:, b : b + 1], moa.routing["logits"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["label", "layer", "token"])
def test_served_loss_equals_one_pass_loss(mode):
    """The response loss scored as served (prompt through a KV cache, then the response) equals one pass over
    prompt + response with the routers reading the prompt, in the modes that keep no decision (1e-5), for
    left-padded prompts of different lengths; the counts are the response tokens, EOT included."""
    moa = tiny_moa()
    prompts = [list(b"Uppercase: spam\n"), list(b"57+8="), list(b"Reverse the word: eggs\n")]
    responses = [list(b"SPAM") + [256], list(b"65") + [256], list(b"sgge") + [256]]
    kwargs = {"mode": mode, "domain": torch.tensor([0, 2, 1])} if mode == "label" else {"mode": mode}
    served = response_loss(moa, prompts, responses, 256, True, **kwargs)
    one_pass = response_loss(moa, prompts, responses, 256, False, **kwargs)
    torch.testing.assert_close(served[0], one_pass[0], rtol=0, atol=1e-5)
    assert served[1].tolist() == one_pass[1].tolist() == [5, 3, 5]


@pytest.mark.parametrize("speed", [False, True])
@pytest.mark.parametrize("mode", ["label", "last", "token"])
def test_one_prefill_serves_the_loss_and_the_answer(mode, speed):
    """evaluate_tasks runs each batch of prompts once (prefill) for both the reference response's loss and the
    greedy answer: both equal, exactly, what each gets from a prefill of its own, in each mode with the speed paths
    on and off; the loss continues a copy of the cache, so the reference's tokens never reach the answer."""
    moa = fast.enable(tiny_moa(), speed)
    prompts = [list(b"Uppercase: spam\n"), list(b"57+8="), list(b"Reverse the word: eggs\n")]
    responses = [list(b"SPAM") + [256], list(b"65") + [256], list(b"sgge") + [256]]
    kwargs = {"mode": mode, "domain": torch.tensor([0, 2, 1])} if mode == "label" else {"mode": mode}
    state = prefill(moa, prompts, 256, **kwargs)
    length = state[2].length
    shared = response_loss(moa, prompts, responses, 256, True, state, **kwargs)
    assert state[2].length == length == len(prompts[2])
    got = answers(moa, prompts, 8, 256, prefilled=state, **kwargs)
    alone = response_loss(moa, prompts, responses, 256, True, **kwargs)
    torch.testing.assert_close(shared[0], alone[0], rtol=0, atol=0)
    assert got == answers(moa, prompts, 8, 256, **kwargs)
    assert any(got), "the tiny random model should answer something"


def test_evaluate_tasks_scores_a_perfect_and_a_useless_answer(tiny_data, monkeypatch):
    """evaluate_tasks counts exact match and ROUGE-L on the greedy answer: an answerer that returns the reference
    scores 100% on both, one that returns nothing 0%; its loss is the mean over response tokens (nats)."""
    data = TaskData(tiny_data, "upper,arith")
    reference = {
        tuple(p): r[:-1]
        for name in data.domains
        for p, r in (data.record(name, "val", i) for i in range(data.count(name, "val")))
    }
    model = GPT(GPTConfig(block_size=128, vocab_size=257, n_layer=1, n_head=1, n_embd=8)).eval()
    import evaluate

    for answer, expected in (
        (lambda prompts: [reference[tuple(p)] for p in prompts], 1.0),
        (lambda prompts: [[] for _ in prompts], 0.0),
    ):
        monkeypatch.setattr(evaluate, "answers", lambda m, prompts, n, eot, answer=answer, **kw: answer(prompts))
        result = evaluate_tasks(model, data, 16, 8)
        assert result["em_mean"] == expected and result["rouge_mean"] == expected, result
    assert 4.0 < result["loss_mean"] < 7.0  # a random model: about log(257) = 5.55 nats per token


class Counter(torch.nn.Module):
    """A scripted model for generate(): the next token is always the last one plus 1 (mod vocab)."""

    config = GPTConfig(block_size=32, vocab_size=20, n_layer=1)
    generate = GPT.generate
    new_cache = GPT.new_cache

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))  # where the model lives (the CPU)

    def forward(self, idx, pad_mask=None, cache=None):
        return torch.nn.functional.one_hot((idx + 1) % 20, 20).float() * 10, None


def test_answers_stop_at_eot():
    """answers() returns each greedy continuation cut before its first EOT, at most max_new_tokens long: counting
    up from 3 with EOT = 6 answers [4, 5]; from 5, nothing; from 10 (EOT never comes), 4 tokens."""
    assert answers(Counter(), [[1, 2, 3], [5], [10]], 4, eot=6) == [[4, 5], [], [11, 12, 13, 14]]


def test_prompt_classifier_routes_by_the_prompt(tiny_data):
    """The classifier baseline, trained on the tasks' training prompts, routes >95% of validation prompts right,
    and ClassifierRouted serves each prompt with the classifier's expert (the MoA's label mode with its labels)."""
    data = TaskData(tiny_data, "upper,reverse,arith")
    classifier = PromptClassifier(3, bins=1024).fit(data, n_per_task=1000, steps=300)
    prompts = [data.record(n, "val", i)[0] for n in data.domains for i in range(32)]
    labels = torch.arange(3).repeat_interleave(32)
    assert (classifier(prompts) == labels).float().mean() > 0.95
    moa = tiny_moa()
    routed = ClassifierRouted(moa, classifier)
    with torch.no_grad():
        ours, _ = routed(torch.tensor([prompts[40]]))
        theirs, _ = moa(torch.tensor([prompts[40]]), domain=classifier([prompts[40]]), mode="label")
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert routed.routing["decision"].tolist() == classifier([prompts[40]]).tolist()
    torch.manual_seed(123)  # the same classifier whatever the process drew before (results.py fits it between rows)
    again = PromptClassifier(3, bins=1024).fit(data, n_per_task=1000, steps=300)
    torch.testing.assert_close(again.linear.weight, classifier.linear.weight, rtol=0, atol=0)


def test_arrow_prototypes_and_routes():
    """Arrow's prototype is the top right singular vector of B A (up to sign, 1e-5); every token's route puts
    weights summing to 1 on exactly top_k experts, the ones its input is most aligned with."""
    torch.manual_seed(0)
    A, B = torch.randn(4, 16), torch.randn(24, 4)
    v = torch.linalg.svd(B @ A).Vh[0]
    p = prototype(A, B)
    torch.testing.assert_close(p * torch.sign(p @ v), v, rtol=0, atol=1e-5)
    moa = tiny_moa()
    arrow = Arrow(copy.deepcopy(moa), top_k=2)
    layer = arrow.moa.gpt.transformer.h[0].mlp.c_fc
    x = torch.randn(2, 5, 16)
    arrow.prompt = None
    arrow.route(layer, (x,))
    weights = layer.route  # (B, T, K)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 5), rtol=0, atol=1e-6)
    assert ((weights > 0).sum(-1) == 2).all()
    best = (x @ layer.prototypes.t()).abs().topk(2, dim=-1).indices
    assert torch.equal(weights.topk(2, dim=-1).indices.sort(-1).values, best.sort(-1).values)
    with torch.no_grad():
        logits, _ = arrow(torch.randint(257, (2, 7)))
    assert logits.shape == (2, 7, 257) and arrow.routing["decision"].shape == (2,)


def test_gpt2_path_on_a_tiny_random_gpt2(tmp_path, monkeypatch):
    """With a local GPT-2 tokenizer folder and a tiny random GPT-2 checkpoint folder, prepare.py writes a user
    task in BPE tokens, train_lora.py trains an expert on the GPT-2 base and train_router.py a bundle: the
    pipeline a GPU user runs on real GPT-2 weights, offline."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "gpt2"
    write_gpt2_folder(folder, [(b"h", b"e"), (b"l", b"l"), (b" ", b"w")])
    vocab = json.loads((folder / "vocab.json").read_text())
    config = GPTConfig(block_size=64, vocab_size=len(vocab), n_layer=2, n_head=2, n_embd=16)
    torch.manual_seed(0)
    state = {k: v for k, v in GPT(config).state_dict().items() if k != "lm_head.weight"}
    for k in list(state):
        if k.endswith(("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")):
            state[k] = state[k].t().contiguous()  # GPT-2's Conv1D layout
    from safetensors.torch import save_file

    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(
        json.dumps({"n_positions": 64, "vocab_size": len(vocab), "n_layer": 2, "n_head": 2, "n_embd": 16})
    )
    for name, make in (
        ("hello", lambda i: {"prompt": f"say hello {i}\n", "response": "hello"}),
        ("count", lambda i: {"instruction": "next", "input": str(i), "output": str(i + 1)}),
    ):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(make(i)) for i in range(40)))
    data = tmp_path / "data"
    prepare(
        [
            f"--out_dir={data}",
            f"--tokenizer={folder}",
            "--only=none",
            f"--task=hello={tmp_path / 'hello.jsonl'}",
            f"--task=count={tmp_path / 'count.jsonl'}",
        ]
    )
    common = [
        f"--data_dir={data}",
        f"--base={folder}",
        "--batch_size=4",
        "--eval_iters=1",
        "--progress=False",
        "--device=cpu",
        "--max_iters=3",
        "--eval_interval=3",
        "--warmup_iters=1",
    ]
    for task in ("hello", "count"):
        model, losses = train_lora.main(common + [f"--out_dir={tmp_path / 'experts'}", f"--domain={task}"])
        assert len(losses) == 3
    moa, _ = train_router.main(common + [f"--experts={tmp_path / 'experts'}", f"--out_dir={tmp_path / 'moa'}"])
    assert moa.domains == ["hello", "count"] and os.path.isfile(tmp_path / "moa" / "moa.safetensors")
    gpt, tokenizer = load_base(str(folder))
    assert tokenizer == str(folder) and gpt.config.vocab_size == len(vocab)


def test_calibration_fits_the_routers_temperature(tiny_data, tmp_path):
    """Built-in tasks have a calib split in phrasings no split trains on; fit_temperature returns the grid's most
    likely temperature for the last router on it (no worse at T/2 nor 2T) and its routing accuracy there; the
    bundle keeps it, and the confidence a MoA reports is the last router's softmax at that temperature (1e-6)."""
    from evaluate import fit_temperature, left_pad
    from files import fingerprint, load_bundle, save_bundle

    data = TaskData(tiny_data, "upper,reverse,arith")
    assert all(data.count(d, "calib") == data.count(d, "unseen") == 32 for d in data.domains)
    val = {tuple(data.record(d, "val", i)[0]) for d in data.domains for i in range(data.count(d, "val"))}
    assert not val & {tuple(data.record(d, "calib", i)[0]) for d in data.domains for i in range(32)}
    prompt, _ = data.record("reverse", "calib", 0)
    prompt = prompt[-64:]  # tiny_moa's context
    moa = tiny_moa()
    T, accuracy = fit_temperature(moa, data)
    logits, labels = [], []
    for label, name in enumerate(data.domains):
        idx, mask = left_pad([data.record(name, "calib", i)[0][-64:] for i in range(32)], data.eot)
        with torch.no_grad():
            moa(idx, pad_mask=mask, mode="last")
        logits.append(moa.routing["logits"][-1])
        labels += [label] * 32
    logits, labels = torch.cat(logits), torch.tensor(labels)
    nll = lambda t: torch.nn.functional.cross_entropy(logits / t, labels).item()  # noqa: E731
    assert nll(T) <= min(nll(T / 2), nll(T * 2)) + 1e-6
    assert accuracy == pytest.approx((logits.argmax(-1) == labels).float().mean().item())
    moa.temperature = T
    path = str(tmp_path / "b.safetensors")
    save_bundle(path, moa, "bytes", fingerprint(moa))
    torch.manual_seed(0)  # the same base as tiny_moa's, built again
    loaded = load_bundle(path, GPT(GPTConfig(block_size=64, vocab_size=257, n_layer=2, n_head=2, n_embd=16)), "bytes")[
        0
    ]
    assert loaded.temperature == T
    idx = torch.tensor([prompt])
    with torch.no_grad():
        loaded(idx, mode="last")
    expected = torch.softmax(loaded.routing["logits"][-1] / T, -1)[0, loaded.routing["decision"][0]]
    assert loaded.routing["confidence"][0].item() == pytest.approx(expected.item(), abs=1e-6)


def test_left_and_right_padding():
    """left_pad puts each row at the right end of a (B, T_max) batch, right_pad at the left end, pad_id elsewhere;
    the mask is True exactly on the rows' tokens."""
    from evaluate import left_pad, right_pad

    idx, mask = left_pad([[1, 2, 3], [4]], 0)
    assert idx.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[True] * 3, [False, False, True]]
    idx, mask = right_pad([[1, 2, 3], [4]], 9)
    assert idx.tolist() == [[1, 2, 3], [4, 9, 9]] and mask.tolist() == [[True] * 3, [True, False, False]]
