"""Stage 2 of MoA: the K stage-1 experts side by side, a router before every block, trained together
on evenly sampled records of all tasks with L = L_LM + eta * L_cls. Also adds and removes domains.

    python train_router.py                                   # MoA: experts + routers trained jointly
    python train_router.py --train_experts=False --name=moa_routers   # routers only, experts frozen
    python train_router.py --mode=token --eta=0 --name=moe_lora       # ablation: token-level MoE-LoRA
    python train_router.py --mode=token --eta=0 --expert_init=random --name=moe_lora_naive
    python train_router.py --add_domain=upper --bundle=out/moa/moa.safetensors   # K -> K+1 domains
    python train_router.py --remove_domain=upper --bundle=out/moa/moa+upper.safetensors
    python train_router.py --mode=token --eta=0 --init_bundle=out/moa/moe_lora_naive.safetensors \
        --learning_rate=3e-4 --router_lr=3e-3 --name=moe_lora_naive_annealed   # go on at a tenth of the rates

Which loss trains what: in mode label (MoA), each record goes through its task's expert, so L_LM trains
the experts only (it never reaches a router: the label, not the router, picked the expert), and L_cls
trains the routers only; each group stops at the plateau of its own validation loss (Stage2.units). The
routers read each record's prompt alone (`Batch.prompt`), which is all
that exists when a request arrives; with causal attention the prompt's block inputs are the same
whether or not the response follows. Every run writes one bundle, out/moa/<name>.safetensors
(experts, routers, domain names, the base's fingerprint), and its checkpoint and log in out/moa/<name>/.

Adding a domain (the paper claims it works, but gives no procedure; this is nanoMoA's): the new
domain's expert is trained first with stage 1 on the same frozen base (train_lora.py); every router
gets one more output row; then the new row trains on balanced replay of all K+1 domains while the
old experts, the old rows and the features the routers read (--router_hidden) stay frozen. An old
domain's prompt can then only change route where the new row's logit overtakes the old winner, which
the replay teaches it not to do (--train_old_rows=True retrains every row and the features instead:
the old domains' routing may then move, see the results).

Read next: sample.py, then results.py.
"""

import glob
import math
import os
from dataclasses import dataclass, replace

import torch

import fast
from batches import TaskData, check_records_fit
from config import A_NAME, AT_LEAST_0, AT_LEAST_1, FILE_NAME, FRACTION, POSITIVE, UserError, one_of, parse_config, run
from evaluate import evaluate_tasks, fit_temperature
from files import base_files, file_shapes, fingerprint, load_base, load_bundle, load_expert, read_meta, save_bundle
from moa import ROUTER_INPUTS, TARGETS, MoA, count_params, lora_layers, noise_generators
from storage import check_outputs
from trainer import TaskConfig, Unit, check_training_memory, micro_batches, pick_device, task_block_size, train


