"""tools/ceph-s3's pieces that need no Ceph: process state (a zombie counts as gone),
the pid + start time check that keeps `stop` to its own daemons, `env` lines, free ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tools import ceph_s3


def test_a_zombie_is_not_alive() -> None:
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert ceph_s3.alive(p.pid) and ceph_s3.proc_state(p.pid) in ("R", "S")
        os.kill(p.pid, signal.SIGKILL)
        end = time.monotonic() + 10
        while ceph_s3.proc_state(p.pid) != "Z" and time.monotonic() < end:
            time.sleep(0.01)
        assert ceph_s3.proc_state(p.pid) == "Z"  # not reaped yet: kill -0 would succeed
        assert not ceph_s3.alive(p.pid)
    finally:
        p.kill()
        p.wait()
    assert ceph_s3.proc_state(p.pid) is None and not ceph_s3.alive(p.pid)


def test_pid_must_be_ours(tmp_path: Path) -> None:
    cl = ceph_s3.Cluster(tmp_path)
    cl.run.mkdir()
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    q = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        cl.pidfile("mon").write_text(f"{p.pid} {ceph_s3.start_time(p.pid)}\n")
        # q's pid with another start time: what a reused pid looks like
        cl.pidfile("osd").write_text(f"{q.pid} {ceph_s3.start_time(q.pid) - 1}\n")
        cl.pidfile("rgw").write_text(f"{q.pid}\n")  # no start time: not trusted either
        assert cl.pid("mon") == p.pid
        assert cl.pid("osd") is None and cl.pid("rgw") is None
        assert cl.stop(grace=5) == ["mon"]
        assert p.wait(5) == -signal.SIGTERM
        assert q.poll() is None  # left alone
        assert not any(cl.run.iterdir())  # pid files removed
    finally:
        for x in (p, q):
            x.kill()
            x.wait()


def test_env_lines_and_ports(tmp_path: Path) -> None:
    info = {"access_key": "AK", "secret_key": "SK", "endpoint": "http://127.0.0.1:1"}
    assert ceph_s3.env_lines(info) == [
        "export AWS_ACCESS_KEY_ID=AK",
        "export AWS_SECRET_ACCESS_KEY=SK",
        "export CDP_TEST_S3_ENDPOINT=http://127.0.0.1:1",
    ]
    ports = ceph_s3.free_ports(3)
    assert len(set(ports)) == 3 and all(ceph_s3.port_free(p) for p in ports)
    assert ceph_s3.load_info(tmp_path) is None
    assert not ceph_s3.rgw_answers(f"http://127.0.0.1:{ports[0]}", timeout=0.5)
