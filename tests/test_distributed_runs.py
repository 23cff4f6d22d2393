"""GradualUnfreeze under ``ModelParallelStrategy`` (FSDP2) and under DDP with fp16 loss scaling, on 2 CPU processes.

One process pair runs the scenarios of ``tests/distributed_script.py`` that end normally in turn (see there); the tests
check them. Those that must fail run in process pairs of their own, with a timeout: a hang fails the test.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning_utilities.core.imports import RequirementCache

from lightning_bnfreeze.divergence import DIVERGED
from lightning_bnfreeze.domain_shift import NEAR_SOURCE
from lightning_bnfreeze.loss_rise import LOSS_RISE, RETRY_SCALE
from lightning_bnfreeze.step_size import AUTO_STEP, NEAR_DECAY, SMALLEST_REFERENCE

REPO = Path(__file__).resolve().parents[1]
FSDP2_ON_CPU = bool(RequirementCache("torch>=2.7"))
"""torch 2.6's FSDP2 does not run on the CPU ("'Stream' object has no attribute 'record_event'"): on CUDA it does."""
needs_fsdp2_on_cpu = pytest.mark.skipif(not FSDP2_ON_CPU, reason="FSDP2 on the CPU needs torch >= 2.7")
FSDP2_RUNS = (
    (
        "fsdp", "fsdp_stop", "fsdp_resume", "fsdp_auto", "fsdp_far", "fsdp_far_sgd",
        "fsdp_rise_rank0", "fsdp_rise_resume", "fsdp_rise_rank1", "fsdp_rise_adabn",
        "fsdp_diverge_rank0", "fsdp_diverge_resume", "fsdp_diverge_rank1",
    )
    if FSDP2_ON_CPU
    else ()
)  # fmt: skip
SCENARIOS = (
    "ddp", "ddp_auto", "ddp_far", "ddp_far_sgd", "ddp_rise_rank0", "ddp_rise_resume", "ddp_rise_rank1",
    "ddp_rise_adabn", "ddp_diverge_rank0", "ddp_diverge_resume", "ddp_diverge_rank1", *FSDP2_RUNS,
    "amp", "ddp_unused", *(("fsdp_unused",) if FSDP2_ON_CPU else ()),
)  # fmt: skip
RISE_STRATEGIES = ("ddp", pytest.param("fsdp", marks=needs_fsdp2_on_cpu))
RISE_RUNS = [
    pytest.param(strategy, run, marks=[needs_fsdp2_on_cpu] if strategy == "fsdp" else [], id=f"{strategy}_{run}")
    for run in ("rise_rank0", "rise_adabn")
    for strategy in ("ddp", "fsdp")
]  # `_rise_adabn`: with AdaBN(2, on_release=True), forwards without backward at each release
EPOCH_BATCHES = 4  # each rank's in the rise runs: the first release (epoch 1) comes at step 4, its watch ends at 7
WATCH_STEP = 6  # the step of their checkpoint inside that watch (tests/distributed_script.py)
DIVERGED_EPOCH = 2  # of the diverge runs (of 4 epochs): the second release's, judged at epoch 3's first batch
DIVERGED_STEP = 10  # the step of their checkpoint inside it, after the snapshot of the lowest epoch's end
TIMEOUT = 400
NEVER_RELEASED = "backbone.1."


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(out_dir: Path, scenarios: tuple[str, ...], timeout: float) -> list[tuple[int | None, str]]:
    """Run the scenarios on 2 processes: each rank's exit status (``None``: killed at the timeout) and output."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    env["PYTHONFAULTHANDLER"] = "1"  # a crash (a segfault in a collective, say) prints where each rank was
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
        assert returncode == 0, output[-8000:]  # a crash's stack, before the extension modules faulthandler lists
    return {
        scenario: [torch.load(out_dir / f"{scenario}-rank{rank}.pt", weights_only=True) for rank in range(2)]
        for scenario in SCENARIOS
    }


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[name].double() - b[name].double()).abs().max().item() for name in a)


def epoch_mean(losses: list[float], epoch: int) -> float:
    """A rank's mean training loss in ``epoch`` of a rise or diverge run (in their fit's first: in the epoch)."""
    return sum(losses[epoch * EPOCH_BATCHES : (epoch + 1) * EPOCH_BATCHES]) / EPOCH_BATCHES


def epoch_ratio(losses: list[float], epoch: int) -> float:
    """A rank's mean training loss in ``epoch`` over its mean in the fit's first: in the first release's epoch (1), its
    rise (against the epoch before); in a later one, how far it diverged (an epoch is within the checks' windows)."""
    return epoch_mean(losses, epoch) / epoch_mean(losses, 0)


def diverged_warnings(result: dict[str, Any]) -> list[str]:
    """The divergence check's warnings (on rank 0: ``rank_zero_warn``)."""
    return [warning for warning in result["warnings"] if "training loss diverged" in warning]


def lowest_epoch(warning: str) -> int:
    """The epoch whose end a divergence warning says the fit went back to (as ``tests/test_divergence.py`` reads it:
    not imported from there, which mypy would check along)."""
    match = re.search(r"back as it was at the end of epoch (\d+)", warning)
    assert match is not None, warning
    return int(match.group(1))


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


@pytest.mark.parametrize(("strategy", "run"), RISE_RUNS)
def test_a_loss_rise_on_rank_0_retries_the_release_on_every_rank_from_the_state_at_its_first_step(
    strategy: str, run: str, runs: dict[str, list[dict[str, Any]]]
) -> None:
    """Rank 0's loss rose after the first release, rank 1's did not: both ranks restore and slow it down alike."""
    (rank0, rank1), (calm, _) = runs[f"{strategy}_{run}"], runs[f"{strategy}_rise_rank1"]
    assert epoch_ratio(rank0["losses"], 1) >= LOSS_RISE > epoch_ratio(rank1["losses"], 1)
    # the first release retried once, the second (under which the loss falls back) not, on both ranks alike
    assert [retries for retries, _ in rank0["history"]] == [1, 0]
    assert rank1["history"] == rank0["history"]
    # at a tenth of the rates of the run without a retry: the retried release's, and the later release's
    assert [factors for _, factors in calm["history"]] == [[pytest.approx(0.5)], [pytest.approx(0.5)]]
    for (_, factors), (_, calm_factors) in zip(rank0["history"], calm["history"], strict=True):
        assert factors == pytest.approx([factor * RETRY_SCALE for factor in calm_factors])
    lrs = dict(rank0["groups"])
    assert [lrs["backbone.3"] / lrs["head"], lrs["backbone.0"] / lrs["head"]] == pytest.approx(
        [factor for _, (factor,) in rank0["history"]]
    )
    assert rank1["groups"] == rank0["groups"]
    for result in (rank0, rank1):
        assert sorted(result["after_retry"]) == [0]
        at_release, trained, retried = result["at_release"][0], result["before_retry"][0], result["after_retry"][0]
        # the release trained its block (weights, batch statistics, optimizer state) before the retry ...
        for name in ("backbone.3.0.weight", "head.weight"):
            assert not torch.equal(trained["params"][name], at_release["params"][name]), name
        assert not torch.equal(
            trained["buffers"]["backbone.3.1.running_mean"], at_release["buffers"]["backbone.3.1.running_mean"]
        )
        assert "backbone.3.0.weight" in trained["steps"]
        # ... which put everything back as it was at the release's first step (released weights without state)
        assert max_difference(retried["params"], at_release["params"]) == 0.0
        assert max_difference(retried["buffers"], at_release["buffers"]) == 0.0
        assert retried["steps"] == at_release["steps"]
        assert set(at_release["steps"]) == {"head.weight", "head.bias"}
    assert max_difference(rank0["final"], rank1["final"]) == 0.0
    if strategy == "fsdp":  # as under DDP
        assert max_difference(rank0["final"], runs[f"ddp_{run}"][0]["final"]) < 1e-5


@needs_fsdp2_on_cpu
def test_fsdp2_forwards_without_backward_at_a_release_leave_the_sharded_parameters_to_the_loss_check_and_first_steps(
    runs: dict[str, list[dict[str, Any]]],
) -> None:
    """``AdaBN(on_release=True)`` runs forwards without backward at each release, after which FSDP2 leaves the
    gathered parameters of its root units registered (the head's; the backbone's own, with ``backbone.0``, released
    second). The first release's snapshot and each release's first-step measure must hold the sharded ones: the
    snapshot restored them exactly (the test above, ``fsdp_rise_adabn``), and the first steps measure as under DDP."""
    (ddp, _), (fsdp, fsdp_rank1) = runs["ddp_rise_adabn"], runs["fsdp_rise_adabn"]
    for result in (ddp, fsdp, fsdp_rank1):
        # AdaBN re-estimated the frozen norm statistics at each release (never-released backbone.1's), after the
        # last step before it: the forwards happened between that step and the release's first one
        for index in (0, 1):
            before, at = result["before_release"][index]["buffers"], result["at_release"][index]["buffers"]
            assert not torch.equal(at["backbone.1.1.running_mean"], before["backbone.1.1.running_mean"]), index
    plain = runs["fsdp_rise_rank0"][0]  # without AdaBN on release, no statistics change there
    for index in (0, 1):
        assert max_difference(plain["at_release"][index]["buffers"], plain["before_release"][index]["buffers"]) == 0
    # the first steps of backbone.3 (retried: its first one alone is measured) and of backbone.0 (in the root unit)
    assert len(ddp["first_steps"]) == 2 and all(change > 0 for change in ddp["first_steps"])
    assert fsdp["first_steps"] == fsdp_rank1["first_steps"] == pytest.approx(ddp["first_steps"], rel=1e-5)


@pytest.mark.parametrize("strategy", RISE_STRATEGIES)
def test_a_loss_rise_on_rank_1_alone_retries_no_release(strategy: str, runs: dict[str, list[dict[str, Any]]]) -> None:
    """Rank 1's loss rose after the first release, rank 0's did not: rank 0's losses decide, for every rank."""
    rank0, rank1 = runs[f"{strategy}_rise_rank1"]
    assert epoch_ratio(rank1["losses"], 1) >= LOSS_RISE > epoch_ratio(rank0["losses"], 1)
    assert [retries for retries, _ in rank0["history"]] == [0, 0]
    assert rank1["history"] == rank0["history"]
    assert rank0["after_retry"] == rank1["after_retry"] == {}
    assert max_difference(rank0["final"], rank1["final"]) == 0.0
    if strategy == "fsdp":  # as under DDP
        assert max_difference(rank0["final"], runs["ddp_rise_rank1"][0]["final"]) < 1e-5


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


@pytest.mark.parametrize("strategy", RISE_STRATEGIES)
def test_a_fit_resumed_inside_the_watch_of_a_release_retries_it_as_the_uninterrupted_fit(
    strategy: str, runs: dict[str, list[dict[str, Any]]]
) -> None:
    """The ``_rise_rank0`` fit saved a checkpoint 2 batches into the first release's watch (of 4 batches), which the
    ``_rise_resume`` fit resumes: the checkpoint's snapshot (whole tensors, laid out again as the parameters are:
    sharded under FSDP2) lets it retry the release at the watch's end, and it ends where the uninterrupted fit does."""
    uninterrupted, resumed = runs[f"{strategy}_rise_rank0"], runs[f"{strategy}_rise_resume"]
    for rank in (0, 1):
        at_release = uninterrupted[rank]["at_release"][0]
        # the checkpoint inside the watch kept its losses and the snapshot taken at the release's first step, whole
        saved = resumed[rank]["saved_in_watch"]
        assert not saved["snapshot_due"]  # taken at the release's first step
        assert len(saved["before"]) == EPOCH_BATCHES and len(saved["after"]) == WATCH_STEP - EPOCH_BATCHES
        snapshot = saved["snapshot"]
        assert snapshot is not None
        trainable = [name for name in at_release["params"] if name.startswith(("head.", "backbone.3."))]
        assert sorted(snapshot["params"]) == sorted(trainable)
        assert max_difference(snapshot["params"], at_release["params"]) == 0.0
        assert max_difference(snapshot["buffers"], at_release["buffers"]) == 0.0
        (optimizer,) = snapshot["optimizers"]
        assert {name: int(state["step"]) for name, state in optimizer.items()} == at_release["steps"]
        # the fit's last checkpoint, after the watch, holds none
        assert resumed[rank]["saved_at_end"]["snapshot"] is None and resumed[rank]["saved_at_end"]["after"] is None
    # the resumed fit retried the release (once, and the later one at a tenth of its rate too) as the uninterrupted
    # fit did, on both ranks
    retried_once = [(1, [pytest.approx(0.5 * RETRY_SCALE)]), (0, [pytest.approx(0.5 * RETRY_SCALE)])]
    assert uninterrupted[0]["history"] == retried_once
    for rank in (0, 1):
        assert resumed[rank]["history"] == uninterrupted[rank]["history"] == uninterrupted[0]["history"]
        assert resumed[rank]["groups"] == uninterrupted[rank]["groups"]
    for run, whole in zip(resumed, uninterrupted, strict=True):  # rank by rank
        assert run["global_step"] == whole["global_step"] == 3 * EPOCH_BATCHES
        # it trained the watch's last batches as the uninterrupted fit did (the loader resumed mid-epoch),
        assert run["losses"] == whole["losses"][WATCH_STEP:]
        # went back to the checkpoint's snapshot: the state at the release's first step, exactly,
        (retried,) = run["after_retry"].values()
        assert max_difference(retried["params"], whole["at_release"][0]["params"]) == 0.0
        assert max_difference(retried["buffers"], whole["at_release"][0]["buffers"]) == 0.0
        assert retried["steps"] == whole["at_release"][0]["steps"]
        # and ended bitwise where the uninterrupted fit does (the same operations on the same values)
        assert max_difference(run["final"], whole["final"]) == 0.0


@pytest.mark.parametrize("strategy", RISE_STRATEGIES)
def test_a_divergence_on_rank_0_sends_every_rank_back_to_the_end_of_rank_0_s_lowest_epoch_at_a_tenth_of_the_rates(
    strategy: str, runs: dict[str, list[dict[str, Any]]]
) -> None:
    """Rank 0's loss diverged in the second release's epoch, rank 1's did not (its lowest epoch is the first
    release's, rank 0's the one before): both ranks go back to the end of rank 0's lowest epoch, and slow down."""
    (rank0, rank1), (calm, _) = runs[f"{strategy}_diverge_rank0"], runs[f"{strategy}_diverge_rank1"]
    assert epoch_ratio(rank0["losses"], DIVERGED_EPOCH) >= DIVERGED > epoch_ratio(rank1["losses"], DIVERGED_EPOCH)
    assert not any("training loss rose" in warning for warning in rank0["warnings"])  # the retry is the divergence's
    (warning,) = diverged_warnings(rank0)
    assert warning.startswith(f"GradualUnfreeze: the training loss diverged in epoch {DIVERGED_EPOCH}: ")
    lowest = lowest_epoch(warning)
    # rank 0's lowest epoch before it, which rank 1's is not: rank 0's losses decide which epoch's end is kept
    lowest_on = [min(range(DIVERGED_EPOCH), key=lambda epoch: epoch_mean(r["losses"], epoch)) for r in (rank0, rank1)]
    assert lowest_on[0] == lowest != lowest_on[1]
    # one retry, every release at a tenth of the rate of the run that did not go back, on both ranks alike
    assert [factors for _, factors in calm["history"]] == [[pytest.approx(0.5)], [pytest.approx(0.5)]]
    assert (
        rank0["history"]
        == rank1["history"]
        == [(1, [pytest.approx(0.5 * RETRY_SCALE)]), (0, [pytest.approx(0.5 * RETRY_SCALE)])]
    )
    lrs = dict(rank0["groups"])
    assert [lrs["backbone.3"] / lrs["head"], lrs["backbone.0"] / lrs["head"]] == pytest.approx([0.5 * RETRY_SCALE] * 2)
    assert rank1["groups"] == rank0["groups"]
    for result in (rank0, rank1):
        kept, diverged = result["epoch_ends"][lowest], result["epoch_ends"][DIVERGED_EPOCH]
        back = result["epoch_starts"][DIVERGED_EPOCH + 1]  # after the divergence check
        # the releases trained every block away from the lowest epoch's end (backbone.0, frozen then, too) ...
        for name in ("head.weight", "backbone.3.0.weight", "backbone.0.0.weight"):
            assert not torch.equal(diverged["params"][name], kept["params"][name]), name
        assert not torch.equal(
            diverged["buffers"]["backbone.0.1.running_mean"], kept["buffers"]["backbone.0.1.running_mean"]
        )
        assert "backbone.0.0.weight" in diverged["steps"]
        # ... and every weight and buffer went back there, the optimizer state of every weight dropped
        assert max_difference(back["params"], kept["params"]) == 0.0
        assert max_difference(back["buffers"], kept["buffers"]) == 0.0
        assert back["steps"] == {}
    # slowed down, the loss fell back (the fit's end judged the last epoch: no second warning, above)
    assert epoch_ratio(rank0["losses"], DIVERGED_EPOCH + 1) < DIVERGED
    assert max_difference(rank0["final"], rank1["final"]) == 0.0
    if strategy == "fsdp":  # as under DDP
        assert max_difference(rank0["final"], runs["ddp_diverge_rank0"][0]["final"]) < 1e-5


@pytest.mark.parametrize("strategy", RISE_STRATEGIES)
def test_a_divergence_on_rank_1_alone_sends_no_rank_back(strategy: str, runs: dict[str, list[dict[str, Any]]]) -> None:
    """Rank 1's loss diverged from the second release on, rank 0's did not: rank 0's losses decide, for every rank."""
    rank0, rank1 = runs[f"{strategy}_diverge_rank1"]
    for epoch in (DIVERGED_EPOCH, DIVERGED_EPOCH + 1):  # judged at the next epoch's first batch, and at the fit's end
        assert epoch_ratio(rank1["losses"], epoch) >= DIVERGED > epoch_ratio(rank0["losses"], epoch)
    assert diverged_warnings(rank0) == []
    assert [retries for retries, _ in rank0["history"]] == [0, 0]
    assert rank1["history"] == rank0["history"] and rank1["groups"] == rank0["groups"]
    for result in (rank0, rank1):  # trained on from the diverged epoch's end, optimizer state and all
        on, ended = result["epoch_starts"][DIVERGED_EPOCH + 1], result["epoch_ends"][DIVERGED_EPOCH]
        assert max_difference(on["params"], ended["params"]) == 0.0
        assert on["steps"] == ended["steps"] and "backbone.0.0.weight" in on["steps"]
    assert max_difference(rank0["final"], rank1["final"]) == 0.0
    if strategy == "fsdp":  # as under DDP
        assert max_difference(rank0["final"], runs["ddp_diverge_rank1"][0]["final"]) < 1e-5


@pytest.mark.parametrize("strategy", RISE_STRATEGIES)
def test_a_fit_resumed_inside_the_diverged_epoch_goes_back_as_the_uninterrupted_fit(
    strategy: str, runs: dict[str, list[dict[str, Any]]]
) -> None:
    """The ``_diverge_rank0`` fit saved a checkpoint 2 batches into the diverged epoch, after the snapshot of the lowest
    epoch's end, which the ``_diverge_resume`` fit resumes: the checkpoint's losses and snapshot (whole tensors, laid
    out again as the parameters are: sharded under FSDP2) let it judge the epoch and go back where the uninterrupted
    fit went, and it ends where that fit does."""
    uninterrupted, resumed = runs[f"{strategy}_diverge_rank0"], runs[f"{strategy}_diverge_resume"]
    (warning,) = diverged_warnings(uninterrupted[0])
    lowest, losses = lowest_epoch(warning), uninterrupted[0]["losses"]  # rank 0's, which the checkpoint keeps
    for rank in (0, 1):
        # the checkpoint kept rank 0's losses (the fit's first batches, the diverged epoch's so far), which epoch was
        # lowest, and every weight and buffer at its end, whole, without optimizer state
        saved = resumed[rank]["saved_in_diverged"]
        assert saved["epoch"] == DIVERGED_EPOCH and saved["lowest_epoch"] == lowest and not saved["warned"]
        assert saved["first"] == losses[:EPOCH_BATCHES]
        assert saved["last"] == losses[DIVERGED_EPOCH * EPOCH_BATCHES : DIVERGED_STEP]
        assert saved["lowest"] == pytest.approx(epoch_mean(losses, lowest))
        snapshot, kept = saved["snapshot"], uninterrupted[rank]["epoch_ends"][lowest]
        assert snapshot is not None and sorted(snapshot["params"]) == sorted(kept["params"])
        assert max_difference(snapshot["params"], kept["params"]) == 0.0
        assert max_difference(snapshot["buffers"], kept["buffers"]) == 0.0
        assert snapshot["optimizers"] == [{}]
    # the resumed fit judged the epoch as the uninterrupted fit did, and went back to the same epoch's end
    assert diverged_warnings(resumed[0]) == [warning]
    for run, whole in zip(resumed, uninterrupted, strict=True):  # rank by rank
        assert run["history"] == whole["history"] == uninterrupted[0]["history"]
        assert [retries for retries, _ in run["history"]] == [1, 0]
        assert run["groups"] == whole["groups"]
        assert run["global_step"] == whole["global_step"] == (DIVERGED_EPOCH + 2) * EPOCH_BATCHES
        assert run["losses"] == whole["losses"][DIVERGED_STEP:]  # the loader resumed mid-epoch
        back = run["epoch_starts"][DIVERGED_EPOCH + 1]
        assert max_difference(back["params"], whole["epoch_ends"][lowest]["params"]) == 0.0
        assert max_difference(back["buffers"], whole["epoch_ends"][lowest]["buffers"]) == 0.0
        assert back["steps"] == {}
        # and ended bitwise where the uninterrupted fit does (the same operations on the same values)
        assert max_difference(run["final"], whole["final"]) == 0.0
