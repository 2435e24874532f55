"""The REST API against a real cdpd (issue 22): every route, the same answers as cdpctl
(one operations layer), the 401/403/404/400 paths, a large file restored streamed in
bounded memory, a directory as a tar stream, rewind and its undo."""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from cdp.web.api import PREFIX, ROUTES
from cdp.web.openapi import OPENAPI
from tests.integration.web_env import A1, A2, BIG, WebEnv, big_sha256, web_env
from tools.harness import rss_bytes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebEnv]:
    with web_env(tmp_path_factory.mktemp("web")) as e:
        yield e


def test_every_route_is_documented_and_every_documented_path_is_served(env: WebEnv) -> None:
    routes = {(m.lower(), p) for m, p, _h in ROUTES}
    documented = {(m, p) for p, ops in OPENAPI["paths"].items() for m in ops}
    assert routes == documented
    served = env.get(PREFIX + "/openapi.json")
    assert served.status == 200 and served.json() == OPENAPI
    # and the application serves exactly those (HEAD is aiohttp's twin of each GET)
    import cdp.web.server as server

    app = server.make_app(None, "t")  # type: ignore[arg-type]
    got = {(r.method.lower(), r.resource.canonical[len(PREFIX):]) for r in app.router.routes()
           if r.resource is not None and r.resource.canonical.startswith(PREFIX) and r.method != "HEAD"}
    assert got == routes