@dataclass
class RouterConfig(TaskConfig):
    out_dir: str = "out/moa"
    experts: str = "out/experts"  # stage-1 experts' folder (<domain>.safetensors); a comma list: the first with it
    expert_step: int = 0  # > 0: the experts' snapshots at that step, <domain>@<step>.safetensors (train_lora --save_at)
    name: str = ""  # the bundle's file name; default moa, or <bundle>+<domain> / <bundle>-<domain>
    eta: float = 1.0  # weight of the routers' domain-label loss L_cls
    train_experts: bool = True  # the paper: experts and routers trained jointly; False: routers only
    mode: str = "label"  # routing in training: label (MoA) | token (MoE-LoRA ablation) | layer (routers' choice)
    top_k: int = 2  # experts per token with mode=token (top-1 would give the router no gradient)
    pooling: str = "mean"  # how a router reads its block's input: mean over real tokens | last token
    router_input: str = "base"  # what a router reads: base (the frozen base's hidden state at its block) | block
    # (the block's input, with the earlier experts' output in it: later routers then learn the label from it, LOG.md)
    router_hidden: int = 64  # each token's features before a router pools: LayerNorm, C -> H, GELU; 0: the paper's
    # linear router (on the demo's base it routes 79% of validation prompts right, with 64 units 96-98%: README)
    router_window: int = 3  # a token's features read it and the window - 1 tokens before it: 3 routes the demo's
    # prompts better than 1 (README, Results); pooled routers with features only (1 with --router_hidden=0, mode token)
    expert_init: str = "stage1"  # stage1 experts, or random ones ("MoE-LoRA naive")
    rank: int = 8  # rank and alpha of random experts (stage-1 experts bring their own)
    alpha: float = 16.0  # (random experts: see rank)
    lora_dropout: float = 0.0  # dropout on the experts' input while they train
    bundle: str = ""  # an existing bundle to add a domain to or remove one from
    init_bundle: str = ""  # go on training this bundle (its experts, routers, top_k), e.g. annealed at lower rates
    add_domain: str = ""  # a domain to add to --bundle: its stage-1 expert from --experts, one more router row
    remove_domain: str = ""  # a domain to drop from --bundle, with its router row
    train_new_expert: bool = False  # when adding a domain: also fine-tune the new expert
    train_old_rows: bool = False  # when adding a domain: also retrain the routers' old rows (old routing may move)
    batch_size: int = 32
    eval_iters: int = 2
    learning_rate: float = 3e-4  # the experts' rate: at stage 1's 3e-3 stage 2 undid a third of them (LOG.md)
    min_lr: float = 3e-5
    router_lr: float = 0.03  # the routers' learning rate (their schedule is the experts', scaled): in the demo's 300
    # steps the routers (64 units) route 91.6% of the evaluated prompts right at 0.01, 95.3% at 0.03 (LOG.md)
    warmup_iters: int = 20
    weight_decay: float = 0.0

    CHECKS = {
        "eta": AT_LEAST_0,
        "mode": one_of("label", "token", "layer"),
        "top_k": AT_LEAST_1,
        "pooling": one_of("mean", "last"),
        "router_input": one_of(*ROUTER_INPUTS),
        "router_hidden": AT_LEAST_0,
        "router_window": AT_LEAST_1,
        "expert_init": one_of("stage1", "random"),
        "expert_step": AT_LEAST_0,
        "rank": AT_LEAST_1,
        "lora_dropout": FRACTION,
        "router_lr": POSITIVE,
        "name": FILE_NAME,
        "add_domain": A_NAME,
        "remove_domain": A_NAME,
    }


SETTINGS = ("mode", "top_k", "eta", "train_experts", "expert_init", "max_iters")  # kept in a bundle


def check_choices(cfg):
    """What the flags' bounds (RouterConfig.CHECKS) cannot say alone."""
    if cfg.add_domain and cfg.mode != "label":
        raise UserError("--add_domain trains a MoA bundle's routers on domain labels: leave --mode=label")
    if cfg.add_domain and not cfg.train_old_rows and cfg.weight_decay:
        raise UserError("--weight_decay would shrink the frozen old router rows; use 0, or --train_old_rows")
    if (cfg.add_domain or cfg.remove_domain) and not cfg.bundle:
        raise UserError("--add_domain / --remove_domain need --bundle=PATH of the bundle to change")
    if cfg.init_bundle and cfg.bundle:
        raise UserError("--init_bundle trains a bundle on as it is; --bundle adds or removes a domain: give one")
    if cfg.add_domain and cfg.remove_domain:  # else only the removal would happen, saved under the added name
        raise UserError("give --add_domain or --remove_domain, not both: one run changes a bundle by one domain")


def expert_path(cfg, domain):
    """Where a domain's stage-1 expert is: <domain>.safetensors in the first --experts folder that has it, or with
    --expert_step its snapshot <domain>@<step>.safetensors (the final expert if it stopped at its plateau before)."""
    for folder in cfg.experts.split(","):
        final = os.path.join(folder, f"{domain}.safetensors")
        if cfg.expert_step:
            snapshot = os.path.join(folder, f"{domain}@{cfg.expert_step}.safetensors")
            if os.path.isfile(snapshot):
                return snapshot
            if os.path.isfile(final) and read_meta(final, "expert")[1].get("steps", cfg.expert_step) < cfg.expert_step:
                return final
        elif os.path.isfile(final):
            return final
    wanted = f"{domain}@{cfg.expert_step}" if cfg.expert_step else domain
    raise UserError(
        f"no {wanted}.safetensors in --experts={cfg.experts}: train the expert first, "
        f"`python train_lora.py --domain={domain}`"
    )


