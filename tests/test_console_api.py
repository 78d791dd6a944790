"""The web console's HTTP side: login, CSRF, host checks, uploads (folder and S3), submission,
cancel, resubmission and file access. In-process (Starlette's test client); the S3 path talks to
the moto server. The browser test (test_console_browser.py) runs the same console end to end."""

from __future__ import annotations

import json
import os
import re
import sys
import time

import httpx
import pytest
from codsplat.orchestrator.backends import aws_client
from codsplat.orchestrator.blobs import S3Blobs
from codsplat.orchestrator.console import build_console
from codsplat.orchestrator.console.app import create_app
from codsplat.orchestrator.console.auth import Guard
from codsplat.orchestrator.console.service import ConsoleService
from codsplat.orchestrator.console.uploads import MIN_PART, S3Uploads
from codsplat.orchestrator.records import JobRecord, SQLiteStore
from codsplat.orchestrator.settings import Settings
from conftest import codsplat
from starlette.testclient import TestClient

TOKEN = "s3cret-token"


def logged_in(client: TestClient) -> dict[str, str]:
    """Log in as the browser does; return the headers a page's script sends (its CSRF token)."""
    reply = client.post("/login", data={"token": TOKEN, "next": "/"}, follow_redirects=False)
    assert reply.status_code == 303 and reply.headers["location"] == "/"
    page = client.get("/")
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', page.text).group(1)
    return {"X-CSRF-Token": csrf}


@pytest.fixture
def home(tmp_path):
    return tmp_path / "home"


@pytest.fixture
def client(home):
    guard = Guard(token=TOKEN, allowed_hosts=frozenset({"testserver"}))
    with TestClient(build_console(Settings(), guard, home)) as c:
        yield c


def upload(client, headers, name, data: bytes) -> str:
    plan = client.post("/api/uploads", json={"files": [{"name": name, "size": len(data)}]}, headers=headers)
    assert plan.status_code == 201, plan.text
    [f] = plan.json()["files"]
    parts = []
    for n, link in enumerate(f["urls"]):
        reply = client.put(link, content=data[n * f["part_size"]:(n + 1) * f["part_size"]])
        assert reply.status_code == 200, reply.text
        parts.append({"part": n + 1, "etag": reply.headers["etag"]})
    done = client.post("/api/uploads/complete", json={"key": f["key"], "upload_id": f["upload_id"], "parts": parts}, headers=headers)
    assert done.status_code == 200, done.text
    return plan.json()["input"]


def test_nothing_is_served_without_the_login(client):
    assert client.get("/", follow_redirects=False).headers["location"] == "/login?next=/"
    reply = client.get("/api/jobs")
    assert reply.status_code == 401 and "Log in" in reply.json()["error"]
    assert client.get("/files/x/splat.ply").status_code == 401
    wrong = client.post("/login", data={"token": "guess", "next": "/"})
    assert wrong.status_code == 401 and "not right" in wrong.text
    assert client.get("/api/jobs").status_code == 401
    logged_in(client)
    assert client.get("/api/jobs").json() == {"jobs": []}


