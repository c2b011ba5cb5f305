"""The dispatcher's bookkeeping: the Prometheus metrics and the HTTP request's log record, from dispatch events.

Dispatch (:mod:`liftoff.gateway.dispatch`) moves requests to the broker and frames back to collectors, nothing
else; it tells an :class:`Accounting` what happened (a user request submitted, accepted or refused) and gives each
collector a :class:`Tally`, which sees every frame of its request and the deadline passing. What is counted where
(the metric families, the log record's fields) is decided here only, so a new figure touches one module.
"""

from __future__ import annotations

from liftoff.core.clock import monotonic
from liftoff.core.frames import ErrorFrame, FinalFrame, OutputFrame, TokenFrame
from liftoff.gateway.metrics import GatewayMetrics
from liftoff.gateway.observe import RequestRecord, current_request

MAX_GROUP_SHOWN = 100  # characters of a consumer group name that error messages and request logs show


class Tally:
    """One user request's figures: time to the first token, the gaps between tokens, tokens, errors, timeouts."""

    __slots__ = ("_metrics", "group", "last_frame", "record", "started")

    def __init__(self, group: str, metrics: GatewayMetrics | None, record: RequestRecord | None) -> None:
        self.group = group
        self._metrics = metrics
        self.record = record
        self.started = monotonic()
        self.last_frame = 0.0  # when the last token frame arrived (0: none yet)

    def frame(self, frame: OutputFrame) -> None:
        """Count one frame of the request."""
        if isinstance(frame, TokenFrame):
            self._token(frame)
        elif isinstance(frame, FinalFrame):
            record = self.record
            if record is not None:
                record.reader_id = frame.reader_id or record.reader_id
                record.prompt_tokens += frame.prompt_tokens
                record.completion_tokens += frame.completion_tokens
            if self._metrics is not None:
                self._metrics.prompt_tokens[(self.group,)] += frame.prompt_tokens
        elif isinstance(frame, ErrorFrame) and self._metrics is not None:
            self._metrics.errors[(self.group, frame.error_type)] += 1

    def _token(self, frame: TokenFrame) -> None:
        metrics, key, now = self._metrics, (self.group,), monotonic()
        if self.last_frame:
            if metrics is not None:
                metrics.token_gap.observe(key, now - self.last_frame)
        else:
            if self.record is not None:
                self.record.first_token_ms = round((now - self.started) * 1000, 1)
            if metrics is not None:
                metrics.first_token.observe(key, now - self.started)
        self.last_frame = now
        if metrics is not None:
            metrics.generate_tokens[key] += frame.n_tokens

    def timed_out(self) -> None:
        """The request's deadline passed (counted once)."""
        if self._metrics is not None:
            self._metrics.timeouts[(self.group,)] += 1
            self._metrics = None


class Accounting:
    """What the dispatcher's events count for: one per gateway, around its :class:`GatewayMetrics` (if any)."""

    def __init__(self, metrics: GatewayMetrics | None = None) -> None:
        self.metrics = metrics

    def submitting(self, group: str, prompts: int) -> None:
        """A user request of ``prompts`` prompts for ``group`` reaches dispatch: its log record says so."""
        record = current_request.get()
        if record is not None:
            record.consumer_group = group[:MAX_GROUP_SHOWN]
            record.prompts += prompts

    def refused(self, label: str, error_type: str) -> None:
        """Dispatch refused a user request (``label``: its group as a metric label)."""
        if self.metrics is not None:
            self.metrics.rejections[(label, error_type)] += 1

    def accepted(self, group: str, prompts: int) -> None:
        """A user request of ``prompts`` prompts was queued."""
        if self.metrics is not None:
            self.metrics.user_batch.observe((group,), prompts)

    def tally(self, group: str) -> Tally | None:
        """The tally of a new request (``group`` "": one sent to a reader by id, which no metric counts), or None
        when nothing would be counted (no metrics, no log record)."""
        metrics = self.metrics if group else None
        record = current_request.get()
        if metrics is None and record is None:
            return None
        return Tally(group, metrics, record)
