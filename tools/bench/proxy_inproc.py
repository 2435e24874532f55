"""Splitter (proxy) writes in process, without NBD: where a write's CPU time goes.

    python -m tools.bench.proxy_inproc [--writes N] [--qd 32] [--size BYTES] [--rounds 3] [--ack primary|both]
    python -m tools.bench.proxy_inproc --fit   # CPU per write vs per batch (the thread round trip)

A :class:`~cdp.proxy.volume.ProxyVolume` over a sparse primary file under uvloop; a
driver keeps *qd* 4 KiB random writes in flight and, like an NBD client, sends the
replacements of the writes completed in a loop turn at the start of the next one. Per
write it reports the CPU time of the event loop's thread, of the primary's writer
thread and of the whole process (``time.thread_time`` / ``pthread_getcpuclockid``,
which a machine shared with other work distorts much less than wall time), the
writer's round trip (hand-off on the loop -> the thread starts the batch -> the
batch's pwrites done -> its completion runs on the loop, wall µs), the writes per
hand-off, the loop wake-ups from the writer (``call_soon_threadsafe``) and the context
switches of each thread (/proc: a thread waiting for the GIL or for work switches).
Runs *rounds* times and prints the median with the range.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import cdp.proxy.volume as pv
from cdp.config import Settings, VolumeSpec
from cdp.proxy.workers import Writer
from cdp.store import Store
from cdp.targets.completion import Completion

MiB = 1 << 20


class _Timed(Writer[Any]):
    """The writer with timestamps: per batch (hand-off, thread start, pwrites done,
    delivered) and a count of the wake-ups it sends the loop."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.handed: list[float] = []
        self.spans: list[tuple[float, float]] = []  # per run of the thread: started, pwrites done
        self.wakeups = 0
        self.tid = 0
        super().__init__(*args, **kwargs)
        run_batch, deliver = self._run_batch, self._deliver

        def run(batch: list[Any]) -> Any:
            if not self.tid:
                self.tid = threading.get_native_id()
            t0 = time.perf_counter()
            r = run_batch(batch)
            self.spans.append((t0, time.perf_counter()))
            return r

        def done(batch: list[Any], results: Any) -> None:
            self.delivered.append(time.perf_counter())
            deliver(batch, results)

        self.delivered: list[float] = []
        self._run_batch = run
        self._deliver = done

    def _hand_off(self) -> None:
        if self._turn:
            self.handed.append(time.perf_counter())
        super()._hand_off()


class _Inline(_Timed):
    """For comparison only (not a design: it blocks the loop on the disk): the turn's
    pwrites run on the loop at the hand-off and complete in the next turn, so the
    figures show what the thread round trip costs beyond the pwrites themselves."""

    def _hand_off(self) -> None:
        batch, self._turn = self._turn, []
        if batch:
            self.handed.append(time.perf_counter())
            results = self._run_batch(batch)
            assert self._loop is not None
            self._loop.call_soon(self._deliver, batch, results)


class _GcClock:
    """Wall time spent in the cyclic garbage collector (gc.callbacks), by generation."""

    def __init__(self) -> None:
        self.t0 = 0.0
        self.total = 0.0
        self.runs = [0, 0, 0]

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.t0 = time.perf_counter()
        else:
            self.total += time.perf_counter() - self.t0
            self.runs[info["generation"]] += 1


def _ctx(tid: int) -> int:
    """Voluntary + involuntary context switches of thread *tid* of this process."""
    n = 0
    for line in Path(f"/proc/self/task/{tid}/status").read_text().splitlines():
        if line.endswith("ctxt_switches:") or "ctxt_switches" in line:
            n += int(line.split()[1])
    return n


def _thread_cpu(tid_ident: int) -> float:
    return time.clock_gettime(time.pthread_getcpuclockid(tid_ident))


async def _drive(vol: pv.ProxyVolume, n: int, qd: int, rng: random.Random) -> None:
    loop = asyncio.get_running_loop()
    blocks = vol.size // 4096
    offs = [rng.randrange(blocks) * 4096 for _ in range(n)]
    data = os.urandom(4096)
    finished = loop.create_future()
    st = {"issued": 0, "done": 0, "owed": 0}

    def issue() -> None:
        i = st["issued"]
        st["issued"] = i + 1
        r = vol.write(offs[i], data)
        assert r is not None
        if isinstance(r, Completion):  # as the NBD server does: a plain callback
            r.on_done(done, None)
        else:
            asyncio.ensure_future(r).add_done_callback(completed)  # a future as is

    def done(_: Any, exc: BaseException | None) -> None:
        if exc is not None:
            raise exc
        count()

    def arrivals() -> None:
        k, st["owed"] = st["owed"], 0
        for _ in range(min(k, n - st["issued"])):
            issue()

    def completed(f: asyncio.Future[None]) -> None:
        f.result()
        count()

    def count() -> None:
        st["done"] += 1
        if st["done"] == n:
            finished.set_result(None)
            return
        if st["issued"] + st["owed"] < n:
            if not st["owed"]:
                loop.call_soon(arrivals)  # the next turn: as fio's next requests would
            st["owed"] += 1

    for _ in range(min(qd, n)):
        issue()
    await finished


