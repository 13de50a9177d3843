"""Locust users: completions and chat (streamed and not), classification, version probes and one admin.

The run's plan (loadtest/workload.py) comes from `--plan FILE`; the admin token from the environment
variable LORAPLEX_ADMIN_TOKEN (kept out of the plan, which lands in the report folder). Every request
is timed client-side (loadtest/timing.py) and written as one JSON line; the probe and admin users
feed one VersionLedger (loadtest/versions.py), whose wrong answers are reported to Locust as failures
of the pseudo-request `CHECK version`, so they show in Locust's own failure table too.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from dataclasses import dataclass, field
from typing import IO

from locust import HttpUser, between, constant, events, task
from locust.env import Environment
from requests.exceptions import RequestException

from loadtest.timing import RequestRecord, read_sse
from loadtest.versions import Probe, Verdict, VersionLedger
from loadtest.workload import Plan, ZipfChooser, op_times

VERSION_HEADER = "x-loraplex-adapter-version"
ADMIN_TOKEN_ENV = "LORAPLEX_ADMIN_TOKEN"
REQUEST_TIMEOUT_S = 300
ADMIN_TIMEOUT_S = 120
PROBE_WAIT_S = 0.2


class WrongVersion(Exception):
    """A probe answered by a version that was not live, or with another version's text."""


@dataclass
class RunContext:
    """What the users of one run share (one Locust process, gevent greenlets: no locks needed)."""

    plan: Plan
    ledger: VersionLedger
    chooser: ZipfChooser
    records: IO[str]
    admin_token: str
    user_ids: itertools.count = field(default_factory=itertools.count)
    admin_ops_done: int = 0

    def rng(self) -> random.Random:
        """Each user its own seeded stream of choices."""
        return random.Random(self.plan.seed * 1_000_003 + next(self.user_ids))

    def record(self, record: RequestRecord) -> None:
        self.records.write(record.to_json() + "\n")


def context(environment: Environment) -> RunContext:
    return environment.loraplex  # set by `load_plan`


@events.init_command_line_parser.add_listener
def _plan_argument(parser) -> None:
    parser.add_argument("--plan", type=str, default="", help="the run's plan (JSON, loadtest/workload.py)")


@events.init.add_listener
def load_plan(environment: Environment, **_) -> None:
    options = environment.parsed_options
    if options is None or not options.plan:
        raise SystemExit("loadtest: --plan FILE is required (./loadtest/run.sh writes it)")
    plan = Plan.load(options.plan)
    environment.loraplex = RunContext(
        plan=plan, ledger=VersionLedger(dict(plan.expected)),
        chooser=ZipfChooser((*plan.adapters, plan.base), plan.zipf_exponent, plan.seed),
        records=open(plan.records_path, "a"), admin_token=os.environ.get(ADMIN_TOKEN_ENV, ""),
    )


@events.test_stop.add_listener
def _finish(environment: Environment, **_) -> None:
    ctx = context(environment)
    report_verdicts(environment, ctx.ledger.finish())
    ledger = ctx.ledger
    origin = ledger.ops[0].sent if ledger.ops else 0.0
    wall_offset = time.time() - time.perf_counter()  # the ledger's clock is perf_counter; plots use wall time
    summary = {
        "checked": ledger.checked, "wrong": len(ledger.wrong), "admin_ops": ctx.admin_ops_done,
        "verified": {str(version): count for version, count in sorted(ledger.verified.items())},
        "ops": [{"kind": op.kind, "folder": op.folder, "version": op.version, "ok": op.ok,
                 "wall": op.sent + wall_offset,
                 "sent_s": round(op.sent - origin, 4),
                 "acked_s": None if op.acked is None else round(op.acked - origin, 4)} for op in ledger.ops],
        "wrong_answers": [{"reason": v.reason, "status": v.probe.status, "version": v.probe.version,
                           "text": v.probe.text, "stream": v.probe.stream} for v in ledger.wrong],
    }
    with open(ctx.plan.versions_path, "w") as fh:
        json.dump(summary, fh, indent=1)
    ctx.records.flush()


def report_verdicts(environment: Environment, verdicts: list[Verdict]) -> None:
    for verdict in verdicts:
        environment.events.request.fire(
            request_type="CHECK", name="version", response_time=0, response_length=0, context={},
            exception=None if verdict.ok else WrongVersion(verdict.reason),
        )


