"""S3 tier operations (docs/TIER.md): ``tier_status`` (cdpctl tier status; also on a
stopped store, where it reads the newest manifest unless ``refresh`` is false) and ``tier_upload`` (cdpctl tier upload: one batch now) and ``tier_gc`` (cdpctl tier gc:
delete unreferenced objects), both cdpd only, and ``verify_tier`` (cdpctl verify --tier)."""

from __future__ import annotations

import asyncio
from typing import Any

from cdp.errors import CdpError, UsageError
from cdp.progress import Progress
from cdp.store import Store
from cdp.tier.service import TierService, newest_manifest, tier_of
from cdp.tier.verify import verify_generation
from cdp.volume import Volume


def _volumes(store: Store, args: dict[str, Any]) -> list[Volume]:
    name = args.get("volume")
    return [store.volume(name)] if name else [store.volumes[n] for n in sorted(store.volumes)]


def off_status(vol: Volume) -> dict[str, Any]:
    """The status row of a volume without a tier."""
    return {"volume": vol.name, "url": None, "state": "off", "generation": 0, "uploaded_seq": 0,
            "uploaded_segments": 0, "pending_segments": 0, "uploaded_bytes": 0,
            "local_bytes": vol.journal.stats().file_bytes, "oldest_pending_age_seconds": 0.0,
            "cache_hit_ratio": None, "sent_bytes": 0, "last_error": None}


async def _status_of(svc: TierService, refresh: bool) -> dict[str, Any]:
    """Never waits on the store while the upload task runs (a hanging store is when
    the operator asks): the task loads the manifest, the row says what is known."""
    if refresh and not svc.running:
        await svc.refresh()
    return svc.status()


async def op_tier_status(store: Store, args: dict[str, Any], progress: Progress) -> Any:
    out = []
    for v in _volumes(store, args):
        svc = tier_of(v)
        out.append(off_status(v) if svc is None
                   else await _status_of(svc, bool(args.get("refresh", True))))
    return out


async def op_tier_upload(store: Store, args: dict[str, Any], progress: Progress) -> Any:
    out = []
    for v in _volumes(store, args):
        svc = tier_of(v)
        if svc is None:
            raise UsageError("[tier] is not configured (docs/TIER.md)")
        v.journal.sync()  # segments sealed so far become durable, so they can go up
        try:
            await svc.upload_now()
            await svc.drop_uploaded_async()  # the local-space policy, as the task applies it
        except CdpError:
            pass  # the status row says why
        out.append(svc.status())
    return out


async def op_tier_gc(store: Store, args: dict[str, Any], progress: Progress) -> Any:
    out = []
    for v in _volumes(store, args):
        svc = tier_of(v)
        if svc is None:
            raise UsageError("[tier] is not configured (docs/TIER.md)")
        out.append({"volume": v.name, **await svc.gc()})
    return out


async def op_verify_tier(store: Store, args: dict[str, Any], progress: Progress) -> Any:
    """`cdpctl verify --tier [--full]`: the newest generation of each tiered volume
    against its manifest (cdp.tier.verify); ``ok`` False when anything is wrong."""
    out = []
    for v in _volumes(store, args):
        svc = tier_of(v)
        if svc is None:
            continue
        try:
            m = await asyncio.to_thread(newest_manifest, svc.s3, svc.bucket, svc.prefix, v.name)
        except CdpError as e:
            out.append({"volume": v.name, "ok": False, "problems": [{"what": "tier", "reason": str(e)}]})
            continue
        if m is None:
            out.append({"volume": v.name, "generation": 0, "objects": 0, "hashed": 0, "ok": True,
                        "problems": []})
            continue
        out.append(await asyncio.to_thread(verify_generation, svc.s3, svc.bucket, m,
                                           full=bool(args.get("full"))))
    if not out:
        raise UsageError("[tier] is not configured (docs/TIER.md)")
    return {"ok": all(r["ok"] for r in out), "volumes": out}


OPS: dict[str, Any] = {"tier_status": op_tier_status, "tier_upload": op_tier_upload,
                       "tier_gc": op_tier_gc, "verify_tier": op_verify_tier}
OFFLINE = {"tier_status", "verify_tier"}
