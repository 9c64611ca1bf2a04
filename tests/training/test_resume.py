"""Resuming after a broken checkpoint: one decision for all ranks, never a traceback.

The reruns start from a copy of one finished reference run (2 epochs, a checkpoint every 4
steps, 3 kept) whose newest checkpoint is then damaged: the rerun must warn in one line,
resume from the checkpoint before it and end with the reference's weights. The agreement of
the ranks is tested on its own with 2 gloo processes on 127.0.0.1, where a checkpoint can be
made readable or unreadable at the exact moment between rank 0's read and rank 1's.
`test_resume_flags.py` has what a resume may change.
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from reference_run import checkpoint_names, cut_off

from cluster.errors import UserError
from cluster.world import World
from training.model.checkpoint import STATE_FILE, Position, TrainState, save_state
from training.run import resume
from training.run.driver import run_training
from training.run.resume import (
    SNAPSHOT_FILE,
    agree_on_state,
    repair_snapshot,
)

ROOT = Path(__file__).resolve().parents[2]


DAMAGE = {
    # The newest checkpoint (and the one before it): its directory gone; a copy cut off in the
    # middle of state.pt, after one that had made the directory but not written state.pt.
    "directory deleted": [shutil.rmtree],
    "state.pt cut off, the one before missing": [cut_off, lambda d: (d / STATE_FILE).unlink()],
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_broken_newest_checkpoints_fall_back(
    damage, shards, rerun_config, reference, tmp_path, capfd
):
    result, reference_dir = reference
    run_dir = tmp_path / "runs" / "run"
    shutil.copytree(reference_dir, run_dir)
    names = checkpoint_names(run_dir)
    broken = names[::-1][: len(DAMAGE[damage])]  # newest first
    for name, harm in zip(broken, DAMAGE[damage], strict=True):
        harm(run_dir / name)
    resumed_from = names[-1 - len(broken)]
    capfd.readouterr()

    rerun = run_training(rerun_config(shards, tmp_path, "run"))

    out = capfd.readouterr()
    text = out.out + out.err
    warnings = [line for line in text.splitlines() if "warning:" in line]
    assert 1 <= len(warnings) <= len(broken), text  # one line names each, or both at once
    for name in broken:
        assert any(f"skipping checkpoint {name}" in w for w in warnings), (name, warnings)
    assert "CheckpointManagerInitializationError" not in text
    assert f"(step {int(resumed_from.split('_')[1])})" in text  # "resuming run at epoch ..."
    final = json.loads(Path(rerun.result_file).read_text())
    assert final["fingerprint"] == result["fingerprint"]
    assert final["test_accuracy"] == result["test_accuracy"]


def test_no_checkpoint_left_starts_over(tmp_path):
    """Every listed directory gone: Ray gets an empty list (a fresh start), the user a line."""
    entry = {"version": 0, "checkpoint_dir_name": "checkpoint_000000004_1", "metrics": {}}
    snapshot = {
        "ray_version": "2.60.0",
        "checkpoint_results": [entry],
        "checkpoint_report_indices": [0],
        "latest_checkpoint_result": entry,
        "pending_training_results": [],
        "pending_validation_specs": [],
        "current_report_index": 1,
    }
    (tmp_path / SNAPSHOT_FILE).write_text(json.dumps(snapshot))
    (tmp_path / "checkpoint_000000004_1").mkdir()  # emptied
    warnings: list[str] = []
    repair_snapshot(str(tmp_path), warnings.append)
    repaired = json.loads((tmp_path / SNAPSHOT_FILE).read_text())
    assert repaired["checkpoint_results"] == []
    assert repaired["latest_checkpoint_result"] is None
    assert repaired["current_report_index"] == 1
    assert warnings == [
        "warning: skipping checkpoint checkpoint_000000004_1 (gone or empty); no checkpoint is "
        "left; starting the run over"
    ]
    (tmp_path / SNAPSHOT_FILE).write_text('{"checkpoint_results": [')  # cut off
    with pytest.raises(UserError, match="unreadable"):
        repair_snapshot(str(tmp_path), warnings.append)


OLDER, NEWEST = "checkpoint_000000004_1", "checkpoint_000000008_2"


def half_copied_run(run_dir: Path) -> bytes:
    """A run whose newest checkpoint is still being copied; returns its complete state.pt."""
    for name, step in ((OLDER, 4), (NEWEST, 8)):
        (run_dir / name).mkdir(parents=True)
        state = TrainState(
            {}, {}, {}, Position(step=step), {}, {}, [], {"weights": "none", "sha256": ""}
        )
        save_state(run_dir / name, state)
    state = run_dir / NEWEST / STATE_FILE
    complete = state.read_bytes()
    state.write_bytes(complete[: len(complete) // 2])
    return complete


def _two_ranks(rank: int, port: int, root: str) -> None:
    """One rank of the agreement test; writes what it resumed from to ROOT/rank-R.json."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    world = World(rank=rank, world_size=2)
    read = resume.load_state
    outcome: dict = {}
    for case in ("copy finishes", "chosen breaks"):
        run_dir = Path(root) / case
        complete = (Path(root) / f"{case}.state.pt").read_bytes()

        def rank0_reads(url, run_dir=run_dir, complete=complete, case=case):
            """Rank 0's reads, each followed by what happens to the files right after it."""
            try:
                return read(url)
            finally:
                if NEWEST in str(url):
                    (run_dir / NEWEST / STATE_FILE).write_bytes(complete)
                elif case == "chosen breaks":
                    (run_dir / OLDER / STATE_FILE).write_bytes(b"")

        resume.load_state = rank0_reads if rank == 0 else read
        warnings: list[str] = []
        try:
            state = agree_on_state(str(run_dir), NEWEST, world, warnings.append)
            outcome[case] = {"step": state and state.step, "warnings": warnings}
        except UserError as e:
            outcome[case] = {"error": str(e), "warnings": warnings}
    dist.destroy_process_group()
    (Path(root) / f"rank-{rank}.json").write_text(json.dumps(outcome))


