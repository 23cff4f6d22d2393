"""GradualUnfreeze under ``ModelParallelStrategy`` (FSDP2) and under DDP with fp16 loss scaling, on 2 CPU processes.

One process pair runs the scenarios of ``tests/distributed_script.py`` that end normally in turn (see there); the tests
check them. Those that must fail run in process pairs of their own, with a timeout: a hang fails the test.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning_utilities.core.imports import RequirementCache

from lightning_bnfreeze.domain_shift import NEAR_SOURCE
from lightning_bnfreeze.step_size import AUTO_STEP, NEAR_DECAY, SMALLEST_REFERENCE

REPO = Path(__file__).resolve().parents[1]
FSDP2_ON_CPU = bool(RequirementCache("torch>=2.7"))
"""torch 2.6's FSDP2 does not run on the CPU ("'Stream' object has no attribute 'record_event'"): on CUDA it does."""
needs_fsdp2_on_cpu = pytest.mark.skipif(not FSDP2_ON_CPU, reason="FSDP2 on the CPU needs torch >= 2.7")
FSDP2_RUNS = ("fsdp", "fsdp_stop", "fsdp_resume", "fsdp_auto", "fsdp_far", "fsdp_far_sgd") if FSDP2_ON_CPU else ()
SCENARIOS = (
    "ddp", "ddp_auto", "ddp_far", "ddp_far_sgd", *FSDP2_RUNS,
    "amp", "ddp_unused", *(("fsdp_unused",) if FSDP2_ON_CPU else ()),
)  # fmt: skip
TIMEOUT = 400
NEVER_RELEASED = "backbone.1."


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(out_dir: Path, scenarios: tuple[str, ...], timeout: float) -> list[tuple[int | None, str]]:
    """Run the scenarios on 2 processes: each rank's exit status (``None``: killed at the timeout) and output."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    ranks = [
        subprocess.Popen(  # as a module from the repository: this checkout's package, whatever is installed
            [sys.executable, "-m", "tests.distributed_script", str(out_dir), *scenarios],
            cwd=REPO,
            env={**env, "LOCAL_RANK": str(rank), "NODE_RANK": "0"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    results: list[tuple[int | None, str]] = []
    for process in ranks:
        try:
            output, _ = process.communicate(timeout=timeout)
            results.append((process.returncode, output))
        except subprocess.TimeoutExpired:
            for other in ranks:
                other.kill()
            results.append((None, process.communicate()[0]))
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    out_dir = tmp_path_factory.mktemp("distributed")
    for returncode, output in launch(out_dir, SCENARIOS, TIMEOUT):
        assert returncode is not None, f"distributed runs timed out:\n{output[-3000:]}"
        assert returncode == 0, output[-5000:]
    return {
        scenario: [torch.load(out_dir / f"{scenario}-rank{rank}.pt", weights_only=True) for rank in range(2)]
        for scenario in SCENARIOS
    }


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[name].double() - b[name].double()).abs().max().item() for name in a)


@needs_fsdp2_on_cpu
def test_fsdp2_run_ends_with_the_parameters_of_the_ddp_run(runs: dict[str, list[dict[str, Any]]]) -> None:
    (ddp, _), (fsdp, fsdp_rank1) = runs["ddp"], runs["fsdp"]
    assert [name for name, _ in fsdp["groups"]] == ["head", "backbone.3", "backbone.0"]
    assert fsdp["groups"] == ddp["groups"]
    for name, value in fsdp["final"].items():
        released = name.startswith(("head.", "backbone.3.", "backbone.0."))
        assert torch.equal(value, fsdp["initial"][name]) != released, name  # released ones trained, the others not
    assert max_difference(fsdp["final"], ddp["final"]) < 1e-5
    assert max_difference(fsdp["final"], fsdp_rank1["final"]) == 0.0
    # max_step="auto": the shift of both ranks' batches, the same on every rank as under DDP
    assert fsdp["source_shift"] is not None
    assert fsdp["source_shift"] == fsdp_rank1["source_shift"] == pytest.approx(ddp["source_shift"], rel=1e-9)
    # near the source, the release after a fast first one decays (under both strategies alike: the groups above)
    lrs = dict(fsdp["groups"])
    assert fsdp["source_shift"] < NEAR_SOURCE
    assert lrs["backbone.3"] / lrs["head"] == pytest.approx(0.5)
    assert lrs["backbone.0"] / lrs["head"] == pytest.approx(0.5 * NEAR_DECAY)
    # AdaBN over the data-parallel group: the frozen statistics are those of both ranks' batches, as under DDP
    frozen_statistics = {name: b for name, b in fsdp["buffers"].items() if name.startswith(NEVER_RELEASED)}
    assert max_difference(frozen_statistics, {name: ddp["buffers"][name] for name in frozen_statistics}) < 1e-5


def test_adapt_auto_re_estimates_the_statistics_of_every_rank_s_batches_as_norm_layers_start_training(
    runs: dict[str, list[dict[str, Any]]],
) -> None:
    (ddp, ddp_rank1), *sharded = runs["ddp_auto"], *([runs["fsdp_auto"]] if FSDP2_ON_CPU else [])
    assert ddp["train_norms"] == [[True], [True]]  # bn="auto": the first release moved fast
    never_released = {
        name: b for name, b in ddp["buffers"].items() if name.startswith(NEVER_RELEASED) and ".running_" in name
    }
    assert never_released and all(
        not torch.equal(b, ddp["initial_buffers"][name]) for name, b in never_released.items()
    )
    assert max_difference(ddp["final"], ddp_rank1["final"]) == 0.0
    assert max_difference(never_released, {name: ddp_rank1["buffers"][name] for name in never_released}) == 0.0
    for fsdp, fsdp_rank1 in sharded:  # under FSDP2 as under DDP
        assert fsdp["train_norms"] == ddp["train_norms"]
        assert max_difference(fsdp["final"], ddp["final"]) < 1e-5
        assert max_difference(fsdp["final"], fsdp_rank1["final"]) == 0.0
        assert max_difference({name: fsdp["buffers"][name] for name in never_released}, never_released) < 1e-5


def test_far_from_the_source_adapt_auto_re_estimates_every_rank_s_batches_before_the_first_step(
    runs: dict[str, list[dict[str, Any]]],
) -> None:
    (ddp, ddp_rank1), *sharded = runs["ddp_far"], *([runs["fsdp_far"]] if FSDP2_ON_CPU else [])
    assert ddp["source_shift"] >= NEAR_SOURCE
    statistics = {name: b for name, b in ddp["buffers_at_first_step"].items() if ".running_" in name}
    backbone = {name: b for name, b in statistics.items() if name.startswith("backbone.")}
    assert backbone and all(not torch.equal(b, ddp["initial_buffers"][name]) for name, b in backbone.items())
    # the ranks' batches differ: equal statistics on both ranks are those of all their batches
    assert max_difference(statistics, {name: ddp_rank1["buffers_at_first_step"][name] for name in statistics}) == 0.0
    assert max_difference(ddp["final"], ddp_rank1["final"]) == 0.0
    for fsdp, fsdp_rank1 in sharded:  # under FSDP2 as under DDP
        assert max_difference({name: fsdp["buffers_at_first_step"][name] for name in statistics}, statistics) < 1e-5
        assert fsdp["train_norms"] == ddp["train_norms"]
        assert max_difference(fsdp["final"], ddp["final"]) < 1e-5
        assert max_difference(fsdp["final"], fsdp_rank1["final"]) == 0.0


def test_far_from_the_source_under_sgd_the_first_step_s_averaged_gradients_bring_the_source_statistics_back(
    runs: dict[str, list[dict[str, Any]]],
) -> None:
    (ddp, ddp_rank1), *sharded = runs["ddp_far_sgd"], *([runs["fsdp_far_sgd"]] if FSDP2_ON_CPU else [])
    (estimate,) = ddp["estimates"]
    assert SMALLEST_REFERENCE < estimate <= AUTO_STEP
    assert ddp_rank1["estimates"] == [estimate]  # from both ranks' gradients: each rank's batch differs
    statistics = {name: b for name, b in ddp["buffers_at_second_step"].items() if ".running_" in name}
    assert all(not torch.equal(ddp["buffers_at_first_step"][name], b) for name, b in statistics.items())
    assert all(torch.equal(ddp["initial_buffers"][name], b) for name, b in statistics.items())  # the source's
    assert ddp["train_norms"] == [[False], [False]]
    assert max_difference(ddp["final"], ddp_rank1["final"]) == 0.0
    for fsdp, fsdp_rank1 in sharded:  # under FSDP2 as under DDP
        assert fsdp["estimates"] == fsdp_rank1["estimates"] == [pytest.approx(estimate, rel=1e-5)]
        assert max_difference({name: fsdp["buffers_at_second_step"][name] for name in statistics}, statistics) == 0
        assert fsdp["train_norms"] == ddp["train_norms"]
        assert max_difference(fsdp["final"], ddp["final"]) < 1e-5
        assert max_difference(fsdp["final"], fsdp_rank1["final"]) == 0.0


@needs_fsdp2_on_cpu
def test_fsdp2_resumes_exactly_from_a_distributed_checkpoint(runs: dict[str, list[dict[str, Any]]]) -> None:
    (stopped, _), (resumed, resumed_rank1), (uninterrupted, _) = runs["fsdp_stop"], runs["fsdp_resume"], runs["fsdp"]
    assert [name for name, _ in stopped["groups"]] == ["head", "backbone.3"]
    # ModelParallelStrategy restores after `on_fit_start`: the released groups are added right before it loads the
    # optimizers' state (which fails on a missing group), so a probe at `on_fit_start` sees the head alone
    assert resumed["groups_at_fit_start"] == resumed_rank1["groups_at_fit_start"] == ["head"]
    assert uninterrupted["groups_at_fit_start"] == ["head"]
    assert resumed["groups"] == uninterrupted["groups"]
    # max_step="auto" kept the checkpoint's shift (measured again, it would see AdaBN's and the trained statistics)
    assert resumed["source_shift"] == resumed_rank1["source_shift"] == uninterrupted["source_shift"]
    assert max_difference(resumed["final"], uninterrupted["final"]) == 0.0
    assert max_difference(resumed["final"], resumed_rank1["final"]) == 0.0
    # the never-released block's norm statistics stay bitwise those of the checkpoint through the resumed epoch
    for name, value in resumed["buffers"].items():
        if name.startswith(NEVER_RELEASED):
            assert torch.equal(value, stopped["buffers"][name]), name
    assert not torch.equal(resumed["final"]["backbone.0.0.weight"], stopped["final"]["backbone.0.0.weight"])


def test_fp16_loss_scaling_every_rank_skips_the_step_where_one_overflows(
    runs: dict[str, list[dict[str, Any]]],
) -> None:
    rank0, rank1 = runs["amp"]
    # the hostile case: at the first step after the release, rank 1 overflows in the released layer's own
    # gradients (not in the head's, which DDP averages), rank 0 does not
    assert rank0["local_finite"][0] and not rank1["local_finite"][0]
    assert rank0["scale"] == rank1["scale"] == 2.0**15  # both skipped that one step, and lowered the scale alike
    assert rank0["steps"] == rank1["steps"]
    assert max_difference(rank0["final"], rank1["final"]) == 0.0
    assert all(torch.isfinite(value).all() for value in rank0["final"].values())


@needs_fsdp2_on_cpu
def test_fsdp2_released_parameter_unused_on_one_rank_trains_as_under_ddp(
    runs: dict[str, list[dict[str, Any]]],
) -> None:
    """``backbone.extra`` is in rank 0's forward only: its unit reduce-scatters zeros for rank 1, as DDP averages."""
    (ddp, _), (fsdp, fsdp_rank1) = runs["ddp_unused"], runs["fsdp_unused"]
    assert (
        [name for name, _ in fsdp["groups"]]
        == ["head", "backbone.proj", "backbone.extra"]
        == [name for name, _ in ddp["groups"]]
    )
    assert not torch.equal(fsdp["final"]["backbone.extra.weight"], fsdp["initial"]["backbone.extra.weight"])
    assert max_difference(fsdp["final"], ddp["final"]) < 1e-5
    assert max_difference(fsdp["final"], fsdp_rank1["final"]) == 0.0


@needs_fsdp2_on_cpu
@pytest.mark.parametrize(
    ("scenario", "expected"),
    [
        # no gradient reaches `backbone` on rank 1 at all: every rank stops with one clear error, naming the parameters
        ("fsdp_unused_alone", "the released backbone.extra.weight, backbone.extra.bias in `backbone` get gradients on"),
        # control: without the library's reductions of zeros, the ranks' collectives differ (gloo aborts or times out)
        ("fsdp_unused_control", None),
    ],
)
def test_fsdp2_unit_without_gradients_on_one_rank_does_not_hang(
    scenario: str, expected: str | None, tmp_path: Path
) -> None:
    for returncode, output in launch(tmp_path, (scenario,), TIMEOUT):
        assert returncode != 0, output[-3000:]
        if expected is not None:
            assert returncode is not None and expected in output, output[-3000:]
