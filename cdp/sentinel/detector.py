"""The sentinel's detector, pure: per-volume rates in time buckets, a learned baseline,
a score, and the first suspicious write of a burst. No I/O, no clock: every call takes
the write's time (ns). See docs/SENTINEL.md.

Design notes
------------
* **Share of written bytes, per bucket.** ``W`` bytes written, ``H`` of them high
  entropy (estimated from the writes whose entropy was sampled), ``C`` high-entropy
  bytes whose overwritten bytes were read, ``S`` of those suspect. The suspect share is
  ``(H·S/C)/W``: the sampled and checked writes stand for all of them (both are
  rate-limited), so the share does not depend on how much the service could afford.
* **Baseline as NetApp does it:** the maximum share of finished buckets over the
  baseline window, plus a margin, never under ``min_share`` nor under the raise that
  dismissed alerts left. Only buckets that could have alerted (at least
  ``min_suspect_bytes`` of estimated suspect bytes) teach it, so quiet buckets with a
  few suspect writes do not inflate it; a bucket that alerted and buckets under an
  active alert teach nothing.
  It is kept as hourly maxima (168 numbers for 7 days), persisted by the service.
* **Burst:** suspect writes with less than a bucket between them. Its first write is
  the first suspicious seq; one alert per burst.
* Cost: O(1) per call, plus O(buckets kept) (3) when a bucket ends.
"""

from __future__ import annotations

from dataclasses import dataclass

from cdp.config import SentinelSettings

_HOUR_NS = 3600 * 10**9
#: checked suspect writes a bucket needs before it can alert (noise floor of the sample)
MIN_SUSPECT_WRITES = 8


@dataclass
class Bucket:
    """Counters of one time bucket."""

    written: int = 0  # W
    sampled: int = 0  # bytes of the writes whose entropy was estimated
    high: int = 0  # of those, high entropy
    checked: int = 0  # C
    suspect: int = 0  # S
    suspect_writes: int = 0
    fired: bool = False  # an alert came from this bucket: it teaches nothing

    def high_bytes(self) -> float:
        """Estimated high-entropy bytes H: W · (high / sampled)."""
        return self.written * self.high / self.sampled if self.sampled else 0.0

    def suspect_bytes(self) -> float:
        """Estimated suspect bytes: H · S / C."""
        return self.high_bytes() * self.suspect / self.checked if self.checked else 0.0

    def share(self) -> float:
        return min(1.0, self.suspect_bytes() / self.written) if self.written else 0.0


@dataclass
class Firing:
    """The detector's verdict that a burst crossed the threshold."""

    first_seq: int
    first_ns: int
    score: float
    evidence: dict[str, float | int]


