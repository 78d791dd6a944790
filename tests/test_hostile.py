"""The hostile-input corpus (tests/hostile/): job documents, console requests and media, each case
with its expected outcome. For every case: no traceback and no 500; nothing written outside the
embedded folder (the tree around it is compared before and after); the daemon is still up and
takes the next good job; every document ends as a record (or is not a document at all)."""

import json
import logging
import os
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml

from codsplat.orchestrator.backends import build_daemon
from codsplat.orchestrator.job import job_id_from_key
from codsplat.orchestrator.records import TERMINAL, SQLiteStore
from codsplat.orchestrator.settings import Settings
from codsplat.pipeline.config import build_config
from codsplat.pipeline.errors import PipelineError
from codsplat.pipeline.run import run_pipeline

HERE = Path(__file__).with_name("hostile")
sys.path.insert(0, str(HERE))
import generate  # noqa: E402

DOCUMENTS = yaml.safe_load((HERE / "documents.yaml").read_text())
CONSOLE = yaml.safe_load((HERE / "console.yaml").read_text())
MEDIA = yaml.safe_load((HERE / "media.yaml").read_text())
STUB = f"{sys.executable},{Path(__file__).with_name('stub_worker.py')}"


def test_the_corpus_has_eighty_cases_across_three_doors():
    assert len(DOCUMENTS) + len(CONSOLE) + len(MEDIA) >= 80 and min(len(DOCUMENTS), len(CONSOLE), len(MEDIA)) >= 15
    for case in DOCUMENTS + CONSOLE + MEDIA:
        assert case.get("outcome"), case["name"]
    assert len({c["name"] for c in DOCUMENTS + CONSOLE + MEDIA}) == len(DOCUMENTS) + len(CONSOLE) + len(MEDIA)


def tree(root: Path, skip: Path) -> dict[str, int]:
    """Every path under `root` but `skip`, with its size (links as links)."""
    out = {}
    for folder, dirs, files in os.walk(root):
        if Path(folder) == skip or skip in Path(folder).parents:
            dirs[:] = []
            continue
        for name in dirs + files:
            path = Path(folder) / name
            if path != skip:
                out[str(path)] = path.lstat().st_size if not path.is_dir() or path.is_symlink() else -1
    return out


