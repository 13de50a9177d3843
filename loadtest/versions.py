"""Version safety under hot swaps: is each probe's answer the one its adapter version gives?

One admin user changes one adapter name (`swap`) while probes ask it a fixed greedy question. The server
names the version a request was admitted with (header `x-loraplex-adapter-version`), and every
version's greedy answer is known beforehand (computed on a quiet server, loadtest/serve.py). A probe is
right when both hold:

- the version it names was live at some moment between the probe being sent and its response headers
  arriving (the server pins the version when it accepts the request, before it answers headers), and
- its text is that version's answer, token for token (a half-loaded, mixed or wrong adapter gives
  another text).

The timeline is known only to within each admin call: op k took effect somewhere in [sent_k, acked_k].
So the state op k leaves can be seen from sent_k (the earliest it could take effect) until acked_{k+1}
(the latest the next op could still be pending), and a fresh add can answer 409 (loading) inside its
own call. A 404 is right only where the name may have been absent. Ops are sequential (one admin user),
and a probe whose window reaches into an op not yet acknowledged waits for that op's answer (`pending`).

Pure Python, no Locust: the Locust users (loadtest/users.py) feed it, the tests table-drive it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

ABSENT = None  # the state of a removed (or never added) name
NOT_READY = 409  # a fresh add answers this while it loads
UNKNOWN = 404


@dataclass(frozen=True)
class Live:
    """The name serves `version` (the server's number), made from the folder labelled `folder`."""

    version: int
    folder: str


@dataclass
class AdminOp:
    kind: str  # "add" | "replace" | "remove"
    folder: str | None  # what add / replace loads
    sent: float
    acked: float | None = None  # None while the call is in flight
    version: int | None = None  # the number the server gave an add / replace
    ok: bool = False


@dataclass(frozen=True)
class Probe:
    """One probe's answer: `sent` before the request, `headers_at` when its status and headers arrived."""

    sent: float
    headers_at: float
    status: int
    version: int | None = None  # the header's value (None if absent)
    text: str | None = None  # the whole completion text (for status 200)
    stream: bool = False


@dataclass(frozen=True)
class Verdict:
    probe: Probe
    ok: bool
    reason: str = ""


@dataclass
class VersionLedger:
    """The admin ops so far and the probes still waiting for one to be acknowledged.

    `expected` maps a folder label to its version's greedy answer. Times are one clock (time.monotonic)."""

    expected: dict[str, str]
    ops: list[AdminOp] = field(default_factory=list)
    pending: list[Probe] = field(default_factory=list)
    checked: int = 0
    wrong: list[Verdict] = field(default_factory=list)
    verified: dict[int, int] = field(default_factory=dict)  # version -> answers found right (status 200)

    # -- the admin side --------------------------------------------------------------------------

    def begin(self, kind: str, folder: str | None, now: float) -> AdminOp:
        if self.ops and self.ops[-1].acked is None:
            raise RuntimeError("admin ops must be sequential: the previous one is not acknowledged")
        if kind != "remove" and folder not in self.expected:
            raise KeyError(f"no expected answer for folder {folder!r}")
        op = AdminOp(kind, folder, now)
        self.ops.append(op)
        return op

    def acknowledge(self, op: AdminOp, now: float, ok: bool, version: int | None = None) -> list[Verdict]:
        """Record the admin call's answer; returns the verdicts of probes that were waiting for it.
        A failed op changes nothing (the server keeps the previous version or no entry)."""
        op.acked, op.ok, op.version = now, ok, version
        waiting, self.pending = self.pending, []
        return [v for v in (self.observe(p) for p in waiting) if v is not None]

    # -- the probe side --------------------------------------------------------------------------

    def observe(self, probe: Probe) -> Verdict | None:
        """The probe's verdict, or None (kept in `pending`) while an op it may have seen is unanswered."""
        if any(op.acked is None and op.sent <= probe.headers_at for op in self.ops):
            self.pending.append(probe)
            return None
        return self._record(self._judge(probe))

    def finish(self) -> list[Verdict]:
        """At the end: probes still waiting are judged as if their unanswered op never took effect."""
        waiting, self.pending = self.pending, []
        return [self._record(self._judge(p)) for p in waiting]

    def _record(self, verdict: Verdict) -> Verdict:
        self.checked += 1
        if not verdict.ok:
            self.wrong.append(verdict)
        elif verdict.probe.status == 200:
            self.verified[verdict.probe.version] = self.verified.get(verdict.probe.version, 0) + 1
        return verdict

    def _judge(self, probe: Probe) -> Verdict:
        seen = self._states_seen(probe.sent, probe.headers_at)
        if probe.status == UNKNOWN:
            return Verdict(probe, ABSENT in seen, "" if ABSENT in seen else "404 while the adapter was live")
        if probe.status == NOT_READY:
            loading = self._loading_during(probe.sent, probe.headers_at)
            return Verdict(probe, loading, "" if loading else "409 outside any add")
        if probe.status != 200:
            return Verdict(probe, False, f"status {probe.status}")
        live = {s.version: s for s in seen if isinstance(s, Live)}
        if probe.version not in live:
            named = "no version header" if probe.version is None else f"version {probe.version}"
            return Verdict(probe, False, f"{named} was not live while the request was admitted "
                                         f"(live: {sorted(live) or 'none'})")
        state = live[probe.version]
        want = self.expected[state.folder]
        if probe.text != want:
            return Verdict(probe, False, f"version {state.version} ({state.folder}) answered {probe.text!r}, "
                                         f"its greedy answer is {want!r}")
        return Verdict(probe, True)

    def _states_seen(self, start: float, end: float) -> list[Live | None]:
        """Every state whose possible interval meets [start, end]."""
        seen: list[Live | None] = []
        state: Live | None = ABSENT
        state_from = -math.inf
        for op in self.ops:
            if not op.ok:  # failed (or still unanswered): the state it would leave is not one
                continue
            # `state` could be seen until this op was acknowledged; the next one from when this op was sent
            if state_from <= end and start <= op.acked:
                seen.append(state)
            state = ABSENT if op.kind == "remove" else Live(op.version, op.folder)
            state_from = op.sent
        if state_from <= end:
            seen.append(state)
        return seen

    def _loading_during(self, start: float, end: float) -> bool:
        return any(op.kind == "add" and op.sent <= end and start <= (op.acked if op.acked is not None else math.inf)
                   for op in self.ops)
