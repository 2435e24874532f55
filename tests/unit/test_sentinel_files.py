"""The sentinel's file evidence helpers (cdp/sentinel/files.py), pure parts."""

from __future__ import annotations

from collections import Counter

from cdp.config import SentinelSettings
from cdp.sentinel.files import FileEvidence, _gained, file_score, is_note


def test_gained_extension() -> None:
    assert _gained("a.docx", "a.docx.locked") == "locked"
    assert _gained("Report.DOC", "report.doc.CRYPT") == "crypt"
    assert _gained("a.docx", "a.locked") == "locked"
    assert _gained("a.txt", "b.txt") == ""
    assert _gained("draft.txt", "final.txt") == ""
    assert _gained("a.txt", "a.txt") == ""


def test_ransom_note_names() -> None:
    pats = SentinelSettings().ransom_notes
    for n in ("README_DECRYPT.txt", "readme.txt", "HOW_TO_DECRYPT.html", "How_To_Recover_Files.txt",
              "!README!.hta", "_readme.txt"):
        assert is_note(n, pats), n
    for n in ("report.txt", "README.md", "notes.txt", "decrypt.py"):
        assert not is_note(n, pats), n


def test_file_score() -> None:
    ev = FileEvidence(1, 2)
    assert file_score(0, ev, 10, 3) == 0
    assert file_score(10, ev, 10, 3) == 1.0
    ev.notes = ["/a/README.txt", "/b/README.txt", "/c/README.txt"]
    assert file_score(0, ev, 10, 3) == 0.5
    ev.gained = Counter({"locked": 10})
    assert file_score(0, ev, 10, 3) == 1.0  # notes + churn alone
    ev.notes = ev.notes[:2]
    assert file_score(5, ev, 10, 3) == 1.0
