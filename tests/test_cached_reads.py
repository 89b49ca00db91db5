"""Reading an image on the event loop only when the kernel has it in memory, only on local disks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from appliance.core import cached_reads
from appliance.core.cached_reads import filesystem_type, on_local_disk, read_if_cached

from .helpers import InstantGenerator, bearer

URL = "/api/playground/images"

MOUNTINFO = """\
22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p1 rw
30 22 0:26 / /tmp rw,nosuid,nodev shared:5 - tmpfs tmpfs rw
41 22 0:40 / /srv/shared rw,relatime shared:20 - nfs4 fileserver:/export rw,vers=4.2
42 41 259:2 / /srv/shared/local\\040copy rw,relatime shared:21 - xfs /dev/nvme1n1 rw
"""


@pytest.fixture
def mountinfo(tmp_path) -> Path:
    path = tmp_path / "mountinfo"
    path.write_text(MOUNTINFO)
    return path


@pytest.mark.parametrize(("folder", "kind", "local"), [
    ("/var/lib/ai-media-maker/images", "ext4", True),
    ("/tmp/images", "tmpfs", True),
    ("/srv/shared/images", "nfs4", False),
    ("/srv/shared", "nfs4", False),
    # A name that only starts like a mount point is not under it.
    ("/srv/sharedness/images", "ext4", True),
    # The longest mount point that holds it, its name unescaped.
    ("/srv/shared/local copy/images", "xfs", True),
])
def test_the_filesystem_of_a_folder_is_that_of_its_longest_mount_point(mountinfo, folder, kind,
                                                                      local):
    assert filesystem_type(Path(folder), mountinfo) == kind
    assert on_local_disk(Path(folder), mountinfo) is local


def test_a_system_that_does_not_say_counts_as_not_local(tmp_path):
    assert filesystem_type(tmp_path, tmp_path / "no-mountinfo") is None
    assert not on_local_disk(tmp_path, tmp_path / "no-mountinfo")


def test_a_file_in_memory_is_read_whole(tmp_path):
    path = tmp_path / "image.png"
    content = os.urandom(300_000)
    path.write_bytes(content)
    assert read_if_cached(path) == content
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert read_if_cached(empty) == b""


def test_a_file_whose_pages_left_memory_is_left_to_a_thread(tmp_path):
    if filesystem_type(tmp_path) in {"tmpfs", "ramfs"}:
        pytest.skip("a file in memory-backed storage never leaves memory")
    path = tmp_path / "image.png"
    content = os.urandom(300_000)
    path.write_bytes(content)
    fd = os.open(path, os.O_RDONLY)
    try:
        # Written to the disk, then its clean pages dropped from the cache.
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    assert read_if_cached(path) is None
    # A plain read brings it back, and then it is read whole.
    assert path.read_bytes() == content
    assert read_if_cached(path) == content


def test_a_large_file_is_left_to_a_thread(tmp_path, monkeypatch):
    monkeypatch.setattr(cached_reads, "MOST_BYTES", 1000)
    path = tmp_path / "large.png"
    path.write_bytes(b"x" * 1001)
    assert read_if_cached(path) is None
    path.write_bytes(b"x" * 1000)
    assert read_if_cached(path) == b"x" * 1000


def test_a_missing_file_is_an_error_as_for_any_read(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_if_cached(tmp_path / "gone.png")


def test_an_image_is_downloaded_alike_from_memory_or_from_a_thread(make_client):
    client = make_client(load_generator=InstantGenerator)
    key = client.key(client.account())
    job_id = client.http.post(URL, json={"prompts": ["a"]}, headers=bearer(key)).json()["jobId"]
    url = client.wait_for_job(key, job_id)["images"][0]["url"]
    jobs = client.services.jobs
    on_disk = (jobs.images_dir / job_id / "0.png").read_bytes()
    assert jobs.images_on_local_disk  # the tests' temporary folder is on this machine
    assert client.http.get(url, headers=bearer(key)).content == on_disk
    # As on a shared folder (NFS): always read on a thread.
    jobs.images_on_local_disk = False
    answer = client.http.get(url, headers=bearer(key))
    assert answer.status_code == 200
    assert answer.content == on_disk