def build(cfg, gpt, tokenizer, base, data_domains):
    """The MoA to train: fresh from stage-1 (or random) experts, or an existing bundle plus one domain."""
    if cfg.add_domain:
        moa, meta = load_bundle(cfg.bundle, gpt, tokenizer, base, eta=cfg.eta)  # everything frozen
        for p in moa.router_features.parameters():  # what the old rows read: it stays, unless they may move
            p.requires_grad_(cfg.train_old_rows)
        if meta.get("mode", "label") == "token":
            raise UserError(f"{cfg.bundle} routes per token (MoE-LoRA): adding a domain needs a MoA bundle")
        # BEGIN ASSIGNMENT 5: add the domain, its expert in the new slot; the new router row trains (maybe more)
        moa.add_domain(cfg.add_domain)
        load_expert(expert_path(cfg, cfg.add_domain), moa, len(moa.domains) - 1, base, tokenizer)
        for layer in lora_layers(moa):
            for p in [layer.lora_A[-1], layer.lora_B[-1]]:
                p.requires_grad_(cfg.train_new_expert)
        K = len(moa.domains) - 1  # rows 0..K-1 are the old domains'
        for p in moa.routers.parameters():
            p.requires_grad_(True)
            if not cfg.train_old_rows:  # zero the old rows' gradient: AdamW without decay then leaves them as they are
                p.register_hook(lambda g: torch.cat([torch.zeros_like(g[:K]), g[K:]]))
        return moa
        # END ASSIGNMENT 5
    if cfg.init_bundle:  # go on from a bundle: its experts and routers, trained as a fresh MoA's would be
        moa, _ = load_bundle(cfg.init_bundle, gpt, tokenizer, base, eta=cfg.eta)  # everything frozen
        for p in [*moa.routers.parameters(), *moa.router_features.parameters()]:
            p.requires_grad_(True)
        for layer in lora_layers(moa):
            for p in [*layer.lora_A, *layer.lora_B]:
                p.requires_grad_(cfg.train_experts)
        return moa
    rank, alpha = cfg.rank, cfg.alpha
    if cfg.expert_init == "stage1":  # the experts' files say their rank and alpha
        meta = read_meta(expert_path(cfg, data_domains[0]), "expert", gpt)[1]  # tensors checked: meta sizes the MoA
        rank, alpha, targets = meta["rank"], meta["alpha"], meta["targets"]
    else:
        targets = TARGETS
    W = window(cfg)
    # the sizes of the experts and routers to train, before they are made (file_shapes allocates nothing)
    sizes = {
        "rank": rank,
        "targets": targets,
        "domains": data_domains,
        "router_hidden": cfg.router_hidden,
        "router_window": W,
    }
    shapes = file_shapes(gpt, sizes, "bundle")
    flags = ("batch_size", "rank") if cfg.expert_init == "random" else ("batch_size",)
    check_training_memory(cfg, gpt.config, sum(math.prod(s) for s in shapes.values()), flags)
    moa = MoA(
        gpt,
        data_domains,
        rank,
        alpha,
        cfg.lora_dropout,
        targets,
        cfg.pooling,
        cfg.eta,
        cfg.top_k,
        cfg.router_input,
        router_hidden=cfg.router_hidden,
        router_window=W,
    )
    if cfg.expert_init == "stage1":
        for k, domain in enumerate(data_domains):
            load_expert(expert_path(cfg, domain), moa, k, base, tokenizer)
    for layer in lora_layers(moa):
        for p in [*layer.lora_A, *layer.lora_B]:
            p.requires_grad_(cfg.train_experts)
    return moa


def window(cfg):
    """The routers' window: --router_window where there is a per-token layer to read it and the routers pool (mode
    label or layer); else 1 (the paper's linear router reads the pooled state; mode token reads one token at a time)."""
    if cfg.router_window > 1 and (not cfg.router_hidden or cfg.mode == "token"):
        print(f"router window 1, not {cfg.router_window}: a window needs --router_hidden > 0 and a pooled --mode")
        return 1
    return cfg.router_window


def samples_before(cfg, domains):
    """Training records the starting point saw: the stage-1 experts' (or the bundle's, and the new expert's)."""
    if cfg.init_bundle:
        return read_meta(cfg.init_bundle, "bundle")[1].get("samples", 0)
    if cfg.add_domain:
        return read_meta(cfg.bundle, "bundle")[1].get("samples", 0) + read_meta(
            expert_path(cfg, cfg.add_domain), "expert"
        )[1].get("samples", 0)
    if cfg.expert_init == "random":
        return 0
    return sum(read_meta(expert_path(cfg, d), "expert")[1].get("samples", 0) for d in domains)


