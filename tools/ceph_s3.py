"""A single-node Ceph RGW for cdp's S3 tests and benchmarks: ``tools/ceph-s3 up|stop|purge|env``.

    tools/ceph-s3 up       install the packages if missing, bootstrap (or restart) and wait
    tools/ceph-s3 env      shell `export` lines: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
                           CDP_TEST_S3_ENDPOINT (eval "$(tools/ceph-s3 env)")
    tools/ceph-s3 status   each daemon (pid, RSS) and whether S3 answers; exit 0 only if it does
    tools/ceph-s3 stop     stop the daemons this state directory started, by pid
    tools/ceph-s3 purge    stop, then delete the state directory (data, keys, logs)
    tools/ceph-s3 install  only install the Debian packages (what `make sysdeps` also does)

State lives in ``$CDP_CEPH_S3_DIR`` (default: ``.ceph-s3/`` at the repository root,
git-ignored): ``ceph.conf``, the mon/osd/rgw data, ``run/`` (pid files, admin sockets),
``log/`` and ``cluster.json`` (ports, endpoint and S3 keys; mode 0600, written last, so
its presence means "bootstrapped"). The OSD's BlueStore device is a sparse file of
``$CDP_CEPH_S3_OSD_BYTES`` (default 16 GiB, only what is written takes disk space).

Stdlib only (it may run under the system python3); importable as ``tools.ceph_s3`` so
tests and benchmarks find the endpoint the same way (:func:`load_info`, :func:`rgw_answers`).

Design notes
------------
- One mon, one BlueStore OSD, one RGW, no mgr (S3 does not need it), ``auth ... = none``
  on 127.0.0.1 only: a throw-away test cluster, never a place for real data.
- Every wait is a real probe, never map state: the mon by ``ceph quorum_status``, the
  OSD by ``ceph tell osd.0 version`` (after a restart the old osdmap still says osd.0 is
  up), RGW by an HTTP GET. A daemon that dies while we wait ends the wait at once with
  the tail of its log.
- Each daemon runs in its own session (``setsid``) with its pid and start time in
  ``run/NAME.pid``. ``stop`` signals only that process (a reused pid has another start
  time and is left alone), and counts a zombie (``Z``/``X`` in ``/proc/PID/stat``: PID 1
  may reap late after ``kill -9``) as stopped.
- ``up`` on a bootstrapped directory restarts what is not running (about 6 s; data kept,
  also after ``kill -9`` of every daemon); a directory whose bootstrap never finished
  (no ``cluster.json``) is wiped and bootstrapped again.
- Pitfalls measured on this kind of machine (../shared/CEPH-NOTES.md), each handled where
  the conf is written: no ``bluestore block path`` (mkfs fails on a symlink loop),
  ``ms mon client mode = crc`` for clients (RGW never authenticates with auth none
  otherwise), ``tcp_nodelay=1`` on beast (4 KiB GETs wait 40 ms on Nagle + delayed ACK
  without it), and a warm-up (the first bucket creation makes RGW's pools: 2-3 s).
- Measured (2 cores, Debian 12, Ceph 16.2.15): see README "S3 tests (Ceph RGW)".
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
#: Debian packages (no ceph-mgr: S3 does not need it); keep in step with
#: tools/install-system-deps.sh
PACKAGES = ("ceph-mon", "ceph-osd", "radosgw", "ceph-common", "uuid-runtime")
#: binaries this script runs; one missing means "install the packages"
BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "ceph", "monmaptool")
REGION = "us-east-1"
S3_USER = "cdp-test"
RGW_NAME = "client.rgw.gw"
GiB = 1 << 30

#: start order; stop goes the other way
DAEMONS = ("mon", "osd", "rgw")


class CephS3Error(Exception):
    """What went wrong, worded for the person who ran the command."""


def state_dir() -> Path:
    """``$CDP_CEPH_S3_DIR`` or ``REPO/.ceph-s3``."""
    env = os.environ.get("CDP_CEPH_S3_DIR")
    return Path(env).resolve() if env else REPO / ".ceph-s3"


def load_info(state: Path | None = None) -> dict[str, Any] | None:
    """``cluster.json`` of a bootstrapped cluster (endpoint, access_key, secret_key,
    region, ports), or None when there is none."""
    p = (state or state_dir()) / "cluster.json"
    try:
        info: dict[str, Any] = json.loads(p.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return info


def rgw_answers(endpoint: str, timeout: float = 2.0) -> bool:
    """True if an HTTP GET of ``endpoint`` gets any HTTP answer (RGW is serving)."""
    try:
        with urllib.request.urlopen(endpoint + "/", timeout=timeout) as r:
            r.read()
        return True
    except urllib.error.HTTPError:
        return True
    except (OSError, urllib.error.URLError):
        return False


def env_lines(info: dict[str, Any]) -> list[str]:
    """The shell ``export`` lines ``tools/ceph-s3 env`` prints."""
    return [
        f"export AWS_ACCESS_KEY_ID={info['access_key']}",
        f"export AWS_SECRET_ACCESS_KEY={info['secret_key']}",
        f"export CDP_TEST_S3_ENDPOINT={info['endpoint']}",
    ]


# -- processes -------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after ``(comm)``: [state, ppid, ...]; None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # "pid (comm) S ...": comm may hold spaces and parentheses, the state follows the last ')'
    return stat[stat.rindex(")") + 2 :].split()


def proc_state(pid: int) -> str | None:
    """The state letter of ``/proc/PID/stat`` (R, S, D, Z, ...), None if no such pid."""
    f = _stat_fields(pid)
    return f[0] if f else None


def start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot, ``/proc/PID/stat`` field 22): with the
    pid it names one process, whatever pid reuse happens later. None if gone."""
    f = _stat_fields(pid)
    return int(f[19]) if f else None