class Tracebacks(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.seen: list[str] = []

    def emit(self, record):
        if record.exc_info:
            self.seen.append(f"{record.name}: {record.getMessage()}")


# ------------------------------------------------------------------ door 1: job documents


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    home, outside = root / "home", root / "outside"
    outside.mkdir()
    (outside / "sentinel.txt").write_text("untouched")
    for folder in ("uploads", "uploads/alice", "jobs"):
        (home / folder).mkdir(parents=True, exist_ok=True)
        (home / folder / "clip.mp4").write_bytes(b"\0" * 64) if folder != "jobs" else None
    before = tree(root, home)
    watcher = Tracebacks()
    logging.getLogger("codsplat").addHandler(watcher)
    daemon = build_daemon(Settings(media_wait_seconds=1.0, local_worker=STUB.split(",")), home)
    thread = threading.Thread(target=daemon.serve, kwargs={"install_signals": False}, daemon=True)
    thread.start()
    store = SQLiteStore(home / "codsplat.db")
    try:
        first = [c for c in DOCUMENTS if "after" not in c]
        for case in first:
            generate.document(home, case)
        settle(store, first)
        later = [c for c in DOCUMENTS if "after" in c]
        for case in later:
            generate.document(home, case)
        settle(store, later)
        # still up, and it takes the next good job
        (home / "jobs" / "next-good-job.json").write_text(json.dumps(generate.BASE))
        settle(store, [{"name": "next-good-job", "expect": {"state": "SUCCEEDED"}}])
        alive = thread.is_alive()
    finally:
        daemon.stop()
        thread.join(timeout=60)
        logging.getLogger("codsplat").removeHandler(watcher)
    return {"home": home, "store": store, "before": before, "after": tree(root, home), "root": root,
            "alive": alive, "tracebacks": watcher.seen}


def expected_id(case) -> str:
    return case["expect"].get("id") or job_id_from_key(case.get("file", f"jobs/{case['name']}.json"))


def settle(store, cases, timeout=90):
    waiting = {expected_id(c) for c in cases if not c["expect"].get("none")}
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        for job_id in list(waiting):
            record = store.get(job_id)
            if record is not None and record.state in TERMINAL and record.notified_at:
                waiting.discard(job_id)
        time.sleep(0.2)
    assert not waiting, f"no finished record for {sorted(waiting)}"


def test_the_daemon_stays_up_writes_nothing_outside_and_logs_no_traceback(documents):
    assert documents["alive"]
    assert documents["after"] == documents["before"], "something was written outside the embedded folder"
    assert (documents["root"] / "outside" / "sentinel.txt").read_text() == "untouched"
    assert documents["tracebacks"] == []
    assert documents["store"].get("next-good-job").state == "SUCCEEDED"


@pytest.mark.parametrize("case", DOCUMENTS, ids=[c["name"] for c in DOCUMENTS])
def test_every_document_ends_as_a_record_saying_why(documents, case):
    expect = case["expect"]
    for path in case.get("outside", []):
        assert not Path(path).exists(), path
    if expect.get("none"):
        return
    record = documents["store"].get(expected_id(case))
    assert record is not None and record.state == expect["state"], record and record.error
    message = (record.error or {}).get("message", "")
    for words in expect.get("error", []):
        assert words in message, message
    if "max_error" in expect:
        assert len(message) <= expect["max_error"], len(message)
    if "notify" in expect:
        assert record.notify == expect["notify"]
    notes = list((documents["home"] / "notifications").glob(f"{record.job_id}.json"))
    assert len(notes) == 1, "one message per record"


# ------------------------------------------------------------------ door 2: the console


@pytest.fixture
def console(tmp_path):
    from starlette.testclient import TestClient

    from codsplat.orchestrator.console import build_console
    from codsplat.orchestrator.console.auth import Guard
    from codsplat.orchestrator.records import JobRecord

    home = tmp_path / "home"
    export = home / "results" / "done" / "export"
    export.mkdir(parents=True)
    (export / "metrics.json").write_text("{}")
    (export / "linked.ply").symlink_to("/etc/hostname")
    (export / "looped.ply").symlink_to("looped.ply")
    (home / "uploads").mkdir()
    (home / "uploads" / "k.mp4").write_bytes(b"v")
    (home / "jobs").mkdir()
    (home / "jobs" / "done.json").write_text(json.dumps({"version": 1, "input": "uploads/k.mp4"}))
    store = SQLiteStore(home / "codsplat.db")
    (export / "sub").symlink_to(home, target_is_directory=True)  # a link to a folder on the way
    os.link(home / "codsplat.db", export / "db.ply")  # a second name for the database
    outputs = [f"results/done/export/{n}" for n in ("metrics.json", "linked.ply", "looped.ply", "db.ply")]
    store.create(JobRecord(job_id="done", job_key="jobs/done.json", state="SUCCEEDED", result={"outputs": outputs}))
    guard = Guard(token="t0ken", allowed_hosts=frozenset({"testserver"}))
    with TestClient(build_console(Settings(), guard, home), raise_server_exceptions=False) as client:
        yield client, home, tmp_path


def send(client, case, csrf, upload):
    req = case["request"]
    fill = lambda text: (text.replace("{key}", upload["key"]).replace("{upload_id}", upload["upload_id"])  # noqa: E731
                         .replace("{long_name}", "n" * 300))
    headers = {"x-csrf-token": csrf} if csrf else {}
    for name, value in (req.get("headers") or {}).items():
        headers[name] = value.encode("utf-8") if not value.isascii() else value
    kwargs = {}
    if "json" in req:
        kwargs["content"] = fill(json.dumps(req["json"])).encode()
    elif "text" in req:
        kwargs["content"] = req["text"].encode()
    elif "latin1" in req:
        kwargs["content"] = req["latin1"].encode("latin-1")
    elif "repeat_text" in req:
        kwargs["content"] = (req["repeat_text"] * req["times"]).encode()
    elif "deep" in req:
        kwargs["content"] = ('{"settings": ' + "[" * req["deep"] + "]" * req["deep"] + "}").encode()
    elif "many_files" in req:
        kwargs["content"] = json.dumps({"files": [{"name": f"p{i}.jpg", "size": 5} for i in range(req["many_files"])]}).encode()
    elif "parts_repeated" in req:
        kwargs["content"] = json.dumps({"key": upload["key"], "upload_id": upload["upload_id"],
                                        "parts": [{"part": 1, "etag": "x"}] * req["parts_repeated"]}).encode()
    elif "form" in req:
        kwargs["data"] = req["form"]
    elif "chunked" in req:  # no Content-Length: httpx sends a generator's bytes chunked
        kwargs["content"] = (b"x" * 65536 for _ in range(req["chunked"]))
    elif "multipart" in req:
        kwargs["files"] = {name: (None, value) for name, value in req["multipart"].items()}
    if "content" in kwargs:
        headers.setdefault("content-type", "application/json")
    if "cookie" in {h.lower() for h in headers}:
        client.cookies.clear()
    return client.request(req["method"], fill(req["path"]), headers=headers, follow_redirects=False, **kwargs)


@pytest.mark.parametrize("case", CONSOLE, ids=[c["name"] for c in CONSOLE])
def test_every_console_request_gets_a_clear_answer(console, case):
    import re

    client, home, root = console
    before = tree(root, home)
    client.post("/login", data={"token": "t0ken", "next": "/"})
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', client.get("/").text).group(1)
    plan = client.post("/api/uploads", json={"files": [{"name": "a.mp4", "size": 5}]}, headers={"x-csrf-token": csrf})
    upload = plan.json()["files"][0]
    if case.get("logout_first"):
        session = client.cookies.get("codsplat_session")
        client.post("/logout", headers={"x-csrf-token": csrf})
        client.cookies.set("codsplat_session", session)  # a copied cookie, replayed after logout
    if case.get("anonymous"):
        client.cookies.clear()
        csrf = None
    for _ in range(case.get("repeat", 1)):
        reply = send(client, case, csrf, upload)
    expect = case["expect"]
    assert reply.status_code == expect["status"], reply.text[:500]
    assert reply.status_code < 500
    if expect.get("error"):
        error = reply.json()["error"]
        assert all(words in error for words in expect["error"]), error
    for words in expect.get("text", []):
        assert words in reply.text
    if "key_prefix" in expect:
        assert all(f["key"].startswith(expect["key_prefix"]) and ".." not in f["key"] for f in reply.json()["files"])
    assert tree(root, home) == before, "something was written outside the embedded folder"


# ------------------------------------------------------------------ door 3: media


@pytest.mark.parametrize("case", MEDIA, ids=[c["name"] for c in MEDIA])
def test_every_capture_is_refused_with_a_sentence_or_read_within_bounds(tmp_path, sample_video, case):
    capture = generate.media(tmp_path / "capture", case["make"], sample_video)
    work = tmp_path / "work"
    before = tree(tmp_path, tmp_path / "work")
    settings = {"frames": {"max": case.get("frames_max", 10)}}
    if "max_rss_mb" in case:  # in a process of its own, whose peak resident memory is the stage's
        code = ("import json, sys\nfrom pathlib import Path\nfrom codsplat.pipeline.config import build_config\n"
                "from codsplat.pipeline.errors import PipelineError\nfrom codsplat.pipeline.run import run_pipeline\n"
                "from codsplat.pipeline.stages import process_peak_rss\n"
                "try:\n    run_pipeline(Path(sys.argv[1]), Path(sys.argv[2]), build_config(json.loads(sys.argv[3])), stage='frames')\n"
                "    error = None\nexcept PipelineError as exc:\n    error = str(exc)\n"
                "print(json.dumps({'error': error, 'rss_mb': process_peak_rss() / 2**20,\n"
                "                  'torch': 'torch' in sys.modules}))\n")
        proc = subprocess.run([sys.executable, "-c", code, capture, work, json.dumps(settings)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        ran = json.loads(proc.stdout.splitlines()[-1])
        error, peak = ran["error"], None
        assert ran["rss_mb"] < case["max_rss_mb"], f"peak RSS {ran['rss_mb']:.0f} MB, torch loaded: {ran['torch']}"
        assert not ran["torch"], "the frames stage loaded torch (half a gigabyte it never uses)"
    else:
        tracemalloc.start()
        try:
            run_pipeline(capture, work, build_config(settings), stage="frames")
            error = None
        except PipelineError as exc:  # anything else is a traceback: the test fails on it
            error = str(exc)
        finally:
            peak = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
    if "error" in case:
        assert error and all(words in error for words in case["error"]), error
    elif case.get("error_or_kept"):
        assert error is None or "video" in error or "frame" in error, error
    else:
        assert error is None, error
        frames = json.loads((work / "frames" / "frames.json").read_text())
        assert len(frames["frames"]) == case["kept"]
        if "skipped_reason" in case:
            assert any(case["skipped_reason"] in r["reason"] for r in frames["rejected"]), frames["rejected"]
        for source in case.get("not_sources", []):
            assert all(source not in r["source"] for r in frames["frames"] + frames["rejected"])
    if "max_python_mb" in case:
        assert peak < case["max_python_mb"], f"{peak:.0f} MB"
    assert tree(tmp_path, tmp_path / "work") == before  # nothing beside the capture and the work folder
    for name in case.get("outside", []):
        assert not list(tmp_path.rglob(name)) or all(work in p.parents for p in tmp_path.rglob(name))


# ------------------------------------------------------------------ door 4: the embedded folder itself


@pytest.mark.parametrize("planted", ["notifications", "daemon.lock", ".uploads", "uploads/console"])
def test_a_link_planted_in_the_embedded_folder_is_never_written_through(tmp_path, planted):
    """A link where the daemon or the console writes its own files (messages, its lock, upload parts,
    the joined upload) is refused with a sentence naming it, and nothing is written where it leads."""
    import re

    from starlette.testclient import TestClient

    from codsplat.orchestrator.console import build_console
    from codsplat.orchestrator.console.auth import Guard
    from codsplat.pipeline.errors import InputError

    home, outside = tmp_path / "home", tmp_path / "outside"
    (home / "uploads").mkdir(parents=True)
    outside.mkdir()
    (outside / "victim").write_text("untouched")
    (outside / "old").mkdir()  # what clearing abandoned uploads would remove, were it followed there
    os.utime(outside / "old", (time.time() - 3 * 86400,) * 2)
    (home / planted).symlink_to(outside / "victim" if planted == "daemon.lock" else outside)
    before = tree(tmp_path, home)
    if planted in ("notifications", "daemon.lock"):
        with pytest.raises(InputError, match=re.escape(planted)):
            build_daemon(Settings(), home)
    else:
        guard = Guard(token="t0ken", allowed_hosts=frozenset({"testserver"}))
        with TestClient(build_console(Settings(), guard, home), raise_server_exceptions=False) as client:
            client.post("/login", data={"token": "t0ken", "next": "/"})
            csrf = re.search(r'name="csrf-token" content="([^"]+)"', client.get("/").text).group(1)
            plan = client.post("/api/uploads", json={"files": [{"name": "a.mp4", "size": 5}]}, headers={"x-csrf-token": csrf})
            if planted == ".uploads":
                assert plan.status_code == 422 and ".uploads" in plan.json()["error"] and "link" in plan.json()["error"]
            else:
                upload = plan.json()["files"][0]
                assert client.put(upload["urls"][0], content=b"media").status_code == 200
                done = client.post("/api/uploads/complete", headers={"x-csrf-token": csrf}, json={
                    "key": upload["key"], "upload_id": upload["upload_id"], "parts": [{"part": 1, "etag": "x"}]})
                assert done.status_code == 422 and "console is a link" in done.json()["error"], done.text
    assert tree(tmp_path, home) == before and (outside / "victim").read_text() == "untouched"