def test_ranks_resume_from_the_checkpoint_rank_0_chose(tmp_path, monkeypatch):
    for case in ("copy finishes", "chosen breaks"):
        complete = half_copied_run(tmp_path / case)
        (tmp_path / f"{case}.state.pt").write_bytes(complete)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.syspath_prepend(str(ROOT))  # the spawned ranks import this module by name
    mp.spawn(_two_ranks, args=(port, str(tmp_path)), nprocs=2)
    rank0, rank1 = (json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1))

    # Rank 0 found the newest checkpoint half-copied and fell back; by the time rank 1 looked,
    # the copy had finished, yet rank 1 resumes from the same older checkpoint as rank 0.
    agreed = "copy finishes"
    assert rank0[agreed]["step"] == rank1[agreed]["step"] == 4
    assert len(rank0[agreed]["warnings"]) == 1
    assert f"skipping checkpoint {NEWEST}" in rank0[agreed]["warnings"][0]
    assert rank1[agreed]["warnings"] == []

    # The checkpoint rank 0 chose broke before rank 1 read it: rank 1 fails, naming it,
    # rather than quietly resuming from the (now complete) newest one.
    broke = "chosen breaks"
    assert rank0[broke]["step"] == 4
    assert "step" not in rank1[broke]
    assert f"cannot read checkpoint {OLDER}, which rank 0 resumes from" in rank1[broke]["error"]


def test_segments_say_how_many_workers_trained_which_steps():
    """Starts of the worker group as an elastic run sees them: 2 workers for 3 steps; a
    restart on 2 (the same segment goes on); 1 worker that fails before its first step, then
    1 for 2 steps; 2 again: consecutive starts on as many workers merge, empty ones vanish."""
    pos = Position()
    for workers, steps in [(2, 3), (2, 1), (1, 0), (1, 2), (2, 1)]:
        pos.start_segment(workers)
        for _ in range(steps):
            pos.advance(16)
    pos = pos.next_epoch({})  # carried into the next epoch
    assert pos.segments == [
        {"workers": 2, "first_step": 1, "last_step": 4},
        {"workers": 1, "first_step": 5, "last_step": 6},
        {"workers": 2, "first_step": 7, "last_step": 7},
    ]
    pos.start_segment(3)
    pos.start_segment(2)  # 3 trained nothing: 2 goes on where it was
    assert pos.segments[-1] == {"workers": 2, "first_step": 7, "last_step": 7}
