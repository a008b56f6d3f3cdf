"""The whole of nanoMoA in one command: data, base, experts, routers, the results table, samples.

    python demo.py            # everything, on 2 CPU cores in about 20 minutes, into out/
    python demo.py --quick    # a first look in about 2 minutes, into out/quick/ (numbers not meaningful)

Each step calls the `main` of the script a user would run by hand (shown as it starts), and is
skipped when its output already exists, so an interrupted demo goes on where it stopped.

Read next: bench.py.
"""
import os
import time
from dataclasses import dataclass

import data.prepare
import results
import sample
import train_base
import train_lora
import train_router
from config import parse_config, run

PROMPTS = "def parse(self, text):||#include <vector>\\nnamespace at {||The with statement is used to||57+8="


def step(title, output, script, args):
    """Runs script.main(args) unless `output` exists; prints the equivalent command first."""
    if output and os.path.exists(output):
        print(f"[skip] {title}: {output} exists")
        return
    name = script.__name__.replace(".", "/") + ".py"
    print(f"\n[{title}] python {name} {' '.join(args)}", flush=True)
    t0 = time.time()
    script.main(args)
    print(f"[{title}] done in {time.time() - t0:.0f}s", flush=True)


@dataclass
class DemoConfig:
    quick: bool = False  # a two-minute first look, into out/quick
    data_dir: str = "data/default"


def main(argv=None):
    cfg = parse_config(DemoConfig, argv or [])
    quick, data_dir = cfg.quick, cfg.data_dir
    out = "out/quick" if quick else "out"
    iters = ({"base": 200, "lora": 60, "router": 60} if quick else {"base": 1200, "lora": 300, "router": 300})
    common = [f"--data_dir={data_dir}", "--progress=True"]
    base, experts, bundles = f"{out}/base", f"{out}/experts", f"{out}/moa"
    lora = common + [f"--base={base}", f"--out_dir={experts}", f"--max_iters={iters['lora']}"]
    router = common + [f"--base={base}", f"--experts={experts}", f"--out_dir={bundles}", f"--max_iters={iters['router']}"]
    t0 = time.time()

    step("data", f"{data_dir}/meta.json", data.prepare, [] if data_dir == "data/default" else ["--out", data_dir])
    domains = ["python", "cpp", "prose", "arith"]  # the default data's domains; unicode is held back
    step("base", f"{base}/ckpt.pt", train_base, common + [f"--out_dir={base}", f"--max_iters={iters['base']}"])
    for d in domains:
        step(f"stage 1: {d} expert", f"{experts}/{d}.safetensors", train_lora, lora + [f"--domain={d}"])
    step("stage 2: MoA (joint)", f"{bundles}/moa.safetensors", train_router, router)
    if not quick:
        K = len(domains)
        step("baseline: one LoRA on mixed data", f"{experts}/all.safetensors", train_lora, lora + ["--domain=all"])
        step(f"baseline: one LoRA, rank {8 * K}", f"{experts}/all_r{K}.safetensors", train_lora,
             lora + ["--domain=all", f"--rank={8 * K}", f"--alpha={16.0 * K}", f"--name=all_r{K}"])
        step("MoA, routers only", f"{bundles}/moa_routers.safetensors", train_router,
             router + ["--train_experts=False", "--name=moa_routers"])
        step("ablation: MoE-LoRA", f"{bundles}/moe_lora.safetensors", train_router,
             router + ["--mode=token", "--eta=0", "--name=moe_lora"])
        step("ablation: MoE-LoRA naive", f"{bundles}/moe_lora_naive.safetensors", train_router,
             router + ["--mode=token", "--eta=0", "--expert_init=random", "--name=moe_lora_naive"])
        step("adding a domain: unicode expert", f"{experts}/unicode.safetensors", train_lora, lora + ["--domain=unicode"])
        step("adding a domain: MoA + unicode", f"{bundles}/moa+unicode.safetensors", train_router,
             router + ["--add_domain=unicode", f"--bundle={bundles}/moa.safetensors"])
        step("adding a domain, every router row retrained", f"{bundles}/moa+unicode_allrows.safetensors", train_router,
             router + ["--add_domain=unicode", f"--bundle={bundles}/moa.safetensors", "--train_old_rows=True",
                       "--name=moa+unicode_allrows"])
        step("alternative: mixed LoRA trained on", f"{experts}/all+unicode.safetensors", train_lora,
             lora + ["--domain=unicode", f"--init_expert={experts}/all.safetensors", "--name=all+unicode"])
        step("alternative: MoA retrained on 5 domains", f"{bundles}/moa5.safetensors", train_router,
             router + [f"--domains={','.join(domains)},unicode", "--name=moa5"])
    step("results table", None, results, [f"--out={out}", f"--data_dir={data_dir}"] + (["--windows=16", "--problems=50"] if quick else []))
    step("routed samples", None, sample, [f"--base={base}", f"--bundle={bundles}/moa.safetensors", f"--prompt={PROMPTS}",
                                          "--max_new_tokens=60", "--temperature=0"])
    print(f"\ndemo finished in {(time.time() - t0) / 60:.1f} min; the table is in {out}/results/results.md")


if __name__ == "__main__":
    run(main)