class LoraplexUser(HttpUser):
    """Generation traffic: a zipf-chosen model, a real prompt and its real answer's length."""

    abstract = True
    wait_time = between(0.05, 0.5)

    def on_start(self) -> None:
        self.ctx = context(self.environment)
        self.random = self.ctx.rng()

    def generate(self, kind: str, stream: bool) -> None:
        ctx, sample = self.ctx, self.random.choice(self.ctx.plan.samples)
        model = ctx.chooser.choose(self.random)
        body = {"model": model, "max_tokens": sample.output_tokens, "temperature": ctx.plan.temperature,
                "ignore_eos": True, "seed": self.random.randrange(2**31)}
        if kind == "chat":
            body["messages"], path = [{"role": "user", "content": sample.prompt}], "/v1/chat/completions"
        else:
            body["prompt"], path = sample.prompt, "/v1/completions"
        ctx.record(timed_generation(self, path, body, stream, kind, name=f"{path} [{'stream' if stream else 'whole'}]",
                                    expect_tokens=sample.output_tokens).record)


@dataclass
class Generation:
    record: RequestRecord
    text: str = ""  # the completion text (kept out of the record: the records file stays small)
    sent: float = 0.0  # perf_counter just before the request went out
    headers_at: float = 0.0  # perf_counter when the status line and headers were in
    version: int | None = None  # the adapter version the server says it admitted the request with


def timed_generation(user: HttpUser, path: str, body: dict, stream: bool, kind: str, name: str,
                     also_fine: tuple[int, ...] = (), expect_tokens: int | None = None) -> Generation:
    """POST a completion or chat request, streamed or whole, and time it; Locust sees the outcome.
    A status in `also_fine` is not a Locust failure (the probes leave 404 / 409 to the ledger); with
    `expect_tokens` (sent with ignore_eos), another completion length is one."""
    chat = path.endswith("chat/completions")
    if stream:
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    started, sent = time.time(), time.perf_counter()
    out = Generation(RequestRecord(started, kind, body["model"], stream, 0, False, 0.0), sent=sent)
    record = out.record
    with user.client.post(path, json=body, stream=stream, catch_response=True, name=name,
                          timeout=REQUEST_TIMEOUT_S) as response:
        out.headers_at, record.status = time.perf_counter(), response.status_code
        header = response.headers.get(VERSION_HEADER) if response.headers else None
        out.version = int(header) if header else None
        if response.status_code != 200:
            record.error = (response.text or str(response.error))[:200]
            record.e2e_s = time.perf_counter() - sent
            if response.status_code in also_fine:
                response.success()
            else:
                response.failure(f"{response.status_code}: {record.error}")
            return out
        try:
            if stream:
                result = read_sse(response.iter_lines(), sent, time.perf_counter, chat)
                out.text, record.ttft_s, record.itl_s = result.text, result.ttft_s, result.itl_s
                record.output_tokens = result.output_tokens or 0
                record.error = result.error or ("" if result.done else "stream ended without [DONE]")
            else:
                payload = response.json()
                choice = payload["choices"][0]
                out.text = choice["message"]["content"] if chat else choice["text"]
                record.output_tokens = payload["usage"]["completion_tokens"]
        except (RequestException, ValueError, LookupError, TypeError) as exc:  # a cut stream, a malformed body
            record.error = f"{type(exc).__name__}: {exc}"[:200]
        record.e2e_s = time.perf_counter() - sent
        if not record.error and expect_tokens is not None and record.output_tokens != expect_tokens:
            record.error = f"{record.output_tokens} completion tokens, {expect_tokens} asked with ignore_eos"
        record.ok = not record.error
        if record.ok:
            response.success()
        else:
            response.failure(record.error)
    return out


class CompletionUser(LoraplexUser):
    weight = 2

    @task(2)
    def streamed(self) -> None:
        self.generate("completion", stream=True)

    @task(1)
    def whole(self) -> None:
        self.generate("completion", stream=False)


class ChatUser(LoraplexUser):
    weight = 2

    @task(2)
    def streamed(self) -> None:
        self.generate("chat", stream=True)

    @task(1)
    def whole(self) -> None:
        self.generate("chat", stream=False)