def alive(pid: int) -> bool:
    """Running (a zombie, ``Z``, or dead, ``X``, process counts as gone)."""
    st = proc_state(pid)
    return st is not None and st not in ("Z", "X")


def rss_bytes(pid: int) -> int:
    """Resident set size of a pid (0 if gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (held together while chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_percent(path: Path) -> float:
    """Percent of *path*'s filesystem free for unprivileged use (what ceph-mon checks)."""
    st = os.statvfs(path)
    return 100.0 * st.f_bavail / st.f_blocks if st.f_blocks else 0.0


def log(msg: str) -> None:
    print(f"ceph-s3: {msg}", file=sys.stderr, flush=True)


# -- the cluster -----------------------------------------------------------------------


class Cluster:
    """One state directory: its conf, daemons and S3 user."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.conf = state / "ceph.conf"
        self.info_path = state / "cluster.json"
        self.run = state / "run"
        self.logs = state / "log"
        #: daemons started by this process (for their exit status while we wait on them)
        self.children: dict[str, subprocess.Popen[bytes]] = {}

    # ---- small helpers
    def pidfile(self, daemon: str) -> Path:
        return self.run / f"{daemon}.pid"

    def pid(self, daemon: str) -> int | None:
        """The pid of ``daemon`` if it is running and is the process we started: the pid
        file holds ``PID STARTTIME``, so a reused pid is not taken for ours. (Not the
        cmdline: ``/proc/PID/cmdline`` of a starting Ceph daemon reads empty at times.)"""
        try:
            pid_s, _, started = self.pidfile(daemon).read_text().partition(" ")
            pid, when = int(pid_s), int(started)
        except (FileNotFoundError, ValueError):
            return None
        if not alive(pid) or start_time(pid) != when:
            return None
        return pid

    def ceph(self, *args: str, timeout: float = 30.0, check: bool = True) -> str:
        """Run the ``ceph`` CLI against this cluster; its stdout."""
        argv = ["ceph", "-c", str(self.conf), "--connect-timeout", "10", *args]
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise CephS3Error(f"`{' '.join(argv)}` timed out after {timeout:.0f} s") from e
        if check and r.returncode != 0:
            raise CephS3Error(f"`{' '.join(argv)}` failed ({r.returncode}): {r.stderr.strip()}")
        return r.stdout

    def tool(self, *argv: str, timeout: float = 120.0) -> str:
        """Run a ceph tool (monmaptool, ceph-mon --mkfs, radosgw-admin ...) or raise."""
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise CephS3Error(f"`{' '.join(argv)}` timed out after {timeout:.0f} s") from e
        if r.returncode != 0:
            raise CephS3Error(
                f"`{' '.join(argv)}` failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-2000:]}"
            )
        return r.stdout

    def argv(self, daemon: str) -> list[str]:
        c = ["-c", str(self.conf), "-f"]
        return {
            "mon": ["ceph-mon", *c, "-i", "a"],
            "osd": ["ceph-osd", *c, "-i", "0"],
            "rgw": ["radosgw", *c, "-n", RGW_NAME],
        }[daemon]

    def spawn(self, daemon: str) -> int:
        """Start ``daemon`` in its own session, output to ``log/DAEMON.out``; its pid."""
        out = open(self.logs / f"{daemon}.out", "ab")  # noqa: SIM115 - handed to the child
        try:
            p = subprocess.Popen(
                self.argv(daemon), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, close_fds=True,
            )
        finally:
            out.close()
        self.pidfile(daemon).write_text(f"{p.pid} {start_time(p.pid)}\n")
        self.children[daemon] = p
        return p.pid

    def log_tail(self, daemon: str, lines: int = 15) -> str:
        """The last lines of a daemon's own log and of its captured output."""
        name = {"mon": "mon.a", "osd": "osd.0", "rgw": RGW_NAME}[daemon]
        parts = []
        for p in (self.logs / f"ceph-{name}.log", self.logs / f"{daemon}.out"):
            with contextlib.suppress(FileNotFoundError):
                tail = p.read_text(errors="replace").splitlines()[-lines:]
                if tail:
                    parts.append(f"--- {p}\n" + "\n".join(tail))
        return "\n".join(parts)

    def wait(self, daemon: str, probe: Any, what: str, deadline_s: float) -> None:
        """Call ``probe()`` until it returns True; fail at once if the daemon died."""
        end = time.monotonic() + deadline_s
        while True:
            if self.pid(daemon) is None:
                child = self.children.get(daemon)
                status = child.poll() if child is not None else None
                hint = ""
                if status == errno.ENOSPC:
                    hint = f" (no space: {self.state} has {_free_percent(self.state):.1f} % free)"
                raise CephS3Error(
                    f"{daemon} exited (status {status}) while waiting for {what}{hint}\n"
                    f"{self.log_tail(daemon)}"
                )
            if probe():
                return
            if time.monotonic() > end:
                raise CephS3Error(
                    f"{what}: no answer after {deadline_s:.0f} s\n{self.log_tail(daemon)}"
                )
            time.sleep(0.25)

    # ---- probes
    def mon_ready(self) -> bool:
        try:
            self.ceph("quorum_status", timeout=15)
        except CephS3Error:
            return False
        return True

    def osd_ready(self) -> bool:
        # the OSD itself answers, not the (possibly stale) osdmap
        try:
            self.ceph("tell", "osd.0", "version", timeout=6)
        except CephS3Error:
            return False
        return True

    def endpoint(self) -> str:
        info = load_info(self.state)
        assert info is not None
        return str(info["endpoint"])

    # ---- bootstrap
    def write_conf(self, fsid: str, mon_v2: int, mon_v1: int, rgw_port: int, osd_bytes: int) -> None:
        s = self.state
        self.conf.write_text(
            f"""# written by tools/ceph-s3: a throw-away single-node test cluster (no auth)
[global]
fsid = {fsid}
mon host = [v2:127.0.0.1:{mon_v2},v1:127.0.0.1:{mon_v1}]
mon initial members = a
public addr = 127.0.0.1
auth cluster required = none
auth service required = none
auth client required = none
run dir = {s}/run
log file = {s}/log/$cluster-$name.log
mon cluster log file = {s}/log/$cluster.log
keyring = /dev/null
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon warn on pool no redundancy = false
osd objectstore = bluestore

[mon]
mon data = {s}/mon/$cluster-$id
# the mon exits with ENOSPC (status 28) at start when its filesystem has less than
# "avail crit" percent free (default 5: 12 GiB of a 250 GiB disk); a test cluster holds
# little, so it only refuses below 1 %
mon data avail crit = 1
mon data avail warn = 2

[osd]
osd data = {s}/osd/$cluster-$id
# no "bluestore block path": pointing it at the OSD dir makes mkfs fail on a symlink loop;
# block create + block size make a plain sparse file "block" there (O_DIRECT + libaio)
bluestore block create = true
bluestore block size = {osd_bytes}
osd memory target = {900 << 20}
# a killed RGW's watches are kept by the OSD (also across its restart) until this timeout,
# and RGW's next notify (a bucket creation) waits for them: 30 s by default after kill -9.
# Live watchers ping every 5 s (objecter tick), so 10 s still keeps them
osd client watch timeout = 10
# BlueFS replays its log at every mount (twice per OSD start) and by default lets it grow
# to 16 MiB before compacting: restarts spent 2-4 s per mount there, 0.1 s with 1 MiB
bluefs log compact min size = {1 << 20}

[client]
# radosgw's built-in ms_mon_client_mode (secure) needs cephx: with auth none it never
# connects ("get_initial_auth_request returned -13") unless told crc
ms mon client mode = crc

[{RGW_NAME}]
rgw data = {s}/rgw
# tcp_nodelay: 4 KiB ranged GETs take 44 ms p50 (Nagle + delayed ACK) without it, ~3 ms with
rgw frontends = beast endpoint=127.0.0.1:{rgw_port} tcp_nodelay=1
"""
        )

    def bootstrap(self) -> dict[str, float]:
        """Make a new cluster in an empty state directory; seconds per phase."""
        t: dict[str, float] = {}
        t0 = time.monotonic()
        for d in ("mon/ceph-a", "osd/ceph-0", "rgw", "run", "log"):
            (self.state / d).mkdir(parents=True, exist_ok=True)
        fsid = str(uuid.uuid4())
        mon_v2, mon_v1, rgw_port = free_ports(3)
        osd_bytes = int(os.environ.get("CDP_CEPH_S3_OSD_BYTES", 16 * GiB))
        self.write_conf(fsid, mon_v2, mon_v1, rgw_port, osd_bytes)
        monmap = self.state / "monmap"
        self.tool("monmaptool", "--create", "--fsid", fsid, "--addv", "a",
                  f"[v2:127.0.0.1:{mon_v2},v1:127.0.0.1:{mon_v1}]", str(monmap))
        self.tool("ceph-mon", "-c", str(self.conf), "--mkfs", "-i", "a", "--monmap", str(monmap))
        self.spawn("mon")
        self.wait("mon", self.mon_ready, "mon quorum", 60)
        t["mon"] = time.monotonic() - t0

        t1 = time.monotonic()
        osd_uuid = str(uuid.uuid4())
        osd_id = self.ceph("osd", "new", osd_uuid).strip()
        if osd_id != "0":
            raise CephS3Error(f"`ceph osd new` gave id {osd_id!r}, expected 0")
        self.tool("ceph-osd", "-c", str(self.conf), "-i", "0", "--mkfs", "--osd-uuid", osd_uuid)
        self.spawn("osd")
        self.wait("osd", self.osd_ready, "ceph tell osd.0 version", 120)
        t["osd"] = time.monotonic() - t1

        t2 = time.monotonic()
        endpoint = f"http://127.0.0.1:{rgw_port}"
        self.spawn("rgw")
        self.wait("rgw", lambda: rgw_answers(endpoint), f"RGW at {endpoint}", 120)
        alphabet = string.ascii_uppercase + string.digits
        access = "".join(secrets.choice(alphabet) for _ in range(20))
        secret = secrets.token_urlsafe(30)[:40]
        self.tool("radosgw-admin", "-c", str(self.conf), "-n", "client.admin", "user", "create",
                  f"--uid={S3_USER}", "--display-name=cdp tests",
                  f"--access-key={access}", f"--secret-key={secret}")
        t["rgw"] = time.monotonic() - t2

        info = {
            "fsid": fsid, "endpoint": endpoint, "region": REGION,
            "access_key": access, "secret_key": secret, "user": S3_USER,
            "mon_v2": mon_v2, "mon_v1": mon_v1, "rgw_port": rgw_port,
            "osd_bytes": osd_bytes, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        tmp = self.info_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(info, f, indent=1)
            f.write("\n")
        os.replace(tmp, self.info_path)  # last: "bootstrapped"
        return t

    def restart(self) -> dict[str, float]:
        """Start whichever daemons are not running, in order, each waited on its probe."""
        info = load_info(self.state)
        assert info is not None
        t: dict[str, float] = {}
        # the conf is derived from cluster.json: rewriting it lets fixes to it reach an
        # existing cluster (daemons already running keep what they read)
        self.write_conf(info["fsid"], info["mon_v2"], info["mon_v1"], info["rgw_port"],
                        info["osd_bytes"])
        if all(self.pid(d) is None for d in DAEMONS):
            for sock in self.run.glob("*.asok"):  # left by killed daemons (RGW's name has its pid)
                sock.unlink(missing_ok=True)
        probes = {
            "mon": (self.mon_ready, "mon quorum", 60.0, (info["mon_v2"], info["mon_v1"])),
            "osd": (self.osd_ready, "ceph tell osd.0 version", 120.0, ()),
            "rgw": (lambda: rgw_answers(info["endpoint"]), f"RGW at {info['endpoint']}", 120.0,
                    (info["rgw_port"],)),
        }
        for d in DAEMONS:
            probe, what, deadline, ports = probes[d]
            if self.pid(d) is not None:
                continue
            t0 = time.monotonic()
            busy = [p for p in ports if not port_free(p)]
            if busy:
                raise CephS3Error(
                    f"cannot start {d}: port {busy[0]} on 127.0.0.1 is taken by another process "
                    f"(free it, or `tools/ceph-s3 purge` and `up` for new ports)"
                )
            self.spawn(d)
            self.wait(d, probe, what, deadline)
            t[d] = time.monotonic() - t0
        return t

    def warm_up(self) -> float:
        """Create, fill and delete one bucket so the first test does not pay RGW's pool
        creation (2-3 s) and its slow first writes. Needs boto3 (the repository's venv);
        skipped with a note without it. Seconds spent."""
        try:
            import boto3  # type: ignore[import-untyped, unused-ignore]
            from botocore.config import Config  # type: ignore[import-untyped, unused-ignore]
        except ImportError:
            log("boto3 not importable here: warm-up skipped (the first bucket creation will take 2-3 s)")
            return 0.0
        info = load_info(self.state)
        assert info is not None
        t0 = time.monotonic()
        s3 = boto3.session.Session().client(
            "s3", endpoint_url=info["endpoint"], region_name=REGION,
            aws_access_key_id=info["access_key"], aws_secret_access_key=info["secret_key"],
            config=Config(s3={"addressing_style": "path"}, signature_version="s3v4",
                          request_checksum_calculation="when_required",
                          response_checksum_validation="when_required"),
        )
        bucket = f"cdp-warmup-{uuid.uuid4().hex[:8]}"
        s3.create_bucket(Bucket=bucket)
        try:
            blob = os.urandom(4 << 20)
            for i in range(4):
                s3.put_object(Bucket=bucket, Key=f"w{i}", Body=blob)
                s3.get_object(Bucket=bucket, Key=f"w{i}", Range="bytes=0-4095")["Body"].read()
        finally:
            for i in range(4):
                s3.delete_object(Bucket=bucket, Key=f"w{i}")
            s3.delete_bucket(Bucket=bucket)
        return time.monotonic() - t0

    def stop(self, grace: float = 20.0) -> list[str]:
        """SIGTERM each running daemon of ours (rgw, osd, mon), SIGKILL after ``grace``
        seconds; the names stopped. Pid files are removed."""
        stopped = []
        for d in reversed(DAEMONS):
            pid = self.pid(d)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                end = time.monotonic() + grace
                while alive(pid) and time.monotonic() < end:
                    time.sleep(0.1)
                if alive(pid):
                    log(f"{d} (pid {pid}) still running {grace:.0f} s after SIGTERM: SIGKILL")
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    end = time.monotonic() + 10
                    while alive(pid) and time.monotonic() < end:
                        time.sleep(0.1)
                stopped.append(d)
            self.pidfile(d).unlink(missing_ok=True)
        return stopped

    def status(self) -> dict[str, Any]:
        info = load_info(self.state)
        out: dict[str, Any] = {"state_dir": str(self.state), "bootstrapped": info is not None,
                               "daemons": {}}
        total = 0
        for d in DAEMONS:
            pid = self.pid(d)
            rss = rss_bytes(pid) if pid else 0
            total += rss
            out["daemons"][d] = {"pid": pid, "rss_bytes": rss}
        out["rss_bytes"] = total
        if info is not None:
            out["endpoint"] = info["endpoint"]
            out["answering"] = rgw_answers(info["endpoint"])
        else:
            out["answering"] = False
        return out


@contextlib.contextmanager
def locked(state: Path) -> Iterator[None]:
    """Serialise up/stop/purge on one state directory (two `up` at once would race)."""
    state.mkdir(parents=True, exist_ok=True)
    fd = os.open(state / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# -- packages --------------------------------------------------------------------------


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None]


def install_packages() -> float:
    """apt-get install the packages if a binary is missing (``apt-get update`` first only
    when the install cannot find them); seconds spent (0 when all were present)."""
    if not missing_binaries():
        return 0.0
    t0 = time.monotonic()
    sudo: list[str] = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            raise CephS3Error(
                f"missing {', '.join(missing_binaries())} and not root: "
                f"apt-get install --no-install-recommends {' '.join(PACKAGES)}"
            )
        sudo = ["sudo"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # wait for another apt (tools/install-system-deps.sh) instead of failing on its lock
    apt = [*sudo, "apt-get", "-o", "DPkg::Lock::Timeout=600", "-q"]
    install = [*apt, "install", "-y", "--no-install-recommends", *PACKAGES]
    log(f"installing {' '.join(PACKAGES)}")
    r = subprocess.run(install, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        log("install failed, running apt-get update first")
        subprocess.run([*apt, "update"], env=env, capture_output=True, text=True, check=False)
        r = subprocess.run(install, env=env, capture_output=True, text=True)
    if r.returncode != 0 or missing_binaries():
        raise CephS3Error(f"apt-get install {' '.join(PACKAGES)} failed:\n{r.stderr.strip()[-2000:]}")
    return time.monotonic() - t0


# -- commands --------------------------------------------------------------------------


def cmd_up(cl: Cluster) -> int:
    inst = install_packages()
    if inst:
        log(f"packages installed in {inst:.1f} s")
    with locked(cl.state):
        st = cl.status()
        if st["bootstrapped"] and st["answering"] and all(
            v["pid"] for v in st["daemons"].values()
        ):
            log(f"already running at {st['endpoint']}")
            return 0
        t0 = time.monotonic()
        fresh = not st["bootstrapped"]
        if fresh and any(p for p in cl.state.iterdir() if p.name != ".lock"):
            log(f"{cl.state}: an unfinished bootstrap (no cluster.json): wiping it")
            cl.stop()
            wipe(cl.state)
        try:
            phases = cl.bootstrap() if fresh else cl.restart()
            phases["warm-up"] = cl.warm_up()
        except BaseException:
            cl.stop()  # leave nothing running that we started
            raise
        total = time.monotonic() - t0
        rss = cl.status()["rss_bytes"]
        detail = ", ".join(f"{k} {v:.1f}" for k, v in phases.items())
        log(f"{'bootstrapped' if fresh else 'restarted'} in {total:.1f} s ({detail}); "
            f"S3 at {cl.endpoint()}; RSS {rss / 1e6:.0f} MB")
    return 0


def wipe(state: Path) -> None:
    """Remove everything in ``state`` but the lock file."""
    for p in state.iterdir():
        if p.name == ".lock":
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def cmd_stop(cl: Cluster) -> int:
    if not cl.state.is_dir():
        return 0
    with locked(cl.state):
        stopped = cl.stop()
    log(f"stopped {', '.join(stopped)}" if stopped else "nothing of ours was running")
    return 0


def cmd_purge(cl: Cluster) -> int:
    if not cl.state.is_dir():
        return 0
    if not (cl.conf.exists() or cl.info_path.exists() or (cl.state / ".lock").exists()):
        raise CephS3Error(f"{cl.state} does not look like a tools/ceph-s3 state directory: not removed")
    with locked(cl.state):
        cl.stop()
        wipe(cl.state)
    cl.state.joinpath(".lock").unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        cl.state.rmdir()
    log(f"purged {cl.state}")
    return 0


def cmd_env(cl: Cluster) -> int:
    info = load_info(cl.state)
    if info is None:
        raise CephS3Error(f"no cluster in {cl.state}: run tools/ceph-s3 up")
    print("\n".join(env_lines(info)))
    return 0


def cmd_status(cl: Cluster) -> int:
    st = cl.status()
    for d, v in st["daemons"].items():
        pid = v["pid"]
        print(f"{d:4} {'pid ' + str(pid) if pid else 'not running':>12}  RSS {v['rss_bytes'] / 1e6:6.0f} MB")
    print(f"total RSS {st['rss_bytes'] / 1e6:.0f} MB; S3 {st.get('endpoint', '-')} "
          f"{'answering' if st['answering'] else 'not answering'}")
    return 0 if st["answering"] else 3


def cmd_install(cl: Cluster) -> int:
    inst = install_packages()
    log(f"packages installed in {inst:.1f} s" if inst else "packages present")
    return 0


COMMANDS = {"up": cmd_up, "stop": cmd_stop, "purge": cmd_purge, "env": cmd_env,
            "status": cmd_status, "install": cmd_install}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tools/ceph-s3", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=list(COMMANDS))
    a = ap.parse_args(argv)
    try:
        return COMMANDS[a.command](Cluster(state_dir()))
    except CephS3Error as e:
        log(f"error: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