class Detector:
    """Buckets, baseline and bursts of one volume."""

    def __init__(self, settings: SentinelSettings, hourly_max: dict[int, float] | None = None,
                 raised: float = 0.0) -> None:
        self.s = settings
        self.bucket_ns = int(settings.bucket_seconds * 1e9)
        #: hour index (ns // 1 h) -> max share of the finished buckets of that hour
        self.hourly_max: dict[int, float] = dict(hourly_max or {})
        #: threshold raise left by dismissed alerts
        self.raised = raised
        #: True while an alert is active: buckets do not teach the baseline
        self.alerting = False
        self._buckets: dict[int, Bucket] = {}
        self._newest = -1
        self.burst_first: tuple[int, int] | None = None  # (seq, ns)
        self._last_suspect_ns: int | None = None
        self._alerted_burst: int | None = None

    # ------------------------------------------------------------------ buckets

    def _bucket(self, ns: int) -> Bucket:
        idx = ns // self.bucket_ns
        b = self._buckets.get(idx)
        if b is None:
            b = self._buckets[idx] = Bucket()
            if idx > self._newest:
                self._newest = idx
                for old in [i for i in self._buckets if i < idx - 2]:
                    self._learn(old, self._buckets.pop(old))
        return b

    def _learn(self, idx: int, b: Bucket) -> None:
        if self.alerting or b.fired or b.suspect_bytes() < self.s.min_suspect_bytes:
            return
        hour = idx * self.bucket_ns // _HOUR_NS
        self.hourly_max[hour] = max(self.hourly_max.get(hour, 0.0), b.share())
        oldest = hour - int(self.s.baseline_window * 1e9) // _HOUR_NS
        for h in [h for h in self.hourly_max if h < oldest]:
            del self.hourly_max[h]

    def share_by_hour(self) -> dict[int, float]:
        """Hour index (ns // 1 h) -> the largest suspect share seen in it: the learned
        hourly maxima and the live buckets. Cost: O(hours kept + live buckets)."""
        out = dict(self.hourly_max)
        for idx, b in self._buckets.items():
            h = idx * self.bucket_ns // _HOUR_NS
            out[h] = max(out.get(h, 0.0), b.share())
        return out

    def baseline(self) -> float:
        """The learned maximum share over the baseline window (0 before any)."""
        return max(self.hourly_max.values(), default=0.0)

    def threshold(self) -> float:
        """The share a bucket must reach to alert."""
        return max(self.s.min_share, self.baseline() + self.s.margin, self.raised)

    # ------------------------------------------------------------------ observations

    def add(self, ns: int, written: int, sampled: int, high: int) -> None:
        """Writes at time *ns*: *written* bytes, of which *sampled* had their entropy
        estimated and *high* of those were high entropy."""
        b = self._bucket(ns)
        b.written += written
        b.sampled += sampled
        b.high += high

    def written(self, ns: int, nbytes: int, high: bool) -> None:
        """One WRITE of *nbytes* at *ns*, its entropy estimated (:meth:`add`)."""
        self.add(ns, nbytes, nbytes, nbytes if high else 0)

    def checked(self, seq: int, ns: int, nbytes: int, suspect: bool) -> Firing | None:
        """The overwritten bytes of high-entropy write *seq* were judged; returns a
        :class:`Firing` when its bucket crosses the threshold for a burst that has not
        alerted yet."""
        b = self._bucket(ns)
        b.checked += nbytes
        if not suspect:
            return None
        b.suspect += nbytes
        b.suspect_writes += 1
        if self._last_suspect_ns is None or ns - self._last_suspect_ns > self.bucket_ns \
                or self.burst_first is None:
            self.burst_first = (seq, ns)
        self._last_suspect_ns = max(ns, self._last_suspect_ns or ns)
        thr = self.threshold()
        score = b.share() / thr if thr > 0 else 0.0
        if (score < 1.0 or b.suspect_bytes() < self.s.min_suspect_bytes
                or b.suspect_writes < MIN_SUSPECT_WRITES
                or self._alerted_burst == self.burst_first[0]):
            return None
        self._alerted_burst = self.burst_first[0]
        b.fired = True
        return Firing(self.burst_first[0], self.burst_first[1], round(score, 3), {
            "suspect_share": round(b.share(), 4), "threshold": round(thr, 4),
            "baseline": round(self.baseline(), 4), "written_bytes": b.written,
            "high_entropy_bytes": int(b.high_bytes()), "checked_bytes": b.checked,
            "suspect_bytes_estimate": int(b.suspect_bytes()),
            "suspect_writes_checked": b.suspect_writes,
            "bucket_seconds": self.s.bucket_seconds,
        })

    def recent_score(self) -> float:
        """The block half of the combined score: the highest share / threshold of the
        buckets kept (the last three), at most 1. Cost: O(3)."""
        thr = self.threshold()
        best = max((b.share() for b in self._buckets.values() if b.suspect_writes),
                   default=0.0)
        return min(1.0, best / thr) if thr > 0 else 0.0

    def dismissed(self, share: float) -> None:
        """An alert at *share* was a false positive: never alert at that share again."""
        self.raised = max(self.raised, share + self.s.margin)
        self.alerting = False
