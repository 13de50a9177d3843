"""The version ledger (loadtest/versions.py): a table of probes against one admin timeline, then the
pending / finish paths. No Locust, no server."""

from __future__ import annotations

import pytest

from loadtest.versions import Probe, VersionLedger

EXPECTED = {"a": "answer of a", "b": "answer of b"}


def timeline() -> VersionLedger:
    """absent until 10; add a (v1) in [10, 11]; replace with b (v2) in [20, 21]; remove in [30, 31]."""
    ledger = VersionLedger(dict(EXPECTED))
    for kind, folder, sent, version in (("add", "a", 10, 1), ("replace", "b", 20, 2), ("remove", None, 30, None)):
        op = ledger.begin(kind, folder, sent)
        assert ledger.acknowledge(op, sent + 1, ok=True, version=version) == []
    return ledger


CASES = [
    # (sent, headers_at, status, version, text, ok, why)
    (1, 2, 404, None, None, True, "absent before the add"),
    (15, 16, 404, None, None, False, "404 while a was live"),
    (9, 10.5, 404, None, None, True, "the add may not have taken effect yet"),
    (10.2, 10.4, 409, None, None, True, "loading inside the add"),
    (12, 13, 409, None, None, False, "409 outside any add"),
    (12, 13, 200, 1, "answer of a", True, "a while a is live"),
    (12, 13, 200, 1, "answer of b", False, "a's version with b's text: a wrong adapter"),
    (12, 13, 200, 1, "answer of a, half", False, "a half-loaded or mixed adapter"),
    (12, 13, 200, 2, "answer of b", False, "b before b was sent"),
    (12, 13, 200, None, "answer of a", False, "no version header"),
    (20.5, 20.6, 200, 1, "answer of a", True, "old version inside the replace"),
    (20.5, 20.6, 200, 2, "answer of b", True, "new version inside the replace"),
    (19, 22, 200, 1, "answer of a", True, "window reaching over the replace: old"),
    (22, 23, 200, 1, "answer of a", False, "old version after the replace was acknowledged"),
    (22, 23, 200, 2, "answer of b", True, "new version after the replace"),
    (30.5, 30.6, 200, 2, "answer of b", True, "inside the remove: still b"),
    (30.5, 30.6, 404, None, None, True, "inside the remove: gone"),
    (32, 33, 200, 2, "answer of b", False, "after the remove"),
    (32, 33, 500, None, None, False, "a server error"),
]


@pytest.mark.parametrize("sent, headers_at, status, version, text, ok, why", CASES, ids=[c[-1] for c in CASES])
def test_probe_verdicts(sent, headers_at, status, version, text, ok, why):
    ledger = timeline()
    verdict = ledger.observe(Probe(sent, headers_at, status, version, text))
    assert verdict is not None and verdict.ok is ok, verdict.reason
    assert ledger.checked == 1 and len(ledger.wrong) == (0 if ok else 1)


def test_a_probe_waits_for_the_op_it_may_have_seen():
    ledger = VersionLedger(dict(EXPECTED))
    op = ledger.begin("add", "a", 10)
    assert ledger.observe(Probe(1, 2, 404)) is not None  # before the add was sent: decidable now
    assert ledger.observe(Probe(10.5, 10.7, 200, 7, "answer of a")) is None  # v7 is not known yet
    verdicts = ledger.acknowledge(op, 11, ok=True, version=7)
    assert [v.ok for v in verdicts] == [True] and ledger.pending == []
    assert ledger.verified == {7: 1}


def test_a_failed_op_changes_nothing():
    ledger = VersionLedger(dict(EXPECTED))
    ledger.acknowledge(ledger.begin("add", "a", 10), 11, ok=True, version=1)
    ledger.acknowledge(ledger.begin("replace", "b", 20), 21, ok=False)
    assert ledger.observe(Probe(25, 26, 200, 1, "answer of a")).ok


def test_finish_judges_what_an_unanswered_op_left_pending():
    ledger = VersionLedger(dict(EXPECTED))
    ledger.acknowledge(ledger.begin("add", "a", 10), 11, ok=True, version=1)
    ledger.begin("replace", "b", 20)  # never answered
    assert ledger.observe(Probe(21, 22, 200, 1, "answer of a")) is None
    assert ledger.observe(Probe(21, 22, 200, 2, "answer of b")) is None
    assert [v.ok for v in ledger.finish()] == [True, False]


def test_ops_are_sequential_and_need_an_expected_answer():
    ledger = VersionLedger(dict(EXPECTED))
    ledger.begin("add", "a", 10)
    with pytest.raises(RuntimeError):
        ledger.begin("remove", None, 11)
    with pytest.raises(KeyError):
        VersionLedger(dict(EXPECTED)).begin("add", "unknown", 1)
