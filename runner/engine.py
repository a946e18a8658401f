"""A run: one task group, one lane per tenant, a group-committing checkpointer.

Each lane owns its tenant's `TenantLimiter`, key and retry state, so a tenant
that is rate-limited, failing or refused never slows another. Inside a lane
`max_parallel` workers (so never more requests in flight) take the next
`pending` row from a queue that is refilled a page at a time from the store
(at most `PAGE_ROWS` rows wait in memory), and take it through: budget
reservation (`budget.py`) -> limiter admission -> `sent` committed -> one HTTP
attempt -> outcome and ledger entries queued, retrying as the error says:

- `RateLimited` (429): the whole lane pauses for the server's hint (or backoff);
- `Retryable`: exponential backoff with jitter, up to `max_attempts`, then `failed`;
- `TenantRefused` (401/402/403), a missing key or an exhausted budget: the row
  and every unsent row of the tenant are `deferred` (a resume after fixing the
  key, the account or the budget sends them);
- `RequestRejected` (other 4xx): the row `failed` with the provider's message.

`stop()` is the graceful stop: no new attempt starts, attempts in flight finish
within `grace_s`, and whatever is unfinished stays `pending`/`sent` for resume.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Collection, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

import anyio

from runner.alerts import Alerts
from runner.budget import BudgetGuard
from runner.checkpoint import Checkpointer
from runner.config import Job
from runner.errors import RateLimited, RequestRejected, Retryable, TenantRefused
from runner.ledger import Entry
from runner.limits import Admission, TenantLimiter
from runner.logs import log
from runner.pricing import Price
from runner.provider import ProviderClient
from runner.records import Outcome, Reply, Status
from runner.retry import RetryPolicy
from runner.secrets import Secret
from runner.store import SENDS_KEPT_S, FailedAttempt, PendingRequest, Store

PAGE_ROWS = 512
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class LaneProgress:
    """One tenant's progress in this process, for the progress display."""

    tenant: str
    finished: dict[Status, int]
    in_flight: int
    waiting: int
    paused_for_s: float


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """Tuning knobs that are not part of a job file."""

    window_s: float = 60.0
    margin_s: float = 0.5
    grace_s: float = 30.0
    alert_grace_s: float = 10.0  # how long a finished run waits for alert webhooks
    keep_raw_body: bool = False


class Engine:
    __slots__ = (
        "_cancel",
        "_checkpointer",
        "_client",
        "_job",
        "_keys",
        "_lanes",
        "_prices",
        "_run_id",
        "_settings",
        "_store",
        "_tenants",
        "alerts",
        "stopping",
    )

    def __init__(
        self,
        store: Store,
        run_id: str,
        job: Job,
        *,
        keys: Mapping[str, Secret | str],
        client: ProviderClient,
        prices: Mapping[str, Price],
        settings: EngineSettings = EngineSettings(),
        tenants: Collection[str] | None = None,
    ) -> None:
        """`tenants`: the run's tenants this engine sends for (None: all of them)."""
        self._store = store
        self._run_id = run_id
        self._job = job
        self._keys = keys
        self._client = client
        self._prices = prices
        self._settings = settings
        self._tenants = None if tenants is None else frozenset(tenants)
        self.alerts = Alerts(store, job)
        self._checkpointer = Checkpointer(store, run_id, on_commit=self.alerts.check)
        self._lanes: list[_Lane] = []
        self._cancel = anyio.CancelScope()
        self.stopping = False

    @property
    def run_id(self) -> str:
        return self._run_id

    def __repr__(self) -> str:
        return f"Engine(run={self._run_id!r}, lanes={len(self._lanes)}, stopping={self.stopping})"

    async def run(self) -> None:
        """Send every pending row of the run; returns when all lanes are done or
        stopped, with every outcome committed."""
        policy = RetryPolicy(
            max_attempts=self._job.provider.max_attempts,
            base_s=self._job.provider.backoff_base_s,
            max_backoff_s=self._job.provider.max_backoff_s,
        )
        self._lanes = [
            _Lane(self, tenant, largest, policy)
            for tenant, largest in self._store.lane_tenants(self._run_id).items()
            if self._tenants is None or tenant in self._tenants
        ]
        try:
            with self._cancel:
                async with anyio.create_task_group() as group:
                    group.start_soon(self._checkpointer.run)
                    group.start_soon(self.alerts.deliver)
                    async with anyio.create_task_group() as lanes:
                        for lane in self._lanes:
                            lanes.start_soon(lane.run)
                    self._checkpointer.flush()  # the last alerts fire from here
                    self.alerts.close()
                    with anyio.move_on_after(self._settings.alert_grace_s):
                        await self.alerts.delivered()
                    for alert in self.alerts.unsent():
                        log.error(
                            "budget alert webhook for tenant %r not answered within %.0fs; "
                            "the alert is recorded in the state database: %s",
                            alert.tenant,
                            self._settings.alert_grace_s,
                            alert,
                            extra={"event": "alert_unsent", "tenant": alert.tenant},
                        )
                    group.cancel_scope.cancel()
        finally:
            self._checkpointer.flush()
            for lane in self._lanes:
                if lane.refused:
                    self._store.defer_tenant(self._run_id, lane.tenant, lane.refused)

    def stop(self) -> None:
        """Graceful stop: start nothing new; cancel what is in flight after grace_s."""
        if not self.stopping:
            self.stopping = True
            self._cancel.deadline = anyio.current_time() + self._settings.grace_s
            for lane in self._lanes:
                lane.interrupt_waits()

    def abort(self) -> None:
        """Stop now; requests in flight stay `sent` and are re-sent on resume."""
        self.stopping = True
        self._cancel.cancel()

    def progress(self) -> list[LaneProgress]:
        return [lane.progress() for lane in self._lanes]


