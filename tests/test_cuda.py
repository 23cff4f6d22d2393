"""The CUDA suite: ``python -m pytest -m cuda -q -rs`` runs, on the GPUs of the machine, everything marked ``cuda``:

- the compile tests (``tests/test_compile.py``, CUDA case: regional compile through a full default schedule, exact
  resume, frozen statistics bitwise);
- the distributed runs of ``tests/distributed_script.py`` over NCCL: DDP, FSDP2 (``ModelParallelStrategy``), an FSDP2
  resume from a distributed checkpoint, checked by the tests of ``tests/test_distributed_runs.py``; with one GPU they
  run on one rank (NCCL takes one GPU per rank), which stands for both ranks in those checks, and the two-rank
  scenarios (fp16 loss scaling with one rank overflowing, DDP gradient averaging) are skipped, saying so;
- AdaBN on a CUDA model (``tests/test_adapt.py``);
- the loss checks' copies of a CUDA model, kept in the CPU's memory and put back on the GPU
  (``tests/test_loss_rise.py``).

Without a GPU all of them skip at setup, from ``tests/conftest.py``, and ``-rs`` says so in ONE line naming what it
skipped (``SKIPPED [12] tests/conftest.py:..: no CUDA device: skipped the CUDA suite (...)``), at no cost: the default
run (``python -m pytest -q``) collects and skips them too. With one GPU, the two-rank scenarios skip saying so. About
3 minutes on one GPU (most of it compiling).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from tests import test_distributed_runs as runs_on_cpu
from tests import test_gradual_unfreeze_ddp as ddp_on_cpu

pytestmark = pytest.mark.cuda

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
SCENARIOS = ("ddp", "fsdp", "fsdp_stop", "fsdp_resume")


def need(gpus: int, what: str) -> None:
    if gpus > GPUS:
        found = "no CUDA device" if GPUS == 0 else f"{GPUS} CUDA device(s), {gpus} needed"
        pytest.skip(f"{found}: skipped {what}")


def launch(out_dir: Path, scenarios: tuple[str, ...], world: int) -> dict[str, list[dict[str, Any]]]:
    """The scenarios of ``tests/distributed_script.py`` on ``world`` GPUs over NCCL, each rank's results (with one
    rank, its results stand for rank 1's too)."""
    env = {"GU_TEST_ACCELERATOR": "cuda", "WORLD_SIZE": str(world)}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        if world == 2:
            results = runs_on_cpu.launch(out_dir, scenarios, runs_on_cpu.TIMEOUT)
        else:
            results = [_single_rank(out_dir, scenarios)]
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    for returncode, output in results:
        assert returncode == 0, output[-5000:]
    return {
        scenario: [
            torch.load(out_dir / f"{scenario}-rank{min(rank, world - 1)}.pt", weights_only=True) for rank in range(2)
        ]
        for scenario in scenarios
    }


def _single_rank(out_dir: Path, scenarios: tuple[str, ...]) -> tuple[int | None, str]:
    import subprocess
    import sys

    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(runs_on_cpu.free_port()),
        "LOCAL_RANK": "0",
        "NODE_RANK": "0",
    }
    process = subprocess.run(
        [sys.executable, "-m", "tests.distributed_script", str(out_dir), *scenarios],
        cwd=runs_on_cpu.REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=runs_on_cpu.TIMEOUT,
    )
    return process.returncode, process.stdout


@pytest.fixture(scope="module")
def nccl_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    need(1, "DDP over NCCL, FSDP2 and the FSDP2 resume on CUDA")
    return launch(tmp_path_factory.mktemp("nccl"), SCENARIOS, min(GPUS, 2))


def test_ddp_over_nccl_and_fsdp2_on_cuda_end_with_the_same_parameters(nccl_runs: dict[str, Any]) -> None:
    runs_on_cpu.test_fsdp2_run_ends_with_the_parameters_of_the_ddp_run(nccl_runs)


def test_fsdp2_on_cuda_resumes_exactly(nccl_runs: dict[str, Any]) -> None:
    runs_on_cpu.test_fsdp2_resumes_exactly_from_a_distributed_checkpoint(nccl_runs)


def test_fp16_loss_scaling_over_nccl_skips_the_step_where_one_rank_overflows(tmp_path: Path) -> None:
    need(2, "fp16 loss scaling over NCCL (one rank overflows: two ranks, one GPU each)")
    runs_on_cpu.test_fp16_loss_scaling_every_rank_skips_the_step_where_one_overflows(launch(tmp_path, ("amp",), 2))


def test_ddp_over_nccl_averages_the_released_gradients(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    need(2, "DDP gradient averaging over NCCL (two ranks, one GPU each)")
    monkeypatch.setenv("GU_TEST_ACCELERATOR", "cuda")
    ddp_on_cpu.test_ddp_ranks_keep_identical_parameters_only_with_gradient_averaging(tmp_path)