async def _fio_round(store: Store, vol: Any, w: _Timed, runtime: float, size: int,
                     out: dict[str, float]) -> None:
    """fio (nice 19, ioengine nbd, 4 KiB random writes, iodepth 32) against *vol*
    served by this loop; the same per-write figures plus the NBD turns per write."""
    from cdp.exports import StoreExports
    from cdp.targets.nbd import server as nbd_server
    from cdp.targets.nbd.server import serve_nbd

    proto = nbd_server._NbdProtocol
    counts = {"recv": 0, "sends": 0}
    orig_bu, orig_sr = proto.buffer_updated, proto._send_replies

    def bu(self: Any, nbytes: int) -> None:
        counts["recv"] += 1
        orig_bu(self, nbytes)

    def sr(self: Any) -> None:
        counts["sends"] += 1
        orig_sr(self)

    proto.buffer_updated = bu  # type: ignore[method-assign]
    proto._send_replies = sr  # type: ignore[method-assign]
    server = await serve_nbd(StoreExports(store), "127.0.0.1", 0)

    async def ticker() -> None:
        while True:
            await asyncio.sleep(1.0)
            vol.tick()

    tk = asyncio.create_task(ticker())
    try:
        args = ["nice", "-n", "19", "fio", "--name=b", "--ioengine=nbd",
                f"--uri=nbd://127.0.0.1:{server.port}/{vol.name}", "--rw=randwrite", "--bs=4k",
                "--iodepth=32", "--numjobs=1", f"--size={size}", "--output-format=json", "--randrepeat=0",
                "--norandommap", "--time_based", f"--runtime={runtime}"]
        w.handed.clear()
        w.spans.clear()
        w.delivered.clear()
        n0 = vol.writes
        loop_tid = threading.get_native_id()
        wt = w._thread.ident
        assert wt is not None
        c0, l0, p0 = _thread_cpu(wt), time.thread_time(), time.process_time()
        x0, y0 = _ctx(loop_tid), _ctx(w.tid or loop_tid)
        gcc = _GcClock()
        gc.callbacks.append(gcc)
        proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.DEVNULL)
        stdout, _ = await proc.communicate()
        writes = max(vol.writes - n0, 1)
        gc.callbacks.remove(gcc)
        out["gc_us"] = gcc.total / writes * 1e6
        out["gc_full_per_1k"] = gcc.runs[2] / writes * 1e3
        out["loop_us"] = (time.thread_time() - l0) / writes * 1e6
        out["writer_us"] = (_thread_cpu(wt) - c0) / writes * 1e6
        out["process_us"] = (time.process_time() - p0) / writes * 1e6
        out["loop_ctx"] = (_ctx(loop_tid) - x0) / writes
        out["writer_ctx"] = (_ctx(w.tid or loop_tid) - y0) / writes
        out["iops"] = json.loads(stdout[stdout.index(b"{"):])["jobs"][0]["write"]["iops"]
        out["recv_per_write"] = counts["recv"] / writes
        out["sends_per_write"] = counts["sends"] / writes
        out["writes"] = writes
    finally:
        tk.cancel()
        proto.buffer_updated = orig_bu  # type: ignore[method-assign]
        proto._send_replies = orig_sr  # type: ignore[method-assign]
        server.close()
        await server.wait_closed()


