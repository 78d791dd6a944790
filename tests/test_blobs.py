"""The blob stores' one contract, on both of them: S3 (moto's server) and a local folder (embedded
mode). The daemon reads and writes through this contract alone, so what holds for one must hold for
the other; and a key never reaches outside the bucket prefix or folder it names."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import httpx
import pytest

from codsplat.orchestrator.blobs import (MAX_LINK_SECONDS, FolderBlobs, Refused, S3Blobs, inside, open_beneath,
                                         walk_beneath)


@pytest.fixture(params=["s3", "folder"])
def blobs(request, tmp_path):
    if request.param == "folder":
        return FolderBlobs(tmp_path / "home")
    s3 = request.getfixturevalue("s3")
    bucket = f"blobs-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    return S3Blobs(s3, bucket)


def test_an_object_reads_back_whole_in_part_and_by_its_head(blobs):
    blobs.write("jobs/a.json", b"0123456789")
    assert blobs.exists("jobs/a.json") and blobs.size("jobs/a.json") == 10
    assert blobs.read("jobs/a.json") == b"0123456789"
    assert blobs.read("jobs/a.json", limit=3) == b"012"
    assert blobs.head("jobs/a.json", 4) == (b"0123", 10)
    assert blobs.head("jobs/a.json", 100) == (b"0123456789", 10)
    blobs.write("jobs/a.json", b"xy")  # written again: replaced whole
    assert blobs.read("jobs/a.json") == b"xy" and blobs.head("jobs/a.json", 1) == (b"x", 2)


def test_an_empty_object_and_a_missing_one_are_told_apart(blobs):
    blobs.write("jobs/empty.json", b"")
    assert blobs.exists("jobs/empty.json") and blobs.size("jobs/empty.json") == 0
    assert blobs.head("jobs/empty.json", 8) == (b"", 0)
    assert not blobs.exists("jobs/none.json")
    assert blobs.size("jobs/none.json") is None and blobs.head("jobs/none.json", 8) is None


def test_create_writes_only_where_nothing_is_yet(blobs):
    assert blobs.create("uploads/u/media.mp4", b"first") is True
    assert blobs.create("uploads/u/media.mp4", b"second") is False
    assert blobs.read("uploads/u/media.mp4") == b"first"


def test_listing_counts_and_prefixes_see_only_what_is_under_the_prefix(blobs):
    for key, data in {"a/1": b"abc", "a/b/2": b"defgh", "a/b/3": b"ij", "ab/4": b"k", "c/5": b"l"}.items():
        blobs.write(key, data)
    assert sorted(blobs.list("a/")) == ["a/1", "a/b/2", "a/b/3"]
    assert blobs.list("z/") == [] and sorted(blobs.list("a/b/")) == ["a/b/2", "a/b/3"]
    assert blobs.exists_prefix("a/b/") and not blobs.exists_prefix("z/")
    assert blobs.usage("a/", 10) == (3, 10)
    assert blobs.usage("a/", 3) == (3, 10)  # `most` objects exactly: all counted, not over
    count, total = blobs.usage("a/", 1)  # over `most`: counting stops at most + 1
    assert count == 2 and 2 <= total <= 8
    assert blobs.usage("z/", 5) == (0, 0)


def test_copy_prefix_copies_every_object_to_the_new_prefix_and_keeps_the_old(blobs):
    blobs.write("results/j/a-1/splat.ply", b"ply")
    blobs.write("results/j/a-1/previews/v.png", b"png")
    copied = blobs.copy_prefix("results/j/a-1/", "results/k/")
    assert sorted(copied) == ["results/k/previews/v.png", "results/k/splat.ply"]
    assert blobs.read("results/k/splat.ply") == b"ply" and blobs.read("results/k/previews/v.png") == b"png"
    assert blobs.read("results/j/a-1/splat.ply") == b"ply"
    assert blobs.copy_prefix("results/none/", "results/m/") == [] and not blobs.exists_prefix("results/m/")


def test_a_folder_uploaded_downloads_as_it_was_again_and_again(blobs, tmp_path):
    src = tmp_path / "out"
    (src / "previews" / "deep").mkdir(parents=True)
    (src / "splat.ply").write_bytes(b"ply")
    (src / "previews" / "deep" / "v.png").write_bytes(b"png")
    keys = blobs.upload_dir(src, "results/j/")
    assert sorted(keys) == ["results/j/previews/deep/v.png", "results/j/splat.ply"]
    (src / "splat.ply").write_bytes(b"ply, trained longer")
    assert sorted(blobs.upload_dir(src, "results/j/")) == sorted(keys)  # uploaded again over the first
    for _ in range(2):  # downloaded twice into the same folder, which need not exist yet
        got = blobs.download("results/j/", tmp_path / "new" / "dl")
        assert (got / "splat.ply").read_bytes() == b"ply, trained longer"
        assert (got / "previews" / "deep" / "v.png").read_bytes() == b"png"
    one = blobs.download("results/j/splat.ply", tmp_path / "one")
    assert one.name == "splat.ply" and one.read_bytes() == b"ply, trained longer"


def test_s3_never_downloads_an_object_to_outside_the_folder_given(s3, tmp_path):
    bucket = f"blobs-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    blobs = S3Blobs(s3, bucket)
    blobs.write("uploads/u/../../escaped.txt", b"x")
    with pytest.raises(Refused, match="outside"):
        blobs.download("uploads/u/", tmp_path / "dl")
    assert not (tmp_path / "escaped.txt").exists() and not list(tmp_path.rglob("escaped.txt"))
    # a `..` that would land inside is refused too: S3 holds `v/../a` and `a` as two objects, one file here
    blobs.write("uploads/v/a", b"a")
    blobs.write("uploads/v/sub/../a", b"not a")
    with pytest.raises(Refused):
        blobs.download("uploads/v/", tmp_path / "dl2")


def test_s3_links_open_the_object_and_never_outlive_sigv4s_seven_days(s3, moto_server):
    from codsplat.orchestrator.backends import aws_client
    from codsplat.orchestrator.settings import Settings

    bucket = f"blobs-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    blobs = S3Blobs(aws_client(Settings(aws_endpoint=moto_server.url), "s3"), bucket)  # the daemon's own client
    blobs.write("results/j/splat.ply", b"ply")
    for asked, given in ((60, 60), (MAX_LINK_SECONDS, MAX_LINK_SECONDS), (30 * 24 * 3600, MAX_LINK_SECONDS)):
        url = blobs.link("results/j/splat.ply", asked)
        assert parse_qs(urlparse(url).query)["X-Amz-Expires"] == [str(given)]
    assert httpx.get(blobs.link("results/j/splat.ply", 60)).content == b"ply"
    assert blobs.uri("results/j/splat.ply") == f"s3://{bucket}/results/j/splat.ply"
    assert blobs.local_path("results/j/splat.ply") is None
    assert MAX_LINK_SECONDS == 7 * 24 * 3600


def test_a_folder_names_its_files_in_place(tmp_path):
    blobs = FolderBlobs(tmp_path)
    blobs.write("results/j/splat.ply", b"ply")
    path = tmp_path.resolve() / "results" / "j" / "splat.ply"
    assert blobs.local_path("results/j/splat.ply") == path and blobs.uri("results/j/splat.ply") == str(path)
    assert blobs.link("results/j/splat.ply", 60) == path.as_uri()
    assert blobs.download("results/j/", tmp_path / "elsewhere") == path.parent  # read in place, not copied
    assert not (tmp_path / "elsewhere").exists()
    assert blobs.upload_dir(path.parent, "results/j/") == ["results/j/splat.ply"]  # itself: nothing to copy
    assert list(path.parent.parent.iterdir()) == [path.parent]
    assert [p.name for p in path.parent.iterdir()] == ["splat.ply"]  # written whole: no part file left behind


def test_a_folder_refuses_every_key_that_leads_outside_it(tmp_path):
    home, outside = tmp_path / "home", tmp_path / "outside"
    home.mkdir(), outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    (home / "uploads").mkdir()
    (home / "uploads" / "out").symlink_to(outside)
    (home / "uploads" / "secret").symlink_to(outside / "secret")
    blobs = FolderBlobs(home)
    for key in ("../outside/secret", "uploads/out/secret", "uploads/secret", "/etc/passwd"):
        with pytest.raises(Refused):
            blobs.read(key)
        with pytest.raises(Refused):
            blobs.write(key, b"x")
        with pytest.raises(Refused):
            blobs.size(key)
        assert blobs.exists(key) is False
    assert (outside / "secret").read_bytes() == b"secret" and sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert blobs.exists("uploads/" + "n" * 300) is False  # a name the disk refuses names nothing
    assert blobs.exists_prefix("../outside/") is False and blobs.exists_prefix("uploads/") is False  # links not counted
    assert blobs.list("uploads/") == [] and blobs.usage("uploads/", 5) == (0, 0)
    for i in range(20):  # beside the links, the files that are there are all counted
        (home / "uploads" / f"f{i:02d}").write_bytes(b"x" * i)
    assert blobs.usage("uploads/", 100) == (20, sum(range(20)))
    assert sorted(blobs.list("uploads/")) == [f"uploads/f{i:02d}" for i in range(20)]
    with pytest.raises(Refused, match="not a plain file"):
        blobs.size("uploads")


def test_a_link_loop_or_a_nul_resolves_to_nothing_not_to_a_traceback(tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(Refused, match="cannot be resolved"):
        inside(tmp_path, tmp_path / "loop")
    with pytest.raises(Refused, match="cannot be resolved"):
        inside(tmp_path, tmp_path / "a\0b")
    assert inside(tmp_path, tmp_path) == tmp_path.resolve()
    with pytest.raises(Refused, match="leads outside"):
        inside(tmp_path / "a", tmp_path / "ab")  # a sibling whose name starts the same is not inside


def test_opening_beneath_a_folder_follows_no_link_on_the_way_or_at_the_end(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "a").mkdir(parents=True), outside.mkdir()
    (root / "a" / "file").write_bytes(b"in")
    (root / "a" / "out").symlink_to(outside)
    (root / "a" / "last").symlink_to(outside / "target")
    descriptors = len(os.listdir("/proc/self/fd"))
    fd = open_beneath(root, "a/file")
    with os.fdopen(fd, "rb") as fh:
        assert fh.read() == b"in"
    for rel, says in (("a/out/x", "a link"), ("a/file/x", "not a folder"), ("a/../a/file", "not a path beneath"),
                      ("a/last", "is a link"), ("a/", "not a file name"), ("a/..", "not a file name")):
        with pytest.raises(Refused, match=says):
            os.close(open_beneath(root, rel, os.O_WRONLY | os.O_CREAT))
    assert list(outside.iterdir()) == []  # nothing was made where a link led
    with pytest.raises(FileNotFoundError):
        open_beneath(root, "b/new")  # without O_CREAT no folder is made
    assert not (root / "b").exists()
    os.close(open_beneath(root, "b/c/new", os.O_WRONLY | os.O_CREAT))
    assert (root / "b" / "c" / "new").is_file()
    with pytest.raises(FileNotFoundError):
        walk_beneath(root, "d/e")  # a folder is made only when asked
    assert not (root / "d").exists()
    with pytest.raises(NotADirectoryError):
        walk_beneath(root / "a" / "file", "")  # the root itself must be a folder
    fd = walk_beneath(root, "")
    try:
        assert sorted(os.listdir(fd)) == ["a", "b"]
    finally:
        os.close(fd)
    with pytest.raises(Refused, match="a link"):
        walk_beneath(root, "a/out", create=True)
    assert len(os.listdir("/proc/self/fd")) == descriptors  # every folder opened on the way is closed, refused or not


def test_s3_errors_other_than_missing_are_raised_not_taken_for_absence(s3):
    from botocore.exceptions import ClientError

    blobs = S3Blobs(s3, f"no-such-bucket-{uuid.uuid4().hex[:8]}")
    for call in (lambda: blobs.read("k"), lambda: blobs.create("k", b"x"), lambda: blobs.write("k", b"x")):
        with pytest.raises(ClientError):
            call()
