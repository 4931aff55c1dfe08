"""DistributedDataParallel training: two gloo processes on the CPU equal one process on the same global batch."""
import json
import multiprocessing
import os
import socket
import traceback

import pytest
import torch

import eelab.training as training
from eelab.errors import EelabError
from eelab.models import ModelConfig, build_model
from eelab.training import train

from conftest import tiny_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, cfg, out, errors, seen) -> None:
    """One rank as torchrun would start it: the same environment variables, then the ordinary train()."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    real_loss = training.multi_exit_loss

    def spy(logits, *args, **kw):  # report the batch this rank computes its loss on
        seen.put((rank, logits.shape[0]))
        return real_loss(logits, *args, **kw)

    training.multi_exit_loss = spy  # a forked child's own copy of the module: the parent is untouched
    try:
        torch.set_num_threads(1)
        train(cfg, out, progress=False)
    except BaseException:
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise


def _run_ranks(world: int, cfg, out) -> list[tuple[int, int]]:
    """Train in `world` forked processes; returns (rank, rows in the loss) for every step of every rank."""
    # fork, not spawn: children inherit the imported torch and eelab, which take seconds to import anew
    ctx = multiprocessing.get_context("fork")
    errors, seen = ctx.Queue(), ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, cfg, out, errors, seen)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert all(p.exitcode == 0 for p in procs), errors.get(timeout=5) if not errors.empty() else "a rank hung"
    steps = []
    while not seen.empty():
        steps.append(seen.get(timeout=5))
    return steps


def _nobn_config(folder, **changes):
    # no batch norm and no dropout: the sharded update must then equal the whole-batch one; augmentation stays on,
    # since every rank draws the global batch's augmentation exactly as one process does. fp32: on a CPU with
    # native bf16, `auto` autocasts, and bf16 rounding of half-batch sums differs from whole-batch ones
    return tiny_config(folder, **{"model": ModelConfig(name="tiny_cnn_nobn", widths=(4, 8), head="linear"),
                                  "epochs": 2, "batch_size": 6, "precision": "fp32", **changes})


def test_two_gloo_processes_equal_one_process_on_the_same_global_batch(tmp_path, tiny_folder):
    cfg = _nobn_config(tiny_folder)
    train(cfg, tmp_path / "one", progress=False)
    steps = _run_ranks(2, cfg, tmp_path / "two")
    # 18 training images, global batch 6: 3 steps a epoch, 2 epochs, each rank's loss on its 3 rows
    assert sorted(steps) == [(0, 3)] * 6 + [(1, 3)] * 6
    one = torch.load(tmp_path / "one" / "model.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "model.pt", weights_only=True)
    assert set(one) == set(two)
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)                                              # the weights both runs started from
    init = build_model(ModelConfig(name="tiny_cnn_nobn", widths=(4, 8), head="linear", num_classes=3)).state_dict()
    assert (two["stages.0.0.weight"] - init["stages.0.0.weight"]).abs().max() > 1e-3   # it did train
    h1 = json.loads((tmp_path / "one" / "history.json").read_text())
    h2 = json.loads((tmp_path / "two" / "history.json").read_text())
    assert [h["epoch"] for h in h2] == [1, 2]                          # written once, by rank 0
    assert [h["train_loss"] for h in h2] == pytest.approx([h["train_loss"] for h in h1], rel=1e-5)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["config.json", "history.json", "model.pt",
                                                                     "state.pt"]


def test_eenet_under_two_processes_syncs_logits_and_confidences(tmp_path, tiny_folder):
    # eenet needs logits and confidences from one forward pass, and that pass must go through the
    # DistributedDataParallel wrapper, or the ranks' gradients would not be averaged and the weights would drift
    cfg = _nobn_config(tiny_folder, objective="eenet", cost_weight=0.5)
    train(cfg, tmp_path / "one", progress=False)
    _run_ranks(2, cfg, tmp_path / "two")
    one = torch.load(tmp_path / "one" / "model.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "model.pt", weights_only=True)
    assert any(k.startswith("confidences.") for k in one) and set(one) == set(two)
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6)


def test_global_batch_must_split_evenly_and_world_comes_from_torchrun_variables(tmp_path, tiny_folder, monkeypatch):
    assert training._world() == (0, 1, 0)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(EelabError, match="--batch-size 7 is the global batch.*multiple of 2"):
        train(_nobn_config(tiny_folder, batch_size=7), tmp_path / "x", progress=False)   # before any process group
    assert not (tmp_path / "x").exists()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert training._world() == (1, 4, 1)
    monkeypatch.setenv("WORLD_SIZE", "one")
    with pytest.raises(EelabError, match="must be integers"):
        training._world()
