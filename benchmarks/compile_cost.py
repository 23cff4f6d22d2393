"""Staged fine-tuning under ``torch.compile``: compile time and graphs per release, eager fall-backs, and each phase's
steady-state step time against a compiled floor, for a ResNet-style CNN and a ViT released one block at a time.

``python -m benchmarks.compile_cost [--jobs 2]`` writes ``benchmarks/compile_cost.md``, which says what is measured
and how (``SETUP``); ``--quick``: tiny models, Dynamo's ``eager`` backend, in this process (CI).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks import common
from benchmarks.common import median
from lightning_bnfreeze import Blocks, freeze_norm, is_norm_layer, unfreeze_norm
from lightning_bnfreeze.compile import compile_blocks, compile_counts, raise_recompile_limit, whole_model_budget

NAME, HOLDER, LR, WARM, VAL = "compile_cost", "compile_cost", 0.02, 3, 2
MODELS, MECHANISMS = ("cnn", "vit"), ("whole", "regional", "whole_raised")
SUMMARY = ["model", "mechanism", "releases", "graphs", "compile s (CPU)", "no eager fall-back"]
SUMMARY += ["compile <= 2x one whole compile", "every phase <= 1.05x its floor"]
Sample = tuple[float, float]  # wall, CPU seconds
SETUP = """Models (CPU, random weights, synthetic batches, SGD): *cnn*, a CIFAR-style ResNet (a stem conv and 9
BasicBlocks in 3 stages of 16/32/64 channels, BatchNorm; 32x32 inputs, batch 32); *vit*, timm's `VisionTransformer`
(depth 9, width 64, 4 heads, patch 4; batch 16). One block per release (10 releases), frozen and released as
`GradualUnfreeze(bn="train")` does; a phase: 10 training steps, then 2 validation batches. Mechanisms, each in a fresh
process and Inductor cache: `whole`, `torch.compile(model)` with Dynamo's default recompile limit (what users write);
`whole_raised`, with the limit `GradualUnfreeze` raises for it; `regional`, `compile_blocks(model, plan)`, what
`GradualUnfreeze(compile=True)` does. Compile time: a phase's steps and validation batches minus their steady state,
in process + child CPU seconds; *one whole compile*: `whole`'s phase 0 (training and validation graph). *x floor*
(`regional`, per phase, Dynamo's caches reset): the phase compiled regionally against its floor (the same trainable
set from the start, compiled once as a whole) and the eager model, one step each per round in rotating order: ratio
of the median step times, 95% bootstrap interval over the rounds."""


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None if stride == 1 else nn.Sequential(nn.Conv2d(cin, cout, 1, stride), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + (x if self.down is None else self.down(x)))


class ResNet(nn.Module):
    def __init__(self, widths: Sequence[int], per_stage: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        ins = [widths[0], *widths[:-1]]  # the first block of a stage after the first halves the size
        spec = [
            (ins[s], w, 2 if s else 1) if i == 0 else (w, w, 1) for s, w in enumerate(widths) for i in range(per_stage)
        ]
        self.blocks = nn.Sequential(*(BasicBlock(*args) for args in spec))
        self.num_features = widths[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.stem(x)).mean((2, 3))


class Net(nn.Module):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, nn.Linear(backbone.num_features, 10)  # type: ignore[arg-type]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


def build(model: str, quick: bool) -> Net:
    torch.manual_seed(0)
    if model == "cnn":
        return Net(ResNet((4, 8) if quick else (16, 32, 64), 2 if quick else 3))
    from timm.models.vision_transformer import VisionTransformer

    size, width, depth, heads = (8, 16, 3, 2) if quick else (32, 64, 9, 4)
    vit = VisionTransformer(img_size=size, patch_size=4, num_classes=0, embed_dim=width, depth=depth, num_heads=heads)
    return Net(vit)


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Staged:
    """A model frozen, then released up to ``phase`` as ``GradualUnfreeze(bn="train")`` does; its optimizer, its
    batches, and what its forward passes go through: ``mechanism`` (``"eager"``, ``"floor"`` or one of MECHANISMS)."""

    def __init__(self, model: str, quick: bool, backend: str, mechanism: str, phase: int = 0) -> None:
        self.net, self.i, self.released = build(model, quick), 0, 0
        self.plan = Blocks(per_release=1, granularity="block").plan(self.net, "backbone")
        size, batch = (8, 4) if quick else (32, {"cnn": 32, "vit": 16}[model])
        generator = torch.Generator().manual_seed(1)
        xs, ys = torch.randn(8, batch, 3, size, size, generator=generator), torch.randint(0, 10, (8, batch))
        self.data = list(zip(xs, ys, strict=True))
        self.optimizer = torch.optim.SGD(self.net.head.parameters(), lr=LR, momentum=0.9)
        self.net.backbone.requires_grad_(False)
        for layer in filter(is_norm_layer, self.net.backbone.modules()):
            freeze_norm(layer, HOLDER)
        while self.released < phase:
            self.release()
        self.forward: Callable[[Tensor], Tensor] = self.net
        self.limit = None  # the recompile limit raised for the run
        if mechanism == "regional":
            self.limit = compile_blocks(self.net, self.plan, backend=backend)
        elif mechanism in ("whole", "whole_raised", "floor"):
            if mechanism == "whole_raised":
                self.limit = raise_recompile_limit(whole_model_budget(len(self.plan.releases)))
            self.forward = torch.compile(self.net, backend=backend, isolate_recompiles=mechanism == "floor")

    def release(self) -> None:
        params, modules = dict(self.net.named_parameters()), dict(self.net.named_modules())
        for part in self.plan.releases[self.released]:
            group = [params[name].requires_grad_(True) for name in part.params]
            self.optimizer.add_param_group({"params": group, "lr": LR * part.lr_factor})
            for owner in {name.rpartition(".")[0] for name in part.params} & set(modules):
                for layer in filter(is_norm_layer, modules[owner].modules()):
                    unfreeze_norm(layer, training=True, holder=HOLDER)
        self.released += 1

    def frozen_norms(self) -> dict[str, Tensor]:
        layers = [(n, m) for n, m in self.net.named_modules() if is_norm_layer(m) and not m.weight.requires_grad]
        return {f"{name}.{key}": value.clone() for name, layer in layers for key, value in layer.named_buffers()}

    def step(self) -> Sample:
        x, y = self.data[self.i % len(self.data)]
        self.i += 1
        wall, cpu = time.perf_counter(), cpu_seconds()
        self.optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(self.forward(x), y).backward()
        self.optimizer.step()
        return time.perf_counter() - wall, cpu_seconds() - cpu

    def evaluate(self) -> Sample:
        self.net.eval()
        wall, cpu = time.perf_counter(), cpu_seconds()
        with torch.no_grad():
            self.forward(self.data[0][0])
        sample = time.perf_counter() - wall, cpu_seconds() - cpu
        self.net.train()
        return sample


def excess(samples: list[Sample], warm: int, i: int) -> float:
    """Seconds beyond the steady state (the median after the first ``warm``): the phase's compiles."""
    return max(0.0, sum(s[i] for s in samples) - len(samples) * median([s[i] for s in samples[warm:]]))


