"""GradualUnfreeze under ``strategy="ddp"`` (2 CPU processes, gloo): modules released after the model was wrapped
get their gradients averaged, so the ranks keep identical parameters; without the averaging they drift apart."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("ddp_script.py")
TIMEOUT = 240


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(out_dir: Path, average: bool) -> subprocess.Popen[str]:
    out_dir.mkdir()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env.pop("GU_TEST_NO_AVERAGE", None)
    if not average:
        env["GU_TEST_NO_AVERAGE"] = "1"
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), str(out_dir)],
        cwd=SCRIPT.parent.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process: subprocess.Popen[str], out_dir: Path) -> list[dict]:
    try:
        output, _ = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        raise AssertionError(f"DDP run timed out:\n{output[-3000:]}") from None
    assert process.returncode == 0, output[-3000:]
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=True) for rank in range(2)]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str = "") -> float:
    return max((a[name] - b[name]).abs().max().item() for name in a if name.startswith(prefix))


def test_ddp_ranks_keep_identical_parameters_only_with_gradient_averaging(tmp_path: Path) -> None:
    # both runs at once: 4 processes on the test machine's 2 cores are still quicker than one after the other
    processes = {average: launch(tmp_path / f"average={average}", average) for average in (True, False)}
    averaged, not_averaged = (finish(processes[average], tmp_path / f"average={average}") for average in (True, False))

    rank0, rank1 = averaged
    assert rank0["data_sum"] != rank1["data_sum"]  # each rank trained on its own shard
    for rank in averaged:
        assert rank["groups"] == ["head", "backbone.3", "backbone.0"]
        for name, value in rank["final"].items():
            trained = name.startswith(("head.", "backbone.3.", "backbone.0."))
            if name.endswith("weight"):  # (a conv's bias before a training BatchNorm gets next to no gradient)
                assert torch.equal(value, rank["initial"][name]) != trained, name
    # one INFO line for max_step="auto" and one per release, on rank zero only
    assert len(rank0["lines"]) == 3 and rank1["lines"] == []
    # the shift of every rank's batches, the same on both: here all the data, two batches per rank
    (shift0, reference), (shift1, _) = rank0["source_shift"], rank1["source_shift"]
    assert shift0 == shift1 and shift0 == pytest.approx(reference, rel=1e-9)
    assert max_difference(rank0["final"], rank1["final"]) < 1e-7

    # contrast: the same run without the averaging of released parameters' gradients
    rank0, rank1 = not_averaged
    assert max_difference(rank0["final"], rank1["final"], "backbone.3.") > 1e-5
    assert max_difference(rank0["final"], rank1["final"], "backbone.0.") > 1e-5