class _Lane:
    """One tenant's pipeline: a paged queue of pending rows, `max_parallel` workers."""

    __slots__ = (
        "_after_seq",
        "_engine",
        "_id_prefix",
        "_in_flight",
        "_key",
        "_policy",
        "_queue",
        "_reserved",
        "_rng",
        "_settled",
        "_waits",
        "budget",
        "finished_counts",
        "limiter",
        "refused",
        "tenant",
    )

    def __init__(self, engine: Engine, tenant: str, largest: int, policy: RetryPolicy) -> None:
        config = engine._job.tenants[tenant]
        self._engine = engine
        self._key = engine._keys.get(tenant)
        self._policy = policy
        self._rng = random.Random()
        self.tenant = tenant
        self.limiter = TenantLimiter(
            rpm=config.rpm,
            tpm=config.tpm,
            # (a continued run's job may have lowered tpm below rows registered before)
            max_request_tokens=min(largest, config.tpm),
            window_s=engine._settings.window_s,
            margin_s=engine._settings.margin_s,
        )
        # (a window longer than the sends kept, never the default, remembers what is kept)
        span = min(engine._settings.window_s + engine._settings.margin_s, SENDS_KEPT_S)
        self.limiter.remember(engine._store.recent_sends(tenant, within_s=span))
        self.budget = BudgetGuard(tenant, config, engine._prices, engine._run_id)
        if self.budget.cap_micros is not None:
            engine._store.set_cap(tenant, self.budget.period(), self.budget.cap_micros)
        self._reserved = 0  # reservations of this lane not yet settled
        self._settled = anyio.Event()  # set (and replaced) whenever one settles
        self.refused: str | None = None
        self._waits: set[anyio.CancelScope] = set()
        self._queue: deque[PendingRequest] = deque()
        self._after_seq: int | None = -1  # None once the store has no more pending rows
        self._in_flight = 0
        self._id_prefix = f"{quote(engine._run_id, safe='')}:"  # + seq = X-Client-Request-Id
        self.finished_counts: dict[Status, int] = {}

    def progress(self) -> LaneProgress:
        stats = self.limiter.statistics()
        return LaneProgress(
            self.tenant,
            dict(self.finished_counts),
            self._in_flight,
            stats.waiting,
            stats.paused_for_s,
        )

    async def run(self) -> None:
        if isinstance(self._key, str):
            self.refused = self._key  # why the tenant has no usable key
            return
        workers = self._engine._job.tenants[self.tenant].max_parallel
        async with anyio.create_task_group() as group:
            for _ in range(workers):
                group.start_soon(self._work)

    def _active(self) -> bool:
        return not (self.refused or self._engine.stopping)

    def _refuse(self, reason: str) -> None:
        if self.refused is None:
            self.refused = reason
            self.interrupt_waits()

    def interrupt_waits(self) -> None:
        """Wake every worker waiting for admission or backoff, so a stop or a
        refusal is not held up by a 30-second pause."""
        for scope in self._waits:
            scope.cancel()

    async def _wait(self, awaitable: Coroutine[Any, Any, T]) -> T | None:
        """Await a wait that a stop or refusal may cut short; its result, or None
        if it was cut short or the lane should not go on."""
        if not self._active():
            awaitable.close()
            return None
        result = None
        with anyio.CancelScope() as scope:
            self._waits.add(scope)
            try:
                result = await awaitable
            finally:
                self._waits.discard(scope)
        return result if self._active() else None

    def _next(self) -> PendingRequest | None:
        """The lane's next pending row, reading the store a page at a time."""
        if not self._queue and self._after_seq is not None:
            engine = self._engine
            page = engine._store.pending_page(
                engine._run_id, self.tenant, after_seq=self._after_seq, limit=PAGE_ROWS
            )
            self._queue.extend(page)
            self._after_seq = page[-1].seq if page else None
        return self._queue.popleft() if self._queue else None

    async def _work(self) -> None:
        while self._active() and (request := self._next()) is not None:
            await self._serve(request)

    async def _serve(self, request: PendingRequest) -> None:
        """Budget, then attempts until the row has an outcome or the lane stops."""
        engine = self._engine
        if request.tpm_cost > self.limiter.tpm:
            tpm = self.limiter.tpm
            why = f"needs about {request.tpm_cost} tokens but tenant {self.tenant!r} allows {tpm}"
            self._end(request, Status.FAILED, request.attempts, f"{why} per minute", None)
            return
        worst = self.budget.worst_case(request.model, request.prompt_estimate, request.max_tokens)
        admitted, reserved = await self._reserve(request, worst)
        attempt = first = request.attempts  # attempts count across runs; the limit per run
        while admitted and (admission := await self._admitted_to_send(request)) is not None:
            attempt += 1
            await engine._checkpointer.mark_sent(
                request.seq, attempt, self.tenant, request.tpm_cost
            )
            try:
                reply = await self._send(request)
            except TenantRefused as error:
                self._refuse(
                    f"{error} (check the key in {engine._job.key_env(self.tenant)}, or the "
                    f"account's payment status; then run `runner resume {engine._run_id}`)"
                )
                break
            except RequestRejected as error:
                self._end(request, Status.FAILED, attempt, str(error), reserved)
                return
            except Retryable as error:
                engine._checkpointer.fail_attempt(
                    FailedAttempt(request.seq, attempt, error.status, str(error))
                )
                if attempt - first >= self._policy.max_attempts:
                    text = f"{error} (gave up after {attempt - first} attempts)"
                    self._end(request, Status.FAILED, attempt, text, reserved)
                    return
                await self._back_off(error, attempt - first)
                continue
            if reply.usage is not None:  # the window now counts what the provider counted
                self.limiter.settle(admission, reply.usage.prompt_tokens + request.max_tokens)
            self._succeed(request, attempt, reply, reserved, worst)
            return
        if self.refused and not engine.stopping:
            self._end(request, Status.DEFERRED, attempt, self.refused, reserved)
        # On a stop the row stays pending or sent, its reservation held: resume
        # releases it and sends the row again.

    async def _admitted_to_send(self, request: PendingRequest) -> Admission | None:
        """Wait for the limiter (not at all when it admits at once); None if the
        lane stopped or was refused first."""
        if not self._active():
            return None
        admission = self.limiter.try_acquire(request.tpm_cost)
        if admission is not None:
            return admission
        return await self._wait(self.limiter.acquire(request.tpm_cost))

    async def _send(self, request: PendingRequest) -> Reply:
        """One HTTP attempt, counted as in flight while it lasts."""
        self._in_flight += 1
        try:
            return await self._engine._client.send(
                request.body.encode(),
                tenant=self.tenant,
                key=self._key if isinstance(self._key, Secret) else None,
                request_id=f"{self._id_prefix}{request.seq}",
            )
        finally:
            self._in_flight -= 1

    async def _reserve(self, request: PendingRequest, worst: int) -> tuple[bool, Entry | None]:
        """Reserve the worst case against the cap: (admitted, reservation). A refusal
        while this lane has reservations in flight waits for one to settle and tries
        again; with none in flight, the budget is exhausted and the lane stops."""
        reservation = self.budget.reservation(request.seq, request.model, worst)
        if reservation is None or self.budget.cap_micros is None:
            return self._active(), None
        while self._active():
            refused = await self._engine._checkpointer.reserve(
                request.seq, reservation, self.budget.cap_micros
            )
            if refused is None:
                self._reserved += 1
                return True, reservation
            if self._reserved == 0:
                self._refuse(str(self.budget.exhausted(refused, worst)))
                break
            await self._wait(self._settled.wait())
        return False, None

    async def _back_off(self, error: Retryable, attempts: int) -> None:
        """Before the next attempt: a 429 pauses the whole lane (the server's hint,
        else backoff); other errors make this request alone wait."""
        if isinstance(error, RateLimited):
            self.limiter.pause(self._policy.wait_after(attempts, error.retry_after, self._rng))
        else:
            await self._wait(anyio.sleep(self._policy.backoff(attempts, self._rng)))

    def _succeed(
        self,
        request: PendingRequest,
        attempt: int,
        reply: Reply,
        reserved: Entry | None,
        worst: int,
    ) -> None:
        cost, entries = self.budget.settle(
            reserved, seq=request.seq, model=request.model, usage=reply.usage, worst_micros=worst
        )
        keep_body = self._engine._settings.keep_raw_body
        outcome = Outcome(
            request.seq,
            Status.DONE,
            attempt,
            response=reply.content,
            finish_reason=reply.finish_reason,
            usage=reply.usage,
            cost_micros=cost,
            latency_ms=reply.latency_ms,
            error=None if reply.usage else "the provider sent no usage: cost unknown",
            raw_body=reply.body.decode("utf-8", "replace") if keep_body else None,
        )
        self._finish(outcome, entries, settled=reserved is not None)

    def _end(
        self,
        request: PendingRequest,
        status: Status,
        attempt: int,
        error: str,
        reserved: Entry | None,
    ) -> None:
        """An outcome without a response: its reservation is released."""
        outcome = Outcome(request.seq, status, attempt, error=error)
        self._finish(outcome, self.budget.release(reserved), settled=reserved is not None)

    def _finish(self, outcome: Outcome, entries: list[Entry], *, settled: bool) -> None:
        self._engine._checkpointer.finish(outcome, entries)
        self.finished_counts[outcome.status] = self.finished_counts.get(outcome.status, 0) + 1
        if settled:
            self._reserved -= 1
            self._settled.set()
            self._settled = anyio.Event()