def continued(cfg):
    """With --init_bundle, the settings the bundle keeps (how its experts began, top_k) as it was trained, after
    checking that this run routes the same way (per token, or by label): the new bundle then says what it is."""
    if not cfg.init_bundle:
        return cfg
    meta = read_meta(cfg.init_bundle, "bundle")[1]
    if (meta.get("mode", "label") == "token") != (cfg.mode == "token"):
        raise UserError(f"{cfg.init_bundle} was trained with --mode={meta.get('mode', 'label')}: go on with that mode")
    return replace(cfg, **{k: meta[k] for k in ("expert_init", "top_k") if k in meta})


def bundle_name(cfg):
    """--name, or by what the run does: <bundle>+<domain>, <bundle>-<domain>, <init_bundle>_continued, or moa."""
    stem = os.path.splitext(os.path.basename(cfg.bundle or cfg.init_bundle))[0]
    if cfg.name:
        return cfg.name
    if cfg.add_domain:
        return f"{stem}+{cfg.add_domain}"
    if cfg.remove_domain:
        return f"{stem}-{cfg.remove_domain}"
    return f"{stem}_continued" if cfg.init_bundle else "moa"


def main(argv=None):
    cfg = parse_config(RouterConfig, argv or [])
    check_choices(cfg)
    pick_device(cfg.device, cfg.dtype)  # a device that is not here: said before anything is read
    cfg = continued(cfg)
    name = bundle_name(cfg)
    path, run_dir = os.path.join(cfg.out_dir, f"{name}.safetensors"), os.path.join(cfg.out_dir, name)
    check_outputs(
        [path, os.path.join(run_dir, "ckpt.pt"), os.path.join(run_dir, "log.jsonl")],  # --name picks them
        base_files(cfg.base)
        + [p for p in (cfg.bundle, cfg.init_bundle) if p]
        + [p for folder in cfg.experts.split(",") for p in glob.glob(os.path.join(folder, "*.safetensors"))],
    )
    gpt, tokenizer = load_base(cfg.base)
    base = fingerprint(gpt)

    if cfg.remove_domain:  # nothing to train: drop the expert and the routers' row
        moa, meta = load_bundle(cfg.bundle, gpt, tokenizer, base)
        moa.remove_domain(cfg.remove_domain)
        save_bundle(path, moa, tokenizer, base, {k: meta[k] for k in SETTINGS if k in meta})
        print(f"saved {path}: domains {', '.join(moa.domains)}")
        return moa, []

    block_size = task_block_size(cfg, gpt)
    domains = TaskData(cfg.data_dir, cfg.domains, block_size).domains
    if cfg.add_domain:
        domains = read_meta(cfg.bundle, "bundle")[1]["domains"] + [cfg.add_domain]
    if cfg.init_bundle:
        domains = read_meta(cfg.init_bundle, "bundle")[1]["domains"]
    if cfg.mode == "token" and cfg.top_k > len(domains):
        raise UserError(f"--top_k={cfg.top_k}: more than the {len(domains)} experts to choose from")
    torch.manual_seed(cfg.seed)  # new experts and routers start the same for the same seed
    moa = build(cfg, gpt, tokenizer, base, domains)
    fast.enable(moa, cfg.fast)
    data = TaskData(cfg.data_dir, ",".join(moa.domains), block_size, cfg.prompt_loss)  # labels: the bundle's order
    check_records_fit(data)
    if data.tokenizer != tokenizer:
        raise UserError(f"{cfg.data_dir} was prepared with tokenizer {data.tokenizer!r}, the base uses {tokenizer!r}")
    trainable, total = count_params(moa)
    print(f"MoA over {', '.join(moa.domains)}: {trainable:,} trainable of {total:,} parameters")
    stage = Stage2(cfg, moa, data, tokenizer, base, samples_before(cfg, moa.domains))
    meta = {"kind": "bundle", "domains": moa.domains, "base": base["sha256"]}
    losses = train(
        replace(cfg, out_dir=run_dir),
        moa,
        data,
        stage.evaluate,
        stage.loss,
        meta,
        lr_scales={"router": cfg.router_lr / cfg.learning_rate},  # routers.* and router_features.*
        finish=stage.finish(path),
        units=stage.units(),
        snapshot=lambda m, step, active: stage.save(m, os.path.join(cfg.out_dir, f"{name}@{step}.safetensors"), step),
    )
    return moa, losses