def test_state_changes_need_the_csrf_token_and_a_same_origin_page(client):
    headers = logged_in(client)
    settings = {"settings": {"preset": "tiny"}}
    assert client.post("/api/jobs/check", json=settings).status_code == 403
    assert client.post("/api/jobs/check", json=settings, headers={"X-CSRF-Token": "forged"}).status_code == 403
    assert client.post("/api/jobs/check", json=settings, headers={**headers, "Origin": "https://evil.example"}).status_code == 403
    assert client.post("/api/jobs/check", json=settings, headers={**headers, "Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert client.post("/api/jobs/check", json=settings, headers={**headers, "Origin": "http://testserver"}).status_code == 200
    # a login form posted from another site is refused too (login CSRF)
    assert client.post("/login", data={"token": TOKEN}, headers={"Origin": "https://evil.example"}).status_code == 403


def test_other_host_names_open_redirects_and_markup_are_refused(client):
    assert client.get("/login", headers={"Host": "attacker.example"}).status_code == 400  # DNS rebinding
    reply = client.post("/login", data={"token": TOKEN, "next": "//evil.example/"}, follow_redirects=False)
    assert reply.headers["location"] == "/"
    page = client.get('/login?next=/"><script>alert(1)</script>')
    assert "<script>alert" not in page.text
    headers = client.get("/login").headers
    assert "frame-ancestors 'none'" in headers["content-security-policy"] and headers["x-frame-options"] == "DENY"
    assert "httponly" in reply.headers["set-cookie"].lower() and "samesite=strict" in reply.headers["set-cookie"].lower()


def test_no_login_is_refused_beyond_loopback():
    proc = codsplat("console", "--host", "0.0.0.0", "--no-login", "--embedded", "/tmp/never-used")
    assert proc.returncode == 2 and "--no-login is only allowed on 127.0.0.1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_settings_and_files_get_errors_that_name_them(client):
    headers = logged_in(client)
    reply = client.post("/api/jobs/check", json={"settings": {"train": {"stepz": 10}}}, headers=headers)
    assert reply.status_code == 422 and "train.stepz" in reply.json()["error"] and "steps" in reply.json()["error"]
    reply = client.post("/api/jobs/check", json={"settings": {"image": "evil:latest"}}, headers=headers)
    assert reply.status_code == 422 and reply.json()["error"].startswith("image:")
    reply = client.post("/api/uploads", json={"files": [{"name": "notes.txt", "size": 10}]}, headers=headers)
    assert reply.status_code == 422 and '"notes.txt"' in reply.json()["error"] and ".mp4" in reply.json()["error"]
    reply = client.post("/api/uploads", json={"files": [{"name": "a.mp4", "size": 5}, {"name": "b.jpg", "size": 5}]}, headers=headers)
    assert reply.status_code == 422 and "alone" in reply.json()["error"]
    reply = client.post("/api/uploads", json={"files": ["a.mp4"]}, headers=headers)
    assert reply.status_code == 422 and reply.json()["error"].startswith("files:")
    plan = client.post("/api/uploads", json={"files": [{"name": "a.mp4", "size": 5}]}, headers=headers).json()
    [f] = plan["files"]
    reply = client.post("/api/uploads/complete", json={"key": f["key"], "upload_id": f["upload_id"], "parts": [{"part": "x"}]},
                        headers=headers)
    assert reply.status_code == 422 and reply.json()["error"].startswith("parts:")
    reply = client.post("/api/jobs", content=b"{nope", headers={**headers, "Content-Type": "application/json"})
    assert reply.status_code == 422 and "not valid JSON" in reply.json()["error"]


def test_folder_upload_in_parts_then_submit_writes_the_job_document(client, home):
    headers = logged_in(client)
    data = bytes(range(256)) * (MIN_PART * 2 // 256 + 1000)  # three parts
    key = upload(client, headers, "My Kitchen.MP4", data)
    assert re.fullmatch(r"uploads/console/\d{8}-[0-9a-f]{8}/My-Kitchen\.mp4", key)
    assert (home / key).read_bytes() == data
    assert not any((home / ".uploads").iterdir())  # the parts are gone once joined
    # a submission before the media has arrived is refused, naming the input
    early = client.post("/api/jobs", json={"input": "uploads/console/none/x.mp4", "settings": {}}, headers=headers)
    assert early.status_code == 422 and "has not arrived" in early.json()["error"]
    reply = client.post("/api/jobs", json={"input": key, "settings": {"preset": "tiny", "notify": {"email": ["a@example.com"]}},
                                           "name": "My Kitchen.MP4"}, headers=headers)
    assert reply.status_code == 201, reply.text
    job_id = reply.json()["id"]
    assert re.fullmatch(r"my-kitchen-[0-9a-f]{6}", job_id)
    document = json.loads((home / "jobs" / "console" / f"{job_id}.json").read_text())
    assert document == {"version": 1, "id": job_id, "input": key, "preset": "tiny", "notify": {"email": ["a@example.com"]}}
    detail = client.get(f"/api/jobs/{job_id}").json()
    assert detail["state"] == "SUBMITTED"  # written, not yet taken in by a daemon


def test_a_photo_upload_clears_abandoned_uploads_once_not_once_a_photo(client, home, monkeypatch):
    """Clearing walks every staged upload: once a file, 2,000 photos walked 2,000 folders 2,000 times
    (48 s, the console unanswering). An abandoned upload is still cleared."""
    from codsplat.orchestrator.console.uploads import ABANDONED_SECONDS, FolderUploads

    headers = logged_in(client)
    old = home / ".uploads" / ("0" * 24)
    old.mkdir(parents=True)
    os.utime(old, (time.time() - ABANDONED_SECONDS - 60,) * 2)
    walks = []
    clear = FolderUploads.clear_abandoned
    monkeypatch.setattr(FolderUploads, "clear_abandoned", lambda self, now=None: walks.append(1) or clear(self, now))
    files = [{"name": f"p{i}.jpg", "size": 1000} for i in range(300)]
    reply = client.post("/api/uploads", json={"files": files}, headers=headers)
    assert reply.status_code == 201 and len(reply.json()["files"]) == 300
    assert len(walks) == 1 and not old.exists()


def test_upload_links_are_signed_and_expire(client, home):
    headers = logged_in(client)
    plan = client.post("/api/uploads", json={"files": [{"name": "a.mp4", "size": 100}]}, headers=headers).json()
    link = plan["files"][0]["urls"][0]
    assert client.put(link.replace("sig=", "sig=x"), content=b"x").status_code == 403
    path, query = link.split("?")
    other = path.rsplit("/", 1)[0] + "/2?" + query  # a signature is for one part only
    assert client.put(other, content=b"x").status_code == 403
    expired = re.sub(r"expires=\d+", f"expires={int(time.time()) - 1}", link)
    assert client.put(expired, content=b"x").status_code == 403
    too_big = client.put(link, content=b"x" * (MIN_PART + 1))  # a signed link takes one part, not a flood
    assert too_big.status_code == 422 and "larger than a part" in too_big.json()["error"]
    assert not list((home / ".uploads").glob("*/*.tmp"))
    assert client.put(link, content=b"x" * 100).status_code == 200


def finished_job(home, store, job_id="kitchen", state="SUCCEEDED"):
    """A job as the daemon leaves it: its document, record, stage folders and export."""
    (home / "uploads").mkdir(parents=True, exist_ok=True)
    (home / "uploads" / "k.mp4").write_bytes(b"video")
    (home / "jobs").mkdir(exist_ok=True)
    (home / "jobs" / f"{job_id}.json").write_text(json.dumps({"version": 1, "input": "uploads/k.mp4", "preset": "tiny"}))
    out = home / "results" / job_id
    for stage in ("frames", "sfm", "train", "export"):
        (out / stage).mkdir(parents=True)
        (out / stage / "manifest.json").write_text(json.dumps({"stage": stage}))
    (out / "export" / "splat.ply").write_bytes(b"ply")
    (out / "export" / "metrics.json").write_text(json.dumps({"psnr": 25.0, "previews": []}))
    store.create(JobRecord(job_id=job_id, job_key=f"jobs/{job_id}.json", state=state, input="s3://local/uploads/k.mp4",
                           result={"outputs": [f"results/{job_id}/export/splat.ply", f"results/{job_id}/export/metrics.json"],
                                   "metrics": {"psnr": 25.0}, "estimated_cost_usd": 0.01} if state == "SUCCEEDED" else None))


def test_job_page_files_and_resubmission_from_finished_stages(client, home):
    headers = logged_in(client)
    store = SQLiteStore(home / "codsplat.db")
    finished_job(home, store)
    detail = client.get("/api/jobs/kitchen").json()
    assert detail["state"] == "SUCCEEDED" and detail["metrics"]["psnr"] == 25.0 and detail["estimated_cost_usd"] == 0.01
    assert detail["files"]["splat.ply"] == "/files/kitchen/splat.ply"
    assert client.get("/files/kitchen/splat.ply").content == b"ply"
    for bad in ("../sfm/manifest.json", "..%2Fsfm%2Fmanifest.json", "nothing.ply"):
        assert client.get(f"/files/kitchen/{bad}").status_code == 404
    assert client.get("/api/jobs/nobody").status_code == 404

    reply = client.post("/api/jobs/kitchen/resubmit", json={"settings": {"export": {"min_psnr": 12}}}, headers=headers)
    assert reply.status_code == 201, reply.text
    assert reply.json()["id"] == "kitchen-r2"
    document = json.loads((home / "jobs" / "kitchen-r2.json").read_text())  # beside the original: the same owner
    assert document == {"version": 1, "input": "uploads/k.mp4", "preset": "tiny", "export": {"min_psnr": 12}, "id": "kitchen-r2"}
    for stage in ("frames", "sfm", "train"):  # the pipeline decides from their fingerprints what to reuse
        assert (home / "results" / "kitchen-r2" / stage / "manifest.json").is_file()
    assert not (home / "results" / "kitchen-r2" / "export").exists()
    bad = client.post("/api/jobs/kitchen/resubmit", json={"settings": {"train": {"steps": -1}}}, headers=headers)
    assert bad.status_code == 422 and "train.steps" in bad.json()["error"]


def test_resubmissions_at_once_each_get_their_own_id(client, home):
    """Neither the record check nor the document write is a lock: the document is created only
    where none is, and a resubmission that loses the race takes the next number."""
    from concurrent.futures import ThreadPoolExecutor

    headers = logged_in(client)
    finished_job(home, SQLiteStore(home / "codsplat.db"))
    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda n: client.post("/api/jobs/kitchen/resubmit", headers=headers,
                                                      json={"settings": {"train": {"seed": n}}}), range(6)))
    assert [r.status_code for r in replies] == [201] * 6
    ids = sorted(r.json()["id"] for r in replies)
    assert ids == sorted(f"kitchen-r{n}" for n in range(2, 8))
    seeds = {json.loads((home / "jobs" / f"{i}.json").read_text())["train"]["seed"] for i in ids}
    assert seeds == set(range(6))  # none overwrote another


def test_cancel_a_queued_job_and_refuse_to_cancel_a_finished_one(client, home):
    headers = logged_in(client)
    store = SQLiteStore(home / "codsplat.db")
    finished_job(home, store, "done")
    store.create(JobRecord(job_id="waiting", job_key="jobs/waiting.json", state="QUEUED"))
    reply = client.post("/api/jobs/waiting/cancel", headers=headers)
    assert reply.status_code == 200 and reply.json()["state"] == "CANCELLED"
    assert store.get("waiting").state == "CANCELLED"
    reply = client.post("/api/jobs/done/cancel", headers=headers)
    assert reply.status_code == 422 and "already ended" in reply.json()["error"]
    listed = {j["id"]: j["state"] for j in client.get("/api/jobs").json()["jobs"]}
    assert listed == {"waiting": "CANCELLED", "done": "SUCCEEDED"}


def test_s3_upload_goes_straight_to_the_bucket_with_presigned_parts(moto_server, s3, tmp_path):
    """AWS mode: the browser PUTs parts to S3 presigned links; the console only starts and completes."""
    s3 = aws_client(Settings(aws_endpoint=moto_server.url), "s3")  # as the console makes it (SigV4 links)
    store = SQLiteStore(tmp_path / "records.db")
    service = ConsoleService(store, S3Blobs(s3, "codsplat-data"), S3Uploads(s3, "codsplat-data"), Settings().policy, Settings())
    guard = Guard(token=TOKEN)
    with TestClient(create_app(service, guard, connect_src=s3.meta.endpoint_url)) as client:
        headers = logged_in(client)
        data = b"\x00video" * (MIN_PART // 6 + 10_000)  # two parts
        plan = client.post("/api/uploads", json={"files": [{"name": "scan.mp4", "size": len(data)}]}, headers=headers).json()
        [f] = plan["files"]
        assert len(f["urls"]) == 2 and all(u.startswith(s3.meta.endpoint_url) and "X-Amz-Expires=3600" in u for u in f["urls"])
        parts = []
        for n, link in enumerate(f["urls"]):  # as the browser does: no console cookie, straight to S3
            reply = httpx.put(link, content=data[n * f["part_size"]:(n + 1) * f["part_size"]])
            assert reply.status_code == 200, reply.text
            parts.append({"part": n + 1, "etag": reply.headers["etag"]})
        assert client.post("/api/uploads/complete", json={"key": f["key"], "upload_id": f["upload_id"], "parts": parts},
                           headers=headers).status_code == 200
        assert s3.get_object(Bucket="codsplat-data", Key=f["key"])["Body"].read() == data
        reply = client.post("/api/jobs", json={"input": plan["input"], "settings": {"preset": "tiny"}}, headers=headers)
        assert reply.status_code == 201, reply.text
        key = f"jobs/console/{reply.json()['id']}.json"
        assert json.loads(s3.get_object(Bucket="codsplat-data", Key=key)["Body"].read())["input"] == plan["input"]
        assert s3.meta.endpoint_url in client.get("/").headers["content-security-policy"]


def test_allowed_host_and_secure_cookies_from_the_command_line(tmp_path):
    """`codsplat console --allowed-host NAME --secure-cookies`, as behind a load balancer with HTTPS:
    only that Host is answered (the loopback names are not added), and the session cookie is Secure."""
    from servers import free_port, start

    port = free_port()
    server = start("console-hosts", [sys.executable, "-m", "codsplat.orchestrator.cli", "console", "--embedded",
                                     str(tmp_path / "home"), "--no-daemon", "--port", str(port),
                                     "--allowed-host", "Splats.Example.org", "--secure-cookies"],
                   f"http://127.0.0.1:{port}", "/health", env={"CODSPLAT_CONSOLE_TOKEN": TOKEN})
    try:
        url, named = server.url, {"Host": "splats.example.org"}
        assert httpx.get(url + "/login", headers=named).status_code == 200
        for other in (f"127.0.0.1:{port}", f"localhost:{port}", "evil.example"):
            reply = httpx.get(url + "/login", headers={"Host": other})
            assert reply.status_code == 400 and "does not serve that host name" in reply.text, other
        login = httpx.post(url + "/login", data={"token": TOKEN, "next": "/"}, headers=named)
        assert login.status_code == 303
        cookie = login.headers["set-cookie"].lower()
        assert "; secure" in cookie and "httponly" in cookie
        wrong = httpx.post(url + "/login", data={"token": "nope", "next": "/"}, headers=named)
        assert "set-cookie" not in wrong.headers
    finally:
        server.stop()


def test_a_session_ends_when_it_expires(home, monkeypatch):
    """The server refuses a session cookie older than `session_seconds`, whatever the browser sends
    (the cookie goes in by hand: a client's jar would drop it at its max-age on its own)."""
    from codsplat.orchestrator.console.auth import SESSION_COOKIE

    guard = Guard(token=TOKEN, allowed_hosts=frozenset({"testserver"}), session_seconds=60)
    with TestClient(build_console(Settings(), guard, home)) as c:
        headers = logged_in(c)
        session = c.cookies[SESSION_COOKIE]
        c.cookies.clear()
        sent = {**headers, "Cookie": f"{SESSION_COOKIE}={session}"}
        assert c.get("/api/jobs", headers=sent).status_code == 200
        later = time.time() + 61
        monkeypatch.setattr(time, "time", lambda: later)  # a minute on: the session is too old
        reply = c.get("/api/jobs", headers=sent)
        assert reply.status_code == 401
        assert c.get("/", headers={"Cookie": f"{SESSION_COOKIE}={session}"}, follow_redirects=False).headers["location"].startswith("/login")


def test_the_login_limit_keys_on_the_peer_unless_an_operator_named_proxy_says_otherwise(tmp_path):
    """A guesser who changes X-Forwarded-For on every try is still one peer: its sixth wrong token waits,
    and so does the right one. Behind `--trusted-proxy 127.0.0.1` the header names the client, so two
    clients behind the proxy are limited apart."""
    from servers import free_port, start

    def console(*extra: str):
        port = free_port()
        return start(f"console-login-{port}", [sys.executable, "-m", "codsplat.orchestrator.cli", "console", "--embedded",
                                               str(tmp_path / "home"), "--no-daemon", "--port", str(port), *extra],
                     f"http://127.0.0.1:{port}", "/health", env={"CODSPLAT_CONSOLE_TOKEN": TOKEN})

    def login(url: str, token: str, forwarded: str) -> int:
        return httpx.post(url + "/login", data={"token": token, "next": "/"}, headers={"X-Forwarded-For": forwarded}).status_code

    server = console()
    try:
        assert [login(server.url, "nope", f"203.0.113.{i}") for i in range(6)] == [401] * 5 + [429]
        assert login(server.url, TOKEN, "198.51.100.7") == 429  # the lockout holds for the right token too
    finally:
        server.stop()
    server = console("--trusted-proxy", "127.0.0.1")
    try:
        assert [login(server.url, "nope", "203.0.113.1") for _ in range(6)] == [401] * 5 + [429]
        assert login(server.url, TOKEN, "203.0.113.2") == 303  # another client behind the proxy
    finally:
        server.stop()


def test_wrong_tokens_from_many_addresses_spend_one_budget(monkeypatch):
    """Guesses spread over many addresses (a botnet, or a proxy that passes any header on) stop once
    LOGIN_BUDGET of them failed within the window: every address then waits."""
    from codsplat.orchestrator.console import auth

    monkeypatch.setattr(auth, "LOGIN_BUDGET", 8)
    guard = auth.Guard(token=TOKEN)
    for i in range(7):
        assert guard.login_wait(f"10.0.0.{i}") == 0
        guard.login_failed(f"10.0.0.{i}")
    assert guard.login_wait("10.0.0.99") == 0
    guard.login_failed("10.0.0.99")
    assert guard.login_wait("10.0.1.1") > 55 and guard.login_wait("10.0.0.3") > 55


def test_a_part_sent_twice_at_once_lands_whole_and_complete_checks_each_etag(home):
    """Ten PUTs of one part at once (a browser's retry racing its first try) each land whole: the
    last one wins and none is a 500. `complete` refuses an ETag the upload never answered, as S3 does."""
    import asyncio

    from codsplat.orchestrator.console.uploads import FolderUploads
    from codsplat.pipeline.errors import InputError

    home.mkdir(exist_ok=True)
    uploads = FolderUploads(home, lambda path, seconds: path)
    plan = uploads.start("uploads/console/t/clip.mp4", 5)

    async def send(payload: bytes):
        async def chunks():
            for i in range(0, len(payload), 2):
                await asyncio.sleep(0)  # the other sends interleave between chunks
                yield payload[i:i + 2]
        return await uploads.receive_part(plan["upload_id"], 1, chunks())

    async def all_at_once():
        return await asyncio.gather(*(send(b"%05d" % n) for n in range(10)))

    etags = asyncio.run(all_at_once())
    stored = (home / ".uploads" / plan["upload_id"] / "00001.part").read_bytes()
    assert stored in {b"%05d" % n for n in range(10)} and len(set(etags)) == 10
    with pytest.raises(InputError, match="part 1's ETag is not the one its upload answered with"):
        uploads.complete(plan["key"], plan["upload_id"], [{"part": 1, "etag": '"0123456789abcdef0123456789abcdef"'}])
    right = etags[[b"%05d" % n for n in range(10)].index(stored)]
    uploads.complete(plan["key"], plan["upload_id"], [{"part": 1, "etag": right}])
    assert (home / "uploads" / "console" / "t" / "clip.mp4").read_bytes() == stored
