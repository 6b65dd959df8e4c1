"""Alerts out: anomalous events POSTed as JSON to an http(s) endpoint, from a background thread.

:class:`Webhook` never blocks or stops the scoring that feeds it: :meth:`Webhook.send` only puts the payload on a
bounded queue (full: the payload is dropped, with one warning and a count), and one background thread POSTs them in
order. A failed POST (no connection, a timeout, a 5xx or 429 answer) is retried ``retries`` times with doubling
waits; a payload that still fails is counted, and the first such failure is the one warning about a dead endpoint
(later payloads are then tried once each until one goes through). :meth:`Webhook.close` waits a bounded time for
the queue to drain and returns the counts. Standard library only (``urllib``, ``threading``).
"""

from __future__ import annotations

import json
import queue
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ddp_vad.errors import UserError
from ddp_vad.warn import warn

QUEUE_SIZE = 256  # payloads waiting at most; more are dropped (counted)
RETRIES = 3  # tries after the first one, per payload
BACKOFF = 0.5  # seconds before the first retry, doubled for each next one
MAX_BACKOFF = 8.0
TIMEOUT = 5.0  # seconds one POST may take
DRAIN = 10.0  # seconds close() waits for the queue to empty
WHEN = ("open", "close")


def check_webhook_url(url: str) -> str:
    """``url`` when it is an http:// or https:// URL with a host; else a UserError naming it."""
    try:
        parts = urlsplit(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number
    except (ValueError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise UserError(f"--webhook {url}: give an http:// or https:// URL with a host")
    return url


def parse_when(text: str) -> frozenset[str]:
    """``--webhook-on``: ``close``, ``open`` or both, comma-separated."""
    when = frozenset(p.strip() for p in str(text).split(",") if p.strip())
    if not when or not when <= set(WHEN):
        raise UserError(f"--webhook-on {text}: choose close, open or open,close")
    return when


@dataclass(frozen=True)
class Delivery:
    """What became of the payloads a :class:`Webhook` was given."""

    sent: int  # given to send()
    delivered: int  # answered 2xx
    dropped: int  # the queue was full
    failed: int  # every try failed
    unsent: int  # still queued when close() stopped waiting

    def summary(self, url: str) -> str:
        """One line: ``webhook URL: 5 of 6 event post(s) delivered, 1 dropped (queue full), ...``."""
        parts = [f"{self.dropped} dropped (queue full)", f"{self.failed} failed", f"{self.unsent} not sent in time"]
        return f"webhook {url}: {self.delivered} of {self.sent} event post(s) delivered, " + ", ".join(parts)


class Webhook:
    """POST each payload given to :meth:`send` as JSON to ``url`` from a background thread (module docstring)."""

    def __init__(
        self,
        url: str,
        queue_size: int = QUEUE_SIZE,
        retries: int = RETRIES,
        backoff: float = BACKOFF,
        timeout: float = TIMEOUT,
    ):
        self.url = check_webhook_url(url)
        self.retries, self.backoff, self.timeout = int(retries), float(backoff), float(timeout)
        self._queue: queue.Queue[bytes] = queue.Queue(maxsize=max(1, int(queue_size)))
        self._closing, self._abandon = threading.Event(), threading.Event()
        self.sent = self.delivered = self.dropped = self.failed = self.unsent = 0
        self._warned_full = self._warned_dead = self._dead = False
        self._thread = threading.Thread(target=self._work, name="ddp_vad-webhook", daemon=True)
        self._thread.start()

    def send(self, payload: dict[str, Any]) -> None:
        """Queue ``payload`` (JSON-able) for POSTing; never blocks. A full queue drops it (warned once, counted)."""
        self.sent += 1
        try:
            self._queue.put_nowait(json.dumps(payload).encode())
        except queue.Full:
            self.dropped += 1
            if not self._warned_full:
                self._warned_full = True
                warn(f"webhook {self.url}: {self._queue.maxsize} events waiting, the endpoint is too slow; dropping "
                     "events until it catches up (counted at the end)")  # fmt: skip

    def close(self, wait: float = DRAIN) -> Delivery:
        """Stop taking payloads, wait up to ``wait`` seconds for the queued ones to go out, and return the counts
        (payloads still queued then are abandoned, counted as not sent in time)."""
        self._closing.set()
        self._thread.join(max(0.0, wait))
        if self._thread.is_alive():
            self._abandon.set()  # cuts a backoff wait short; a POST in flight ends within its timeout
            self._thread.join(self.timeout + 1.0)
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
            self.unsent += 1
        return Delivery(self.sent, self.delivered, self.dropped, self.failed, self.unsent)

    def _work(self) -> None:
        while True:
            try:
                body = self._queue.get(timeout=0.05)
            except queue.Empty:
                if self._closing.is_set():
                    return
                continue
            if self._abandon.is_set():
                self.unsent += 1
                continue
            if self._deliver(body):
                self.delivered += 1
                self._dead = False
            else:
                self.failed += 1

    def _deliver(self, body: bytes) -> bool:
        """POST ``body``, retrying with backoff (once only while the endpoint is known dead); True when delivered."""
        tries = 1 if self._dead else 1 + self.retries
        why = ""
        for attempt in range(tries):
            if attempt and self._abandon.wait(min(self.backoff * 2 ** (attempt - 1), MAX_BACKOFF)):
                break
            why, retry = self._post(body)
            if not why:
                return True
            if not retry:
                break
        self._dead = True
        if not self._warned_dead:
            self._warned_dead = True
            warn(f"webhook {self.url}: {why}; an event was not delivered after {attempt + 1} tries (later failures "
                 "are only counted)")  # fmt: skip
        return False

    def _post(self, body: bytes) -> tuple[str, bool]:
        """One POST: ("", _) when answered 2xx, else (why, whether a retry may help)."""
        request = urllib.request.Request(
            self.url, data=body, method="POST",
            headers={"Content-Type": "application/json", "User-Agent": "ddp_vad-webhook"},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                answer.read()
            return "", False
        except urllib.error.HTTPError as exc:
            return f"HTTP {exc.code} {exc.reason}", exc.code >= 500 or exc.code in (408, 429)
        except urllib.error.URLError as exc:  # no connection: refused, unknown host, timed out
            return str(getattr(exc.reason, "strerror", None) or exc.reason), True
        except (OSError, ValueError) as exc:  # a timeout while reading, a reset connection, a bad answer
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, True
