"""Stage 2 stops its experts and its routers apart: each unit's plateau watches the validation loss that trains it
(the experts' L_LM with each record's label, the routers' L_cls); a stopped unit's weights stay as they are while
the other trains on, and the bundle says where each stopped."""

import json

import pytest
import torch
import torch.nn.functional as F

import train_router
from batches import TaskData
from conftest import TASK_FLAGS, train_tiny_experts
from evaluate import evaluate_tasks, fit, left_pad
from files import load_base, load_bundle, read_meta, read_safetensors

STEPS = 16


@pytest.fixture(scope="module")
def stopped(tiny_data, tiny_base, tmp_path_factory):
    """A stage-2 run evaluated at every step, its units on the plateau rule from step 10 (the tiny experts' loss
    barely moves at stage 2's rate, the routers' falls for 30 steps), saving the bundle at every step -> (out
    folder, the run's flags, the log's records, the bundle's metadata)."""
    out = tmp_path_factory.mktemp("stops")
    train_tiny_experts(tiny_data, tiny_base, out / "experts", ("arith", "reverse"))
    flags = TASK_FLAGS + [f"--data_dir={tiny_data}", f"--base={tiny_base}", f"--experts={out / 'experts'}"]
    flags += [f"--out_dir={out}", "--domains=arith,reverse", "--router_hidden=8", f"--max_iters={STEPS}"]
    every = ",".join(str(s) for s in range(1, STEPS + 1))
    train_router.main(flags + ["--stop_flat=0.02", "--stop_after=10", "--eval_interval=1", f"--save_at={every}"])
    with open(out / "moa" / "log.jsonl") as f:
        log = [json.loads(line) for line in f]
    return out, flags, log, read_meta(str(out / "moa.safetensors"), "bundle")[1]


def test_each_unit_watches_the_loss_that_trains_it(stopped):
    """In every log line the experts' plateau reads the label-given loss and the routers' their L_cls, not the routed
    loss a user gets (which differs from both)."""
    _, _, log, _ = stopped
    for record in log:
        assert record["watch/experts"] == record["label_loss_mean"]
        assert record["watch/routers"] == record["cls_mean"]
        assert record["watch/experts"] != record["loss_mean"]
    assert "watch/bundle" not in log[0]


def test_the_units_stop_apart_and_a_stopped_unit_is_left_as_it_is(stopped):
    """The experts stop at their plateau and the routers train on to the cap; the experts' weights are the same in the
    snapshot at their stop and at the end, the routers' are not; the bundle's steps are the later stop."""
    out, _, _, meta = stopped
    steps = meta["unit_steps"]
    assert steps["experts"] < steps["routers"] == STEPS == meta["steps"], steps
    first = min(steps, key=steps.get)
    at_stop = read_safetensors(str(out / f"moa@{steps[first]}.safetensors"))[0]
    final = read_safetensors(str(out / "moa.safetensors"))[0]

    def is_router(name):
        return name.startswith(("routers.", "router_features."))

    for name, tensor in final.items():
        if is_router(name) == (first == "routers"):
            assert torch.equal(tensor, at_stop[name]), name
    others = [n for n in final if is_router(n) != (first == "routers")]
    assert any(not torch.equal(final[n], at_stop[n]) for n in others)


def test_cls_is_the_routers_cross_entropy_on_the_prompts(stopped, tiny_data, tiny_base):
    """evaluate_tasks' cls/<task>: the mean over routers and prompts of each router's cross-entropy against the task,
    on the same left-padded prompts as served (1e-5), and the log's last routers' watch is it."""
    out, _, log, _ = stopped
    moa = load_bundle(str(out / "moa.safetensors"), *load_base(tiny_base))[0].eval()
    data = TaskData(tiny_data, "arith,reverse", moa.config.block_size)
    scores = evaluate_tasks(moa, data, 8, 8, generate=False, served=False, mode="layer")
    for label, task in enumerate(data.domains):
        records = [data.record(task, "val", i) for i in range(8)]
        prompts, _ = fit(*zip(*records), moa.config.block_size)
        idx, mask = left_pad(prompts, data.eot)
        with torch.no_grad():
            moa(idx, pad_mask=mask, mode="layer")
        logits = moa.routing["logits"].float()  # (L, B, K)
        want = torch.stack([F.cross_entropy(layer, torch.full((len(prompts),), label)) for layer in logits]).mean()
        assert scores[f"cls/{task}"] == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
    full = evaluate_tasks(moa, data, 8, 8, generate=False, served=False, mode="layer")  # as train_router's eval_iters=1
    assert log[-1]["watch/routers"] == pytest.approx(full["cls_mean"], rel=1e-5)


def test_routers_and_experts_train_independently_in_mode_label(stopped, tmp_path):
    """With the routers reading the frozen base (the default) and the label routing the records, neither group's
    training sees the other: routers trained beside frozen experts (--train_experts=False) come out bit for bit as
    MoA's, and MoA's experts come out the same whatever the routers are (a 1-token window against the default 3).
    The README's routers-only and single-token rows rest on this."""
    out, flags, _, _ = stopped
    flags = [f for f in flags if not f.startswith(("--out_dir", "--max_iters"))] + ["--max_iters=6"]

    def run(name, *more):
        train_router.main(flags + [f"--out_dir={tmp_path}", f"--name={name}", *more])
        return read_safetensors(str(tmp_path / f"{name}.safetensors"))[0]

    moa, routers_only, window1 = run("moa"), run("routers", "--train_experts=False"), run("w1", "--router_window=1")

    def is_router(name):
        return name.startswith(("routers.", "router_features."))

    experts = [n for n in moa if not is_router(n)]
    assert experts and all(torch.equal(moa[n], window1[n]) for n in experts)
    assert any(not torch.equal(moa[n], routers_only[n]) for n in experts)  # MoA's experts did train
    routers = [n for n in moa if is_router(n)]
    assert routers and all(torch.equal(moa[n], routers_only[n]) for n in routers)
    assert any(moa[n].shape != window1[n].shape for n in routers)  # the window changed the routers
