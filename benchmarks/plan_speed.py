"""How long ``find_blocks`` takes to plan a backbone's blocks, up to a 7B-parameter Llama.

Models, built with random weights on the meta device (no memory, no initialisation cost in the
timing): ``transformers`` ``LlamaForCausalLM`` with the Llama-2-7B sizes (hidden 4096, MLP 11008,
32 layers, 32 heads, vocabulary 32000: 6.7B parameters), torchvision ViT-B/16 and ResNet-50
(discovery), timm ViT-B/16 (its own ``group_matcher``). For each model and granularity: the
median and the range of the wall time of ``find_blocks(model, "backbone", granularity)`` over
``--runs`` calls after one warm-up call (garbage collection off while timing). The budget is
100 ms for the 7B Llama.

Run from the repository root (about a minute; ``nice -n 10``, ``OMP_NUM_THREADS=1`` on a shared machine)::

    python -m benchmarks.plan_speed
    python -m benchmarks.plan_speed --runs 5 --markdown /tmp/plan.md   # quick look, no raw file
    python -m benchmarks.plan_speed --quick                            # CI smoke test: 2 runs, to a temp dir

The report goes to ``benchmarks/plan_speed.md`` (committed), the raw times to
``benchmarks/raw/plan_speed.json`` (git-ignored).
"""

from __future__ import annotations

import argparse
import gc
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import timm
import torch
import torchvision
import transformers
from torch import nn

from benchmarks import common
from benchmarks.common import markdown_table, median
from lightning_bnfreeze.blocks import GRANULARITIES, find_blocks

BUDGET_MS = 100.0


def llama_7b() -> nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    )
    return transformers.LlamaForCausalLM(config)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "Llama 7B (transformers LlamaForCausalLM)": llama_7b,
    "ViT-B/16 (torchvision vit_b_16)": lambda: torchvision.models.vit_b_16(weights=None),
    "ResNet-50 (torchvision resnet50)": lambda: torchvision.models.resnet50(weights=None),
    "ViT-B/16 (timm vit_base_patch16_224, group_matcher)": lambda: timm.create_model("vit_base_patch16_224"),
}


def time_plan(model: nn.Module, granularity: str, runs: int) -> list[float]:
    """Milliseconds per ``find_blocks`` call, after one warm-up call."""
    find_blocks(model, "backbone", granularity)
    times = []
    gc.disable()
    try:
        for _ in range(runs):
            start = time.perf_counter()
            find_blocks(model, "backbone", granularity)
            times.append((time.perf_counter() - start) * 1000)
    finally:
        gc.enable()
    return times


def measure(runs: int) -> list[dict[str, Any]]:
    rows = []
    for label, build in MODELS.items():
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = build()
        for granularity in GRANULARITIES:
            times = time_plan(model, granularity, runs)
            rows.append(
                {
                    "model": label,
                    "granularity": granularity,
                    "parameters": sum(param.numel() for param in model.parameters()),
                    "tensors": sum(1 for _ in model.parameters()),
                    "modules": sum(1 for _ in model.modules()),
                    "blocks": len(find_blocks(model, "backbone", granularity)),
                    "median_ms": median(times),
                    "min_ms": min(times),
                    "max_ms": max(times),
                    "raw_ms": times,
                }
            )
    return rows


def report(env: dict[str, Any], rows: Sequence[dict[str, Any]], runs: int) -> str:
    table = markdown_table(
        ["model", "granularity", "parameters", "tensors / modules", "blocks", "median ms", "min-max ms"],
        [
            [
                row["model"],
                row["granularity"],
                f"{row['parameters'] / 1e6:,.1f}M",
                f"{row['tensors']} / {row['modules']}",
                str(row["blocks"]),
                f"{row['median_ms']:.2f}",
                f"{row['min_ms']:.2f}-{row['max_ms']:.2f}",
            ]
            for row in rows
        ],
    )
    llama = [row for row in rows if row["model"].startswith("Llama")]
    medians = ", ".join(f"{row['median_ms']:.1f} ms ({row['granularity']})" for row in llama)
    verdict = "within" if all(row["median_ms"] <= BUDGET_MS for row in llama) else "OVER"
    return (
        "# Planning speed: `find_blocks`\n\n"
        f'Wall time of `find_blocks(model, "backbone", granularity)` on models built on the meta device, {runs}'
        " calls after one warm-up (`python -m benchmarks.plan_speed`; method in its docstring).\n\n"
        f"{table}\n\n"
        f"The 7B Llama plans in a median {medians}: {verdict} the"
        f" {BUDGET_MS:.0f} ms budget. The cost grows with the number of parameter tensors and modules, not with"
        " their size.\n\n"
        f"Machine: {env['cpu']} ({env['cpu_count']} cores), {env['platform']}; Python {env['python']}, torch"
        f" {env['torch']}, torchvision {env['torchvision']}, timm {timm.__version__}, transformers"
        f" {transformers.__version__}; torch threads {env['torch_threads']}; load average"
        f" {env['load_average_1min_at_start']:.1f} at start, {env['load_average_1min_at_end']:.1f} at end (a shared"
        " machine: the minimum is the least disturbed time).\n"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=21, help="timed calls per model and granularity (default: 21)")
    common.output_arguments(parser, "plan_speed")
    args = parser.parse_args(argv)
    args.runs = 2 if args.quick else args.runs
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    torch.set_num_threads(1)
    env, start = common.environment(), time.perf_counter()
    rows = measure(args.runs)
    common.finish_environment(env, start)
    common.write_report(args, "plan_speed", report(env, rows, args.runs), {"environment": env, "rows": rows}, 1)


if __name__ == "__main__":
    main()