def against_floor(model: str, phase: int, args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    """Phase ``phase`` compiled regionally, its compiled floor and its eager twin: one step each per round."""
    torch.compiler.reset()
    runs = {key: Staged(model, args.quick, args.backend, key, phase) for key in ("regional", "floor", "eager")}
    for run in [*runs.values()] * WARM:
        run.step()  # the compiles
    walls: dict[str, list[float]] = {key: [] for key in runs}
    for i in range(args.rounds):
        for key in [*runs][i % 3 :] + [*runs][: i % 3]:
            walls[key].append(runs[key].step()[0])
    runs["regional"].limit.restore()  # type: ignore[union-attr]
    rounds = list(zip(walls["regional"], walls["floor"], walls["eager"], strict=True))

    def ratio(sample: Sequence[tuple[float, ...]], i: int = 0) -> float:
        return median([s[i] for s in sample]) / median([s[1] for s in sample])

    ms = {key: 1e3 * median(values) for key, values in walls.items()}
    return {"ms": ms, "ratio": ratio(rounds), "ci": common.bootstrap_ci(rounds, ratio, rng), "eager": ratio(rounds, 2)}


def worker(model: str, name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One mechanism through the whole schedule, then (``regional``) each phase against its floor."""
    torch.set_num_threads(1)
    run, rows = Staged(model, args.quick, args.backend, name), []
    snapshot = run.frozen_norms()
    for phase in range(len(run.plan.releases) + 1):
        if phase:
            run.release()
        before = compile_counts()
        steps, evals = [run.step() for _ in range(args.steps)], [run.evaluate() for _ in range(VAL)]
        counts = compile_counts() - before
        cpu, wall = (excess(steps, WARM, i) + excess(evals, 1, i) for i in (1, 0))
        frozen = all(torch.equal(v, snapshot[k]) for k, v in run.frozen_norms().items())
        row = dict(phase=phase, graphs=counts.graphs, hits=counts.limit_hits, compile_cpu=cpu, compile_wall=wall)
        rows.append({**row, "step_ms": 1e3 * median([w for w, _ in steps[WARM:]]), "bitwise": frozen})
        print(f"{model}/{name} {rows[-1]}", file=sys.stderr, flush=True)
    if run.limit is not None:
        run.limit.restore()
    if name == "regional":
        rng = random.Random(0)
        for row in rows:
            row["floor"] = against_floor(model, row["phase"], args, rng)
    return {"releases": len(run.plan.releases), "rows": rows}


def run_worker(model: str, name: str, args: argparse.Namespace) -> dict[str, Any]:
    """``worker`` in a fresh subprocess with an empty Inductor cache (``--quick``: here, Dynamo's caches reset)."""
    if args.quick:
        torch.compiler.reset()
        return worker(model, name, args)
    with tempfile.TemporaryDirectory() as cache:
        out = Path(cache) / "result.json"
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TORCHINDUCTOR_COMPILE_THREADS": "1"}
        argv = [*args.argv, "--worker", f"{model}:{name}", "--out", str(out)]
        subprocess.run([sys.executable, "-m", f"benchmarks.{NAME}", *argv], env=env, check=True)
        return dict(json.loads(out.read_text()))


def total(rows: list[dict], key: str) -> float:
    return sum(row[key] for row in rows)


def verdicts(rows: list[dict], reference: float | None) -> list[str]:
    """Per target of the issue: met or not, and the figure."""
    hits = [row["phase"] for row in rows if row["hits"]]
    cells = [f"no (from phase {hits[0]})" if hits else "yes"]
    ratio = total(rows, "compile_cpu") / reference if reference else None
    cells.append("-" if ratio is None else f"{'yes' if ratio <= 2 else 'no'} ({ratio:.2f}x)")
    floors = [row["floor"] for row in rows if "floor" in row]
    if not floors:
        return [*cells, "- (not timed against the floor)"]
    worst = max(range(len(floors)), key=lambda i: floors[i]["ratio"])
    over = sum(floor["ratio"] > 1.05 for floor in floors)
    met = "yes" if not over else f"no ({over} of {len(floors)} phases over)"
    return [*cells, f"{met}; worst {floors[worst]['ratio']:.2f}x (phase {worst})"]


def findings(model: str, by_name: dict[str, dict]) -> list[str]:
    """The verdict on one model, in words, from the rows alone."""
    lines = []
    for name, result in by_name.items():
        rows = result["rows"]
        hits = [row["phase"] for row in rows if row["hits"]]
        fell = f"falls back to eager from phase {hits[0]} of {len(rows) - 1}" if hits else "never falls back to eager"
        bitwise = "stay" if all(row["bitwise"] for row in rows) else "do **not** stay"
        graphs = total(rows, "graphs")
        lines.append(f"- {model} / `{name}`: {fell}; {graphs} graphs, frozen statistics {bitwise} bitwise.")
    rows = by_name.get("regional", {}).get("rows", [])
    floors = [(row["phase"], row["floor"]) for row in rows if "floor" in row]
    if floors:
        ratios = [f["ratio"] for _, f in floors]
        within = sum(r <= 1.05 for r in ratios)
        reach = sum(f["ci"][0] <= 1.05 for _, f in floors)
        slower = [phase for phase, f in floors if f["ms"]["regional"] > f["ms"]["eager"]]
        lines.append(
            f"- {model} / `regional` step time: {min(ratios):.2f}x to {max(ratios):.2f}x of the compiled floor;"
            f" {within} of {len(floors)} phases within 1.05x, {reach} with a 95% interval reaching below it;"
            f" slower than the eager model in {len(slower)} phase(s)"
            + (f" (from phase {slower[0]})." if slower else ".")
        )
    return lines


def per_phase(rows: list[dict]) -> str:
    header = ["phase", "graphs", "limit hits", "compile s (CPU)", "compile s (wall)", "step ms", "frozen BN bitwise"]
    header += ["floor ms", "regional ms", "x floor [95% CI]", "eager x floor"] if "floor" in rows[0] else []
    table = []
    for row in rows:
        cells = [*map(str, (row["phase"], row["graphs"], row["hits"])), f"{row['compile_cpu']:.1f}"]
        cells += [f"{row['compile_wall']:.1f}", f"{row['step_ms']:.1f}", "yes" if row["bitwise"] else "**no**"]
        if "floor" in row:
            f = row["floor"]
            cells += [f"{f['ms']['floor']:.1f}", f"{f['ms']['regional']:.1f}"]
            cells += ["{:.3f} [{:.3f}-{:.3f}]".format(f["ratio"], *f["ci"]), f"{f['eager']:.2f}"]
        table.append(cells)
    sums = [str(total(rows, "graphs")), str(total(rows, "hits")), f"{total(rows, 'compile_cpu'):.1f}"]
    table.append(["total", *sums, f"{total(rows, 'compile_wall'):.1f}", *([""] * (len(header) - 5))])
    return common.markdown_table(header, table)


def report(args: argparse.Namespace, env: dict[str, Any], results: dict[str, dict[str, dict]]) -> tuple[str, int]:
    summary, sections = [], []
    for model, by_name in results.items():
        whole = by_name.get("whole") or by_name.get("whole_raised")
        reference = whole["rows"][0]["compile_cpu"] if whole else None
        for name, result in by_name.items():
            rows = result["rows"]
            counts = [str(result["releases"]), str(total(rows, "graphs")), f"{total(rows, 'compile_cpu'):.1f}"]
            summary.append([model, f"`{name}`", *counts, *verdicts(rows, reference)])
            sections += ["", f"### {model} / `{name}` per phase (phase k: after release k)", "", per_phase(rows)]
    text = [
        "# Staged fine-tuning under torch.compile: compile cost per release, step time against the compiled floor",
        "",
        f"Generated by `python -m benchmarks.{NAME} {' '.join(args.argv)}` (backend `{args.backend}`). {SETUP}",
        "",
        "## Targets",
        "",
        common.markdown_table(SUMMARY, summary),
        "",
        "### Findings",
        "",
        *(line for model, by_name in results.items() for line in findings(model, by_name)),
        *sections,
        "",
        common.environment_table(env),
        "",
    ]
    return "\n".join(text), 2 + sum(len(by_name) for by_name in results.values())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--mechanisms", nargs="+", choices=MECHANISMS, default=["whole", "regional"])
    parser.add_argument("--steps", type=int, default=10, help="training steps per phase (default: 10)")
    parser.add_argument("--rounds", type=int, default=20, help="timing rounds against the floor (default: 20)")
    parser.add_argument("--jobs", type=int, default=1, help="mechanisms run at once (default: 1)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (default: inductor)")
    common.output_arguments(parser, NAME)
    parser.add_argument("--from-json", type=Path, help="write the report from a run's --json results, running nothing")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.quick:
        args.steps, args.rounds, args.backend = 5, 3, "eager"
    if args.from_json:  # the report again from a run's raw results
        saved = json.loads(args.from_json.read_text())
        args.argv, args.backend = saved["argv"], saved["environment"]["backend"]
        text, _ = report(args, saved["environment"], saved["results"])
        (common.HERE / f"{NAME}.md").write_text(text)
        return
    if args.worker:
        args.out.write_text(json.dumps(worker(*args.worker.split(":"), args)))
        return
    start, env = time.perf_counter(), {**common.environment(), "backend": args.backend, "jobs": args.jobs}
    pairs = sorted(((m, n) for m in args.models for n in args.mechanisms), key=lambda p: p[1] != "regional")
    with ThreadPoolExecutor(args.jobs) as pool:
        done = dict(zip(pairs, pool.map(lambda pair: run_worker(*pair, args), pairs), strict=True))
    results = {model: {name: done[model, name] for name in args.mechanisms} for model in args.models}
    text, tables = report(args, common.finish_environment(env, start), results)
    common.write_report(args, NAME, text, {"environment": env, "results": results}, tables)


if __name__ == "__main__":
    main()
