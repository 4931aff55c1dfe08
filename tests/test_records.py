import dataclasses
import pickle

import pytest
import torch

from eelab.errors import EelabError
from eelab.records import ExitRecord, check_same_model, load_record, record_checkpoint
from eelab.testing import random_record
from eelab.checkpoint import load_checkpoint


def _record(n: int = 4, k: int = 3, conf: bool = False) -> ExitRecord:
    """[n, k, 5] with indices 0, 2, 4, ... (not the row numbers), costs 1, 2, 3.5 MACs, full 3, model 'toy'."""
    rec = random_record(n, k, 5, confidences=conf, costs=[1.0, 2.0, 3.5][:k], full_cost=3.0, meta={"model": "toy"})
    return dataclasses.replace(rec, indices=rec.indices * 2)


def test_record_from_checkpoint(tiny_checkpoint):
    rec = record_checkpoint(tiny_checkpoint, "test", progress=False)
    assert rec.logits.shape == (9, 2, 3) and rec.logits.dtype == torch.float32
    assert rec.indices.tolist() == list(range(9))
    assert rec.costs[0] < rec.costs[1] and rec.costs[1] > rec.full_cost
    assert rec.meta["split"] == "test" and len(rec.meta["checkpoint_sha256"]) == 64
    cal = record_checkpoint(tiny_checkpoint, "cal", progress=False)
    assert cal.n == 6
    check_same_model(rec, cal)
    # the record is the model's output: recompute two samples by hand
    model, cfg = load_checkpoint(tiny_checkpoint)
    from eelab.data import load_dataset, prepare
    ds = load_dataset(cfg["dataset"], progress=False)
    with torch.no_grad():
        want = model(prepare(ds.test_images[:2], cfg["mean"], cfg["std"]))
    torch.testing.assert_close(rec.logits[:2], want)
    with pytest.raises(EelabError, match="unknown split"):
        record_checkpoint(tiny_checkpoint, "train")


def test_round_trip_with_and_without_optional_fields(tmp_path):
    for conf in (False, True):
        rec = _record(conf=conf)
        rec.save(tmp_path / "r.pt")
        back = load_record(tmp_path / "r.pt")
        assert torch.equal(back.logits, rec.logits) and torch.equal(back.indices, rec.indices)
        assert back.full_cost == 3.0 and back.meta["model"] == "toy"
        assert (back.confidences is None) == (not conf)
    assert not list(tmp_path.glob("*.tmp"))


def test_truncated_foreign_and_future_files_are_refused(tmp_path):
    rec = _record()
    rec.save(tmp_path / "r.pt")
    raw = (tmp_path / "r.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(EelabError, match="cut.pt is not a"):
        load_record(tmp_path / "cut.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(EelabError, match="not a torch file"):
        load_record(tmp_path / "text.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(EelabError, match="not an eelab exit record"):
        load_record(tmp_path / "foreign.pt")
    d = rec.to_dict()
    d["format_version"] = 99
    torch.save(d, tmp_path / "future.pt")
    with pytest.raises(EelabError, match="format version 99.*upgrade eelab"):
        load_record(tmp_path / "future.pt")
    with pytest.raises(EelabError, match="does not exist"):
        load_record(tmp_path / "absent.pt")


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    torch.save({"format": "eelab.exit_record", "x": _Evil()}, tmp_path / "evil.pt", pickle_module=pickle)
    with pytest.raises(EelabError, match="not a readable exit record"):
        load_record(tmp_path / "evil.pt")


def test_records_from_other_models_are_told_apart():
    a = _record()
    with pytest.raises(EelabError, match="different models"):
        check_same_model(a, _record(k=2))
    b = _record()
    object.__setattr__(b, "meta", {"checkpoint_sha256": "a" * 64})
    object.__setattr__(a, "meta", {"checkpoint_sha256": "b" * 64})
    with pytest.raises(EelabError, match="different checkpoints"):
        check_same_model(a, b)


def test_bad_shapes_are_refused():
    with pytest.raises(EelabError, match=r"\[N, K, C\]"):
        ExitRecord(torch.zeros(3, 2), torch.zeros(3), torch.zeros(3), torch.zeros(2), 1.0)
    with pytest.raises(EelabError, match="costs must be"):
        ExitRecord(torch.zeros(3, 2, 4), torch.zeros(3), torch.zeros(3), torch.zeros(3), 1.0)


def test_subset_keeps_rows_together():
    rec = _record(n=6, conf=True)
    sub = rec.subset(torch.tensor([4, 1]))
    assert sub.indices.tolist() == [8, 2] and torch.equal(sub.logits[0], rec.logits[4])
    assert torch.equal(sub.confidences[1], rec.confidences[1])


def test_limit_takes_a_seeded_subset_across_classes(tiny_checkpoint):
    full = record_checkpoint(tiny_checkpoint, "test", progress=False)
    part = record_checkpoint(tiny_checkpoint, "test", limit=5, progress=False)
    again = record_checkpoint(tiny_checkpoint, "test", limit=5, progress=False)
    assert part.n == 5 and torch.equal(part.indices, again.indices)
    assert part.indices.tolist() == sorted(part.indices.tolist()) and part.labels.unique().numel() > 1
    torch.testing.assert_close(part.logits, full.logits[part.indices])
