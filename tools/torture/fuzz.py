"""Coverage-guided fuzzing (atheris, i.e. libFuzzer on CPython) of every parser that
reads outside bytes; the drivers are in ``tools.torture.fuzz_targets``.

    python -m tools.torture --fuzz SECONDS [--fuzz-targets nbd,iscsi,...]
    python -m tools.torture.fuzz --write-seeds      # regenerate the generated seeds

Each target runs in its own process for SECONDS with ``cdp`` and ``mapengine``
instrumented for coverage, starting from ``tests/fuzz_corpus/<target>``. A finding is
any exception other than the parser's own error, a hang over 30 s per input, or memory
over 2 GiB; its input is kept under ``<work>/artifacts/`` and the run counts as failed.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tools.torture.fuzz_targets import CORPUS, TARGETS, TARGETS_SELFTEST

RUNNABLE = {**TARGETS, **TARGETS_SELFTEST}

#: per-target input size cap (libFuzzer -max_len): big enough for the seeds
MAX_LEN = {"journal": 96 << 10, "config": 8 << 10, "mft": 4096, "boot": 1024,
           "point": 256}
_STAT = re.compile(r"^stat::(\w+):\s+(\d+)", re.M)
_COV = re.compile(r"cov: (\d+) ft: (\d+) corp: (\d+)")


def _child(name: str, libfuzzer_args: list[str]) -> None:
    """Run one target under atheris in this process (never returns)."""
    import atheris

    from tools.torture.fuzz_targets import preload

    with atheris.instrument_imports(include=["cdp", "mapengine"]):
        preload()
    fn: Callable[[bytes], None] = RUNNABLE[name]
    atheris.Setup([sys.argv[0], *libfuzzer_args], fn)
    atheris.Fuzz()


def fuzz_one(name: str, seconds: float, work: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Fuzz *name* for *seconds*; its figures: executions, exec/s, coverage, findings."""
    corpus = work / "corpus" / name
    corpus.mkdir(parents=True, exist_ok=True)
    artifacts = work / "artifacts" / name
    artifacts.mkdir(parents=True, exist_ok=True)
    seeds = CORPUS / name
    args = [f"-max_total_time={max(1, int(seconds))}", "-print_final_stats=1",
            "-timeout=30", "-rss_limit_mb=2048", f"-max_len={MAX_LEN.get(name, 16 << 10)}",
            f"-artifact_prefix={artifacts}/", str(corpus)]
    if seeds.is_dir():
        args.append(str(seeds))
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "tools.torture.fuzz", "--child", name, "--", *args],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=seconds + 300)
    elapsed = time.monotonic() - t0
    err = p.stdout
    stats = {k: int(v) for k, v in _STAT.findall(err)}
    cov = _COV.findall(err)
    found = sorted(str(f) for f in artifacts.iterdir())
    execs = stats.get("number_of_executed_units", 0)
    r: dict[str, Any] = {
        "target": name, "seconds": round(elapsed, 1), "executions": execs,
        "exec_per_s": round(execs / elapsed) if elapsed else 0,
        "coverage": int(cov[-1][0]) if cov else None,
        "features": int(cov[-1][1]) if cov else None,
        "corpus": len(list(corpus.iterdir())), "peak_rss_mb": stats.get("peak_rss_mb"),
        "findings": found, "exit": p.returncode,
    }
    if p.returncode != 0 or found or not execs:
        tail = err[err.find("=== Uncaught") :] if "=== Uncaught" in err else err[-3000:]
        inputs = "".join(f"\ninput {Path(f).name}: {Path(f).read_bytes()[:200]!r}"
                         for f in found[:3])
        r["error"] = tail[:4000] + inputs
    log(f"fuzz {name}: {execs} executions in {elapsed:.0f} s ({r['exec_per_s']}/s), "
        f"coverage {r['coverage']}, corpus {r['corpus']}, findings {len(found)}")
    return r


def run_fuzz(seconds: float, targets: list[str], work: Path, log: Callable[[str], None],
             jobs: int = 1) -> dict[str, Any]:
    """Fuzz each of *targets* for *seconds*, *jobs* at a time; the figures and the list
    of problems."""
    unknown = sorted(set(targets) - set(RUNNABLE))
    if unknown:
        raise SystemExit(f"unknown fuzz target(s): {', '.join(unknown)} "
                         f"(known: {', '.join(TARGETS)})")
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        rows = list(pool.map(lambda t: fuzz_one(t, seconds, work, log), targets))
    problems = [f"{r['target']}: {r.get('error', '')[:2000]}" for r in rows
                if r["findings"] or r["exit"] != 0 or not r["executions"]]
    return {"targets": rows, "executions": sum(r["executions"] for r in rows),
            "findings": sum(len(r["findings"]) for r in rows), "problems": problems}


def write_seeds() -> None:
    """Store the generated seeds (protocol sessions, MFT records, a boot sector)."""
    from tools.ntfs_fixture import make_image
    from tools.torture.fuzz_targets import generated_seeds

    for name, items in generated_seeds().items():
        d = CORPUS / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        for i, b in enumerate(items):
            (d / f"seed-{i}").write_bytes(b)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        def populate(m: Path) -> None:
            (m / "dir").mkdir()
            for i in range(3):
                (m / "dir" / f"file-{i}.txt").write_bytes(b"x" * (700 * i))
            (m / "big").write_bytes(b"y" * 300_000)

        img = make_image(Path(tmp) / "seed.img", 8 << 20, populate).read_bytes()
    from cdp.ntfs.mft import NtfsVolume

    nv = NtfsVolume(lambda o, n: img[o : o + n])
    for name, items in {"boot": [img[:512]],
                        "mft": [img[nv.record_offset(r) : nv.record_offset(r) + 1024]
                                for r in (0, 5, 64, 65, 66, 67, 68)]}.items():
        d = CORPUS / name
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        for i, b in enumerate(items):
            (d / f"seed-{i}").write_bytes(b)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        _child(argv[1], argv[3:] if argv[2:3] == ["--"] else argv[2:])
        return 0
    ap = argparse.ArgumentParser(prog="python -m tools.torture.fuzz", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write-seeds", action="store_true")
    a = ap.parse_args(argv)
    if a.write_seeds:
        write_seeds()
        return 0
    ap.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
