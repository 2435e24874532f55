"""`cdpctl verify --tier`: every object of the newest generation against its manifest.

HEAD of every object (it exists, its size and its ``x-amz-meta-sha256`` match the
manifest's), and the sha256 of its bytes for a sample (every state object, and about a
tenth of the segments, at least one) or, with ``full``, for all. Blocking (network):
run it in a worker thread. Cost: one HEAD per object plus the sampled bytes once.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

from cdp.errors import CdpError, NotFound
from cdp.tier.manifest import Manifest
from cdp.tier.s3 import DEFAULT_PART, S3


def object_sha256(s3: S3, bucket: str, key: str, size: int) -> str:
    """sha256 of an object's bytes, read in 8 MiB ranged GETs."""
    h = hashlib.sha256()
    off = 0
    while off < size:
        data = s3.get_range(bucket, key, off, min(DEFAULT_PART, size - off))
        if not data:
            break
        h.update(data)
        off += len(data)
    return h.hexdigest()


def verify_generation(s3: S3, bucket: str, m: Manifest, *, full: bool = False,
                      seed: int | None = None) -> dict[str, Any]:
    """Check the objects *m* names; a dict with ``ok`` and ``problems`` (each naming the
    object's key and what is wrong)."""
    problems: list[dict[str, Any]] = []
    rng = random.Random(seed)
    segs = list(m.segments)
    sample = {s.key for s in segs} if full else {
        s.key for s in rng.sample(segs, max(1, len(segs) // 10))} if segs else set()
    sample |= {s.key for s in m.state}
    hashed = 0
    for key, size, sha in m.objects():
        where = f"s3://{bucket}/{key}"
        try:
            info = s3.head(bucket, key)
        except NotFound:
            problems.append({"what": "tier", "key": key, "reason": f"{where} is missing"})
            continue
        except CdpError as e:
            problems.append({"what": "tier", "key": key, "reason": str(e)})
            continue
        if info.size != size or (info.sha256 is not None and info.sha256 != sha):
            problems.append({"what": "tier", "key": key, "reason":
                             f"{where}: {info.size} bytes, sha256 {info.sha256}; "
                             f"the manifest says {size} bytes, {sha}"})
            continue
        if key in sample:
            hashed += 1
            got = object_sha256(s3, bucket, key, size)
            if got != sha:
                problems.append({"what": "tier", "key": key, "reason":
                                 f"{where}: its bytes hash to {got}, the manifest says {sha}"})
    return {"volume": m.volume, "generation": m.generation, "last_seq": m.last_seq,
            "objects": len(m.objects()), "hashed": hashed, "ok": not problems,
            "problems": problems}