def one_round(base: Path, writes: int, qd: int, size: int, ack: str, seed: int,
              fio_s: float = 0.0, inline: bool = False, mirror: bool = False) -> dict[str, float]:
    """One run over a fresh store and primary; per-write figures (*fio_s* > 0: through
    NBD, fio for that many seconds)."""
    import uvloop

    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    prim = base / "primary.img"
    with open(prim, "wb") as f:
        f.truncate(size)
    s = replace(Settings(), store=base / "store", volumes=())
    store = Store.open(s)
    real = pv.Writer  # type: ignore[attr-defined]
    pv.Writer = _Inline if inline else _Timed  # type: ignore[attr-defined]
    try:
        if mirror:  # the reference: a mirror volume through the same server
            vol: Any = store.create_volume(VolumeSpec("p", size))
            w: Any = _Timed("idle", lambda b: [], lambda b, r: None)
        else:
            vol = store.create_volume(VolumeSpec("p", size, "proxy", str(prim), ack=ack, initial_copy=False))
            assert isinstance(vol, pv.ProxyVolume)
            w = vol._writer
    finally:
        pv.Writer = real  # type: ignore[attr-defined]
    assert isinstance(w, _Timed)
    out: dict[str, float] = {}

    async def main() -> None:
        if fio_s:
            await _fio_round(store, vol, w, fio_s, size, out)
            return
        await _drive(vol, min(2000, writes), qd, random.Random(seed + 1))  # warm up
        w.handed.clear()
        w.spans.clear()
        w.delivered.clear()
        loop_tid = threading.get_native_id()
        wt = w._thread.ident
        assert wt is not None
        c0, l0, p0, t0 = _thread_cpu(wt), time.thread_time(), time.process_time(), time.perf_counter()
        x0, y0 = _ctx(loop_tid), _ctx(w.tid or loop_tid)
        await _drive(vol, writes, qd, random.Random(seed))
        t1 = time.perf_counter()
        out["loop_us"] = (time.thread_time() - l0) / writes * 1e6
        out["writer_us"] = (_thread_cpu(wt) - c0) / writes * 1e6
        out["process_us"] = (time.process_time() - p0) / writes * 1e6
        out["wall_us"] = (t1 - t0) / writes * 1e6
        out["loop_ctx"] = (_ctx(loop_tid) - x0) / writes
        out["writer_ctx"] = (_ctx(w.tid or loop_tid) - y0) / writes
        await asyncio.sleep(0)

    try:
        uvloop.run(main())
    finally:
        store.close()
    nb = len(w.delivered)
    writes = int(out.pop("writes", writes))
    out["per_handoff"] = writes / max(len(w.handed), 1)
    out["wakeups"] = nb / writes
    # a run of the thread may join several hand-offs: each run is timed from its first
    lat_start, lat_write, lat_all = [], [], []
    hi = 0
    for (s0, s1), d in zip(w.spans, w.delivered, strict=False):
        h = w.handed[hi] if hi < len(w.handed) else s0
        lat_start.append((s0 - h) * 1e6)
        lat_write.append((s1 - s0) * 1e6)
        lat_all.append((d - h) * 1e6)
        while hi < len(w.handed) and w.handed[hi] <= s0:
            hi += 1
    out["handoff_to_start_us"] = statistics.median(lat_start) if lat_start else 0.0
    out["batch_write_us"] = statistics.median(lat_write) if lat_write else 0.0
    out["handoff_to_done_us"] = statistics.median(lat_all) if lat_all else 0.0
    out["per_batch"] = writes / max(len(w.spans), 1)
    return out


def _fit(base: Path, writes: int, size: int, ack: str, rounds: int) -> int:
    """``--fit``: per thread, CPU µs = a per write + b per batch, from the medians of
    *rounds* runs at qd 4 and at qd 32 (batches of about 4 and 32 writes)."""
    med: dict[int, dict[str, float]] = {}
    for qd in (4, 32):
        runs = [one_round(base / "r", writes, qd, size, ack, i) for i in range(rounds)]
        med[qd] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    n4, n32 = med[4]["per_handoff"], med[32]["per_handoff"]
    print(f"load average {'/'.join(f'{x:.1f}' for x in os.getloadavg())}; {writes} writes x {rounds} "
          f"per qd, ack={ack}; writes per batch {n4:.1f} / {n32:.1f}")
    for k in ("loop_us", "writer_us", "process_us"):
        b = (med[4][k] - med[32][k]) / (1 / n4 - 1 / n32)
        print(f"  {k:<12} qd4 {med[4][k]:7.2f}  qd32 {med[32][k]:7.2f}  ->  per write {med[32][k] - b / n32:6.2f}"
              f"  per batch {b:7.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--writes", type=int, default=20000)
    ap.add_argument("--qd", type=int, default=32)
    ap.add_argument("--size", type=int, default=256 * MiB)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ack", default="primary", choices=("primary", "both"))
    ap.add_argument("--scratch", type=Path, default=None)
    ap.add_argument("--fio", type=float, default=0.0, metavar="S",
                    help="through NBD: fio (under nice 19) for S seconds per round instead of the in-process driver")
    ap.add_argument("--no-lio", action="store_true", help="the writer's pwrites one by one (cdp.proxy.volume.USE_LIO off)")
    ap.add_argument("--mirror", action="store_true", help="with --fio: a mirror volume instead (reference)")
    ap.add_argument("--inline", action="store_true",
                    help="comparison only: the primary's pwrites on the loop (no writer thread round trip)")
    ap.add_argument("--fit", action="store_true",
                    help="in process at qd 4 and qd 32: split each thread's CPU into a part per write "
                         "and a part per batch (the thread round trip), fitted as a + b / writes-per-batch")
    a = ap.parse_args(argv)
    if a.no_lio:
        pv.USE_LIO = False
    base = Path(tempfile.mkdtemp(prefix="cdp-proxy-inproc-", dir=a.scratch or Path.cwd()))
    if a.fit:
        try:
            return _fit(base, a.writes, a.size, a.ack, a.rounds)
        finally:
            shutil.rmtree(base, ignore_errors=True)
    runs: list[dict[str, float]] = []
    try:
        for i in range(a.rounds):
            runs.append(one_round(base / "r", a.writes, a.qd, a.size, a.ack, i, a.fio, a.inline, a.mirror))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"load average {'/'.join(f'{x:.1f}' for x in os.getloadavg())}; {a.writes} writes x {a.rounds}, "
          f"qd {a.qd}, ack={a.ack}")
    for k in runs[0]:
        vals = sorted(r[k] for r in runs)
        print(f"  {k:<22} {statistics.median(vals):9.2f}   ({vals[0]:.2f}-{vals[-1]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
