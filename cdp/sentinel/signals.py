"""Block signals of the sentinel, pure: is a payload high entropy, and is a write the
encryption signature (high-entropy bytes over low-entropy, non-zero bytes)?

Cost: :func:`entropy_bits` O(sample) (one ``bincount``); :func:`entropy_batch` one
``bincount`` over all the samples of a batch and one vectorised pass over their
histograms, about 2.5 µs per 512-byte sample, which is why the service samples and
classifies in batches off the write path. See docs/SENTINEL.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum

import numpy as np

#: bytes of a payload (and of the bytes it overwrites) the entropy is estimated on
SAMPLE = 512
#: lz4 probe ratio (packed/raw) below which the journal kept the payload compressed
LZ4_COMPRESSIBLE = 0.875
#: default bits per byte (on a SAMPLE-byte sample) at or above which bytes are high entropy;
#: uniform random bytes give ~7.6 on 512 bytes, text 4-5, machine code 5.5-6.5
ENTROPY_BITS = 7.0
#: overwritten bytes are low entropy below ENTROPY_BITS - LOW_GAP (6.0 by default): a gap,
#: so that data near the threshold (fio's stamped random buffers: 7.1-7.5; some media)
#: written over itself is not read as "high over low"
LOW_GAP = 1.0


class Verdict(IntEnum):
    """What a high-entropy write did to the bytes it overwrote."""

    BENIGN = 0  # over free space (zeros, a hole) or over high-entropy data
    SUSPECT = 1  # over low-entropy, non-zero data: the encryption signature


def entropy_bits(sample: bytes | bytearray | memoryview) -> float:
    """Shannon entropy of the byte histogram of *sample*, bits per byte (0 for empty).
    Cost: O(len(sample))."""
    a = np.frombuffer(sample, dtype=np.uint8)
    if a.size == 0:
        return 0.0
    counts = np.bincount(a, minlength=256)
    p = counts[counts > 0] / a.size
    return float(-(p * np.log2(p)).sum())


#: c·log2(c) for every count a SAMPLE-byte sample can hold (0·log2 0 = 0)
_CLOG = np.concatenate(([0.0], np.arange(1, SAMPLE + 1) * np.log2(np.arange(1, SAMPLE + 1))))
_LOG2_SAMPLE = float(np.log2(SAMPLE))


#: samples per ``bincount`` in :func:`entropy_batch` (past ~64 its index and counts
#: leave the core's cache: 80 samples cost 3.5x 64 measured)
_ROWS = 32
_ROW_BASE = (np.arange(_ROWS, dtype=np.uint16) << 8)[:, None]


def entropy_batch(samples: Sequence[bytes | bytearray]) -> np.ndarray:
    """:func:`entropy_bits` of each sample (none longer than :data:`SAMPLE`). The
    full-size samples by groups of :data:`_ROWS`: their bytes joined, each byte offset
    by 256 times its sample's row (a 16-bit index), one ``bincount`` per group, then
    H = log2 n - (1/n) Σ c·log2 c per row with a table for c·log2 c. Cost: ~2.5 µs per
    sample (one ``bincount`` per sample, as before, was ~6 µs: its fixed cost per call
    dominated on 512 bytes; measured at load 7)."""
    k = len(samples)
    full = [i for i, x in enumerate(samples) if len(x) == SAMPLE]
    out = np.zeros(k)
    if full:
        rows = samples if len(full) == k else [samples[i] for i in full]
        parts = []
        for g in range(0, len(rows), _ROWS):
            group = rows[g : g + _ROWS]
            m = len(group)
            idx = np.frombuffer(b"".join(group), np.uint8).reshape(m, SAMPLE).astype(np.uint16)
            idx += _ROW_BASE[:m]
            counts = np.bincount(idx.ravel(), minlength=256 * m)
            parts.append(_LOG2_SAMPLE - _CLOG.take(counts).reshape(m, 256).sum(axis=1) / SAMPLE)
        bits: np.ndarray = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if len(full) == k:
            return bits
        out[full] = bits
    for i, x in enumerate(samples):
        if 0 < len(x) < SAMPLE:
            out[i] = entropy_bits(x)
    return out


def high_entropy(lz4_ratio: float, bits: float, threshold: float = ENTROPY_BITS) -> bool:
    """The new bytes are high entropy: the journal's lz4 probe found them incompressible
    (or did not run: *lz4_ratio* < 0) and the sample's entropy is at least *threshold*.
    A compressible probe decides alone (the cheap path)."""
    if 0 <= lz4_ratio < LZ4_COMPRESSIBLE:
        return False
    return bits >= threshold


def overwrite_verdict(old: bytes | bytearray | memoryview,
                      threshold: float = ENTROPY_BITS) -> Verdict:
    """Given that a write's new bytes are high entropy, judge it by the bytes *old* it
    replaced (a sample read at the seq before it): SUSPECT over low-entropy non-zero
    bytes (below *threshold* - :data:`LOW_GAP`); BENIGN over zeros (free space, a hole)
    or over anything else."""
    if not any(old):
        return Verdict.BENIGN
    return Verdict.SUSPECT if entropy_bits(old) < threshold - LOW_GAP else Verdict.BENIGN
