"""The committed reference checkpoints and their records agree with each other and with a fresh recording."""
import json
import os
from pathlib import Path

import pytest
import torch

import eelab.data as data
from eelab.records import load_record, record_checkpoint, summarize_records

from eelab.workbench import REFERENCES

ROOT = Path(__file__).resolve().parent.parent / "checkpoints"
# every committed reference (workbench.REFERENCES), the strong one first
pytestmark = pytest.mark.parametrize("REF", [ROOT / folder for folder in REFERENCES.values()],
                                     ids=list(REFERENCES))


def test_every_reference_is_committed(REF):
    assert (REF / "model.pt").exists() and (REF / "cal.pt").exists() and (REF / "test.pt").exists()
    assert (REF / "history.json").exists() and (REF / "summary.json").exists()


def test_committed_records_match_their_summary_and_checkpoint(REF):
    cal, test = load_record(REF / "cal.pt"), load_record(REF / "test.pt")
    assert cal.logits.shape == (5000, 4, 10) and test.logits.shape == (10000, 4, 10)
    summary = json.loads((REF / "summary.json").read_text())
    fresh = summarize_records(cal, test)
    assert summary["exit_accuracy_test"] == fresh["exit_accuracy_test"]
    assert summary["exit_accuracy_cal"] == fresh["exit_accuracy_cal"]
    from eelab.files import sha256_file
    assert test.meta["checkpoint_sha256"] == sha256_file(REF / "model.pt") == cal.meta["checkpoint_sha256"]


def test_re_recording_a_slice_matches_test_pt(REF, monkeypatch):
    if data._find(["cifar10-jpeg", "cifar10-jpeg.tar.gz"]) is None and \
            not (data._SHARED / "cifar10-jpeg.tar.gz").exists():
        pytest.skip("cifar10-jpeg is not on this machine")
    monkeypatch.delenv("EELAB_DATA", raising=False)   # the project's data/ cache
    torch.set_num_threads(os.cpu_count() or 1)
    test = load_record(REF / "test.pt")
    part = record_checkpoint(REF, "test", limit=300, progress=False)
    torch.testing.assert_close(part.logits, test.logits[part.indices], atol=1e-4, rtol=0)
    assert torch.equal(part.labels, test.labels[part.indices])