class ClassifyUser(HttpUser):
    """Real reviews, a few per request, to the encoder server's classifiers (Locust's --host names the
    decoder server and overrides every class's `host`, so the session's base URL is set here)."""

    weight = 1
    wait_time = between(0.05, 0.5)

    def on_start(self) -> None:
        self.ctx = context(self.environment)
        self.random = self.ctx.rng()
        self.client.base_url = self.ctx.plan.classify_host

    @task
    def classify(self) -> None:
        plan = self.ctx.plan
        model = self.random.choice(plan.classifiers)
        texts = self.random.sample(plan.classify_texts, self.random.randint(1, plan.classify_batch))
        started, sent = time.time(), time.perf_counter()
        record = RequestRecord(started, "classify", model, False, 0, False, 0.0)
        with self.client.post("/v1/classify", json={"model": model, "input": texts}, catch_response=True,
                              name="/v1/classify", timeout=REQUEST_TIMEOUT_S) as response:
            record.status, record.e2e_s = response.status_code, time.perf_counter() - sent
            data = response.json().get("data", []) if response.status_code == 200 else []
            if response.status_code != 200 or len(data) != len(texts):
                record.error = f"{response.status_code}: {response.text[:200]}"
                response.failure(record.error)
            else:
                record.ok = True
        self.ctx.record(record)


class VersionProbeUser(HttpUser):
    """Asks the swap name a fixed greedy question, alternately streamed and whole, and checks each
    answer against the version that served it (loadtest/versions.py says why that is sound)."""

    fixed_count = 1
    wait_time = constant(PROBE_WAIT_S)

    def on_start(self) -> None:
        self.ctx = context(self.environment)
        self.turn = itertools.cycle([False, True])

    @task
    def probe(self) -> None:
        plan, stream = self.ctx.plan, next(self.turn)
        body = {"model": plan.swap_name, "prompt": plan.probe_prompt, "max_tokens": plan.probe_tokens,
                "temperature": 0}
        out = timed_generation(self, "/v1/completions", body, stream, "probe",
                               name=f"probe [{'stream' if stream else 'whole'}]", also_fine=(404, 409))
        self.ctx.record(out.record)
        if out.record.status not in (200, 404, 409) or (out.record.status == 200 and not out.record.ok):
            return  # a failed request (already a Locust failure): no answer to check
        verdict = self.ctx.ledger.observe(Probe(out.sent, out.headers_at, out.record.status,
                                                out.version, out.text, stream))
        if verdict is not None:
            report_verdicts(self.environment, [verdict])


class AdminUser(HttpUser):
    """Adds, replaces (same name, the next folder) and removes the swap name on the plan's schedule,
    while the other users' traffic flows; each op goes into the ledger before it is sent."""

    fixed_count = 1
    wait_time = constant(1)

    def on_start(self) -> None:
        self.ctx = context(self.environment)
        plan = self.ctx.plan
        self.started = time.perf_counter()
        self.schedule = list(zip(op_times(plan.admin_ops, plan.run_time_s), plan.admin_ops))
        self.folders = itertools.cycle(sorted(plan.swap_folders))
        self.headers = {"Authorization": f"Bearer {self.ctx.admin_token}"}

    @task
    def next_op(self) -> None:
        if not self.schedule:
            return
        at, kind = self.schedule[0]
        delay = at - (time.perf_counter() - self.started)
        if delay > 0:
            time.sleep(min(delay, 1.0))  # gevent-patched; short naps so that a stop is not held up
            return
        self.schedule.pop(0)
        self.run_op(kind)

    def run_op(self, kind: str) -> None:
        ctx, name = self.ctx, self.ctx.plan.swap_name
        folder = None if kind == "remove" else next(self.folders)
        op = ctx.ledger.begin(kind, folder, time.perf_counter())
        if kind == "remove":
            request = ("/v1/unload_lora_adapter", {"lora_name": name})
        elif kind == "add":
            request = ("/v1/load_lora_adapter", {"lora_name": name, "lora_path": ctx.plan.swap_folders[folder]})
        else:
            request = ("/admin/adapters", {"name": name, "path": ctx.plan.swap_folders[folder], "replace": True})
        with self.client.post(request[0], json=request[1], headers=self.headers, catch_response=True,
                              name=f"ADMIN {kind}", timeout=ADMIN_TIMEOUT_S) as response:
            ok = response.status_code == 200
            version = None
            if ok and kind != "remove":
                payload = response.json()
                version = (payload.get("adapter") or payload)["version"]
            if not ok:
                response.failure(f"{response.status_code}: {response.text[:200]}")
        report_verdicts(self.environment, ctx.ledger.acknowledge(op, time.perf_counter(), ok, version))
        ctx.admin_ops_done += 1