class Stage2:
    """What the loop asks of stage 2: the loss of a batch, the evaluation, the bundle file."""

    def __init__(self, cfg, moa, data, tokenizer, base, before):
        self.cfg, self.moa, self.data, self.tokenizer, self.base, self.before = cfg, moa, data, tokenizer, base, before

    def groups(self):
        """Experts and routers, clipped apart: their gradient norms differ 10-100 fold (LOG.md)."""
        routers = [p for m in (self.moa.routers, self.moa.router_features) for p in m.parameters() if p.requires_grad]
        experts = [p for p in self.moa.parameters() if p.requires_grad and all(p is not r for r in routers)]
        return {k: g for k, g in (("experts", experts), ("routers", routers)) if g}

    def units(self):
        """What stops on its own plateau: the experts when the loss that trains them (L_LM, routed as in training)
        stops falling on validation records, the routers when theirs (L_cls) does; the run ends when both have.
        In mode token one loss trains both through the per-token mixture: they stop together, on it."""
        groups = self.groups()
        if self.cfg.mode == "token":
            return [Unit("bundle", groups)]
        return [Unit(name, {name: params}) for name, params in groups.items()]

    def finish(self, path):
        """What the loop runs at the end: the bundle saved, with the step each unit stopped at."""
        return lambda m, steps: self.save(m, path, max(steps.values()), steps)

    def loss(self, m, batch):
        """L_LM + eta L_cls of a training batch; the routers read each record's prompt only."""
        noise = noise_generators(batch)
        return m(batch.x, batch.y, domain=batch.domain, mode=self.cfg.mode, router_mask=batch.prompt, noise=noise)[1]

    def evaluate(self, m):
        """No labels: each block's router decides from the prompt (results.py also scores last and vote); its
        loss_mean is what a user gets. Each unit's plateau watches its own loss: the routers' L_cls (cls_mean), the
        experts' L_LM as they train (mode label: each record through its own expert, label_loss_mean)."""
        cfg = self.cfg
        n, mode = cfg.eval_iters * cfg.batch_size, "token" if cfg.mode == "token" else "layer"
        scores = evaluate_tasks(m, self.data, n, cfg.batch_size, generate=False, served=False, mode=mode)
        if cfg.mode == "token":
            return {**scores, "watch/bundle": scores["loss_mean"]}
        groups = self.groups()
        watch = {"watch/routers": scores["cls_mean"]} if "routers" in groups else {}
        if "experts" in groups and cfg.mode == "label":
            given = evaluate_tasks(m, self.data, n, cfg.batch_size, generate=False, served=False, mode="label")
            scores["label_loss_mean"] = given["loss_mean"]
            watch["watch/experts"] = given["loss_mean"]
        elif "experts" in groups:
            watch["watch/experts"] = scores["loss_mean"]
        return {**scores, **watch}

    def save(self, m, path, steps, stopped=None):
        """Calibrates the routers' confidence (where the data has a calib split), then writes the bundle."""
        cfg, calibration = self.cfg, {}
        if cfg.mode != "token" and all(self.data.count(d, "calib") for d in m.domains):  # prepare.py writes them
            m.temperature, accuracy = fit_temperature(m.eval(), self.data)
            calibration = {"calib_route_acc": accuracy}
            print(f"confidence calibrated on held-out prompts: temperature {m.temperature:.3g}, right {accuracy:.1%}")
        elif cfg.mode != "token":
            lacking = [d for d in m.domains if not self.data.count(d, "calib")]
            print(
                f"confidence not calibrated (temperature {m.temperature:.3g}): no calib split for {', '.join(lacking)}"
            )
        samples = self.before + steps * cfg.batch_size * micro_batches(cfg)  # training records seen, in all
        settings = {k: getattr(cfg, k) for k in SETTINGS}
        units = {"unit_steps": stopped} if stopped else {}
        meta = {**settings, "samples": samples, "steps": steps, **units, **calibration}
        save_bundle(path, m, self.tokenizer, self.base, meta)
        m.train()
        each = f"; {', '.join(f'{k} {v}' for k, v in stopped.items())}" if stopped and len(stopped) > 1 else ""
        print(f"saved {path} ({steps} steps{each})")


if __name__ == "__main__":
    run(main)