def test_token_origin_and_errors(env: WebEnv) -> None:
    r = env.get(PREFIX + "/volumes", token=None)
    assert r.status == 401 and "token" in r.json()["error"]["message"]
    assert r.headers.get("WWW-Authenticate", "").startswith("Bearer")
    assert env.get(PREFIX + "/volumes", token="wrong").status == 401
    assert env.get(PREFIX + "/nothing", token=None).status == 401  # even unknown paths
    # the console's cookie is accepted as well as the header
    r = env.get(PREFIX + "/volumes", token=None, headers={"Cookie": f"cdp_token={env.token}"})
    assert r.status == 200
    # the console itself needs no token (it holds no data)
    with urllib.request.urlopen(env.url + "/") as f:
        assert f.status == 200 and b"<html" in f.read().lower()
    # state-changing requests from another site: 403, with the token or the cookie
    for hdr in ({"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
        r = env.call("POST", PREFIX + "/volumes/vol0/markers", {"label": "x"}, headers=hdr)
        assert r.status == 403 and "cross-site" in r.json()["error"]["message"], r.body
    n = len(env.cdpd.cdpctl_json("markers"))
    assert n == 2  # nothing was taken
    # 404 with the CLI's message and exit status; 400 for a malformed request
    r = env.get(PREFIX + "/volumes/nope")
    assert r.status == 404 and r.json()["error"]["exit_status"] == 3
    cli = env.cdpctl_err("status", "-V", "nope")
    assert r.json()["error"]["message"] in cli
    assert env.get(PREFIX + "/no/such/route").status == 404
    r = env.get(PREFIX + "/volumes/vol0/files?at=2024-13-45")
    assert r.status == 400 and r.json()["error"]["exit_status"] == 2
    r = env.get(PREFIX + "/volumes/vol0/files?at=marker99")
    assert r.status == 404
    assert env.get(PREFIX + "/volumes/vol0/find").status == 400  # pattern missing
    assert env.get(PREFIX + "/volumes/vol0/diff").status == 400  # from missing
    assert env.get(PREFIX + "/volumes/vol0/timeline?buckets=0").status == 400
    assert env.get(PREFIX + "/volumes/vol0/timeline?buckets=many").status == 400
    r = env.call("POST", PREFIX + "/volumes/vol0/rewind", {})
    assert r.status == 400 and "to" in r.json()["error"]["message"]
    r = env.call("POST", PREFIX + "/volumes/vol0/retention", {"colour": "blue"})
    assert r.status == 400
    assert env.call("DELETE", PREFIX + "/volumes").status == 405


def test_volumes_status_markers_as_cdpctl(env: WebEnv) -> None:
    c = env.cdpd
    assert env.get(PREFIX + "/volumes").json() == c.cdpctl_json("volume", "list")
    st = env.get(PREFIX + "/volumes/vol0").json()
    assert st["volume"] == "vol0" and st["last_seq"] == c.cdpctl_json("status")["last_seq"]
    assert env.get(PREFIX + "/volumes/vol0/markers").json() == c.cdpctl_json("markers")
    r = env.call("POST", PREFIX + "/volumes/vol0/markers", {"label": "from-the-web"},
                 headers={"Origin": env.url})  # the console's own origin
    assert r.status == 201 and r.json()["label"] == "from-the-web"
    assert c.cdpctl_json("markers")[-1]["name"] == r.json()["name"]
    assert env.get(PREFIX + "/alerts").json() == c.cdpctl_json("alerts")
    assert env.get(PREFIX + "/volumes/vol0/retention").json()["tiers"] == \
        c.cdpctl_json("retention", "show")["tiers"]
    r = env.call("POST", PREFIX + "/volumes/vol0/retention", {"tiers": ["all 72h", "1d 30d"]})
    assert r.status == 200 and r.json()["tiers"] == ["all 72h", "1d 30d"]
    assert c.cdpctl_json("retention", "show")["tiers"] == ["all 72h", "1d 30d"]


def test_timeline(env: WebEnv) -> None:
    c = env.cdpd
    st = c.cdpctl_json("status")
    t = env.get(PREFIX + "/volumes/vol0/timeline?buckets=50").json()
    assert len(t["buckets"]) == 50
    assert t["buckets"][0]["start_ns"] == t["from_ns"] and t["buckets"][-1]["end_ns"] == t["to_ns"]
    # every record from the oldest point on falls in exactly one bucket
    assert sum(b["writes"] for b in t["buckets"]) == st["last_seq"] - t["first_seq"] + 1
    assert sum(b["bytes"] for b in t["buckets"]) > BIG // 2
    names = [m["name"] for m in t["markers"]]
    assert names[:2] == ["marker1", "marker2"]
    assert set(t["retention"]) >= {"tiers", "per_tier", "faded_before_ns"}
    # a zoomed range: markers outside it are left out; a point is a range edge too
    m2 = c.cdpctl_json("markers")[1]
    z = env.get(PREFIX + f"/volumes/vol0/timeline?from=marker2&to={m2['time_ns'] + 1}&buckets=3").json()
    assert z["from_ns"] == m2["time_ns"] and [m["name"] for m in z["markers"]] == ["marker2"]


def test_files_versions_find_diff_changed_as_cdpctl(env: WebEnv) -> None:
    c = env.cdpd
    r = env.get(PREFIX + "/volumes/vol0/files?at=marker1&path=/docs").json()
    assert r == c.cdpctl_json("files", "--at", "marker1", "/docs")
    assert {e["name"] for e in r["entries"]} == {"a.txt", "sub"}
    r = env.get(PREFIX + "/volumes/vol0/files?at=marker1&path=/docs&recursive=1").json()
    assert "/docs/sub/b.txt" in {e["path"] for e in r["entries"]}
    assert env.get(PREFIX + "/volumes/vol0/files?at=marker2&path=/docs/sub/b.txt").status == 404
    v = env.get(PREFIX + "/volumes/vol0/versions?path=/docs/a.txt").json()
    assert v == c.cdpctl_json("versions", "/docs/a.txt")
    assert len(v["versions"]) == 2
    f = env.get(PREFIX + "/volumes/vol0/find?pattern=*.txt&at=marker1").json()
    assert f == c.cdpctl_json("find", "*.txt", "--at", "marker1")
    d = env.get(PREFIX + "/volumes/vol0/diff?from=marker1&to=marker2").json()
    assert d == c.cdpctl_json("diff", "--from", "marker1", "--to", "marker2")
    changes = {(x["change"], x["path"]) for x in d["changes"]}
    assert ("modified", "/docs/a.txt") in changes and ("deleted", "/docs/sub/b.txt") in changes
    ch = env.get(PREFIX + "/volumes/vol0/changed?from=marker1&to=marker2").json()
    assert ch == c.cdpctl_json("changed", "--from", "marker1", "--to", "marker2")


def test_restore_file_and_directory(env: WebEnv, tmp_path: Path) -> None:
    r = env.get(PREFIX + "/volumes/vol0/restore?path=/docs/a.txt&at=marker1")
    assert r.status == 200 and r.body == A1
    assert r.headers["Content-Disposition"].startswith('attachment; filename="a.txt"')
    assert env.get(PREFIX + "/volumes/vol0/restore?path=/docs/a.txt&at=marker2").body == A2
    assert env.get(PREFIX + "/volumes/vol0/restore?path=/docs/nope&at=marker1").status == 404
    assert env.get(PREFIX + "/volumes/vol0/restore?at=marker1").status == 400
    t = env.get(PREFIX + "/volumes/vol0/restore?path=/docs&at=marker1")
    assert t.status == 200 and t.headers["Content-Type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(t.body)) as tf:
        names = set(tf.getnames())
        assert {"docs/a.txt", "docs/sub", "docs/sub/b.txt"} <= names, names
        a = tf.extractfile("docs/a.txt")
        assert a is not None and a.read() == A1


def test_large_file_restore_streams_in_bounded_memory(env: WebEnv, tmp_path: Path) -> None:
    c = env.cdpd
    assert c.proc is not None
    pid = c.proc.pid
    before = rss_bytes(pid)
    peak = [before]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes(pid))
            time.sleep(0.02)

    w = threading.Thread(target=watch)
    w.start()
    h = hashlib.sha256()
    n = 0
    req = urllib.request.Request(env.url + PREFIX + "/volumes/vol0/restore?path=/big.bin&at=marker1",
                                 headers={"Authorization": f"Bearer {env.token}"})
    try:
        with urllib.request.urlopen(req, timeout=600) as resp:
            assert int(resp.headers["Content-Length"]) == BIG
            while chunk := resp.read(1 << 20):
                h.update(chunk)
                n += len(chunk)
    finally:
        done.set()
        w.join()
    assert n == BIG
    assert h.hexdigest() == big_sha256()
    out = tmp_path / "big.cli"
    c.cdpctl("restore", "/big.bin", "--at", "marker1", "-o", str(out))
    assert hashlib.sha256(out.read_bytes()).hexdigest() == h.hexdigest()
    grew = peak[0] - before
    assert grew < BIG // 4, f"cdpd's RSS grew by {grew >> 20} MiB while streaming {BIG >> 20} MiB"


def test_rewind_answers_with_the_undo_point(env: WebEnv) -> None:
    c = env.cdpd
    head = c.cdpctl_json("status")["last_seq"]
    r = env.call("POST", PREFIX + "/volumes/vol0/rewind", {"to": "marker1"})
    assert r.status == 200, r.body
    res = r.json()
    assert res["changed"] and res["undo"] == f"@{res['rewind_seq'] - 1}"
    assert res["undo"] == f"@{head}" or int(res["undo"][1:]) >= head
    assert env.get(PREFIX + "/volumes/vol0/restore?path=/docs/a.txt&at=now").body == A1
    t = env.get(PREFIX + "/volumes/vol0/timeline").json()
    assert res["rewind_seq"] in [x["seq"] for x in t["rewinds"]]
    u = env.call("POST", PREFIX + "/volumes/vol0/rewind", {"to": res["undo"]})
    assert u.status == 200 and u.json()["changed"]
    assert env.get(PREFIX + "/volumes/vol0/restore?path=/docs/a.txt&at=now").body == A2
    assert env.call("POST", PREFIX + "/volumes/vol0/rewind", {"to": "marker77"}).status == 404


def test_cdpctl_web_prints_a_working_url(env: WebEnv) -> None:
    out = env.cdpd.cdpctl("web").stdout.strip()
    assert out == f"{env.url}/#token={env.token}"
    j = env.cdpd.cdpctl_json("web")
    assert j["token"] == env.token
