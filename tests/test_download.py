"""The OASIS-1 download path of dataset.py against a local HTTP server that serves a miniature disc archive:
extraction of the masked_gfc volumes only, resume with HTTP Range after a cut, checksums, HTTP errors, retries,
archives that are not gzip, --delete-archives, and the command line; and failures that no retry can fix (no
network, a refused connection, 4xx), which must fail at once."""

from __future__ import annotations

import hashlib
import io
import re
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

import cli
import dataset
from conftest import PROJECT_ROOT, analyze_bytes, make_volume, subprocess_env
from hyperparameters import make_config

DISC1 = "oasis_cross-sectional_disc1.tar.gz"
DISC2 = "oasis_cross-sectional_disc2.tar.gz"
T88 = "{session}/PROCESSED/MPRAGE/T88_111/{session}_mpr_n{n}_anon_111_t88_{kind}.{ext}"
SESSIONS = {"OAS1_0001_MR1": 4, "OAS1_0002_MR1": 4, "OAS1_0003_MR1": 3}  # session -> n of the mpr_nN name
EXPECTED = sorted(f"{session}_mpr_n{n}_anon_111_t88_masked_gfc.{ext}" for session, n in SESSIONS.items()
                  for ext in ("hdr", "img"))


# ---------------------------------------------------------------------------------------------------------------
# A miniature OASIS-1 disc archive
# ---------------------------------------------------------------------------------------------------------------

def build_archive(disc: int = 1, sessions: dict[str, int] = SESSIONS, decoys: bool = True,
                  padding: int = 0) -> bytes:
    """A .tar.gz laid out like the official disc: the masked_gfc T88 volume of each session (Analyze 7.5, int16
    big-endian), plus decoys that must not be extracted (RAW, FSL_SEG, the non-masked t88_gfc, a text file,
    and links that match the volume pattern). `padding` adds an incompressible RAW decoy of that many bytes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        def add(name: str, payload: bytes) -> None:
            info = tarfile.TarInfo(f"disc{disc}/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

        for number, (session, n) in enumerate(sessions.items()):
            hdr, img = analyze_bytes(make_volume(seed=number))
            add(T88.format(session=session, n=n, kind="masked_gfc", ext="hdr"), hdr)
            add(T88.format(session=session, n=n, kind="masked_gfc", ext="img"), img)
            if decoys:
                decoy_hdr, decoy_img = analyze_bytes(make_volume(seed=100 + number, fill=0.9))
                for ext, payload in (("hdr", decoy_hdr), ("img", decoy_img)):
                    add(T88.format(session=session, n=n, kind="gfc", ext=ext), payload)
                    add(f"{session}/RAW/{session}_mpr-1_anon.{ext}", payload)
                    add(f"{session}/FSL_SEG/{session}_mpr_n{n}_anon_111_t88_masked_gfc_fseg.{ext}", payload)
                    add(f"{session}/PROCESSED/MPRAGE/SUBJ_111/{session}_mpr_n{n}_anon_sbj_111.{ext}", payload)
                add(f"{session}/{session}.txt", b"SESSION ID: " + session.encode() + b"\n")
        if decoys:  # links whose names match the pattern: never followed, never written
            for ext in ("hdr", "img"):
                link = tarfile.TarInfo(f"disc{disc}/" + T88.format(session="OAS1_0009_MR1", n=4, kind="masked_gfc",
                                                                   ext=ext))
                link.type = tarfile.SYMTYPE
                link.linkname = "/etc/passwd"
                tar.addfile(link)
        if padding:
            add("OAS1_0001_MR1/RAW/OAS1_0001_MR1_mpr-2_anon.img", np.random.default_rng(0).bytes(padding))
    return buffer.getvalue()


@pytest.fixture(scope="session")
def disc1() -> bytes:
    return build_archive(1)


@pytest.fixture(scope="session")
def big_disc1() -> bytes:
    """Over 2 MiB: download() writes 1 MiB chunks, and a cut loses the chunk in flight, so resuming needs a file
    whose first half holds at least one whole chunk (a real disc is 1.4 GB)."""
    archive = build_archive(1, padding=3 << 20)
    assert len(archive) > 3 << 20
    return archive


def md5(payload: bytes) -> str:
    return hashlib.md5(payload).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# A local HTTP server with Range support and faults
# ---------------------------------------------------------------------------------------------------------------

class FakeServer:
    """Serves `files` (name -> bytes) under http://127.0.0.1:PORT/data/ and records every request.

    Faults: `cut` (names cut mid-file on their next request: full Content-Length sent, half the bytes written,
    connection closed), `cut_always`, `statuses` (name -> queue of status codes answered before the file is
    served), `ignore_range` (answer 200 with the whole file to a Range request), `stall` (seconds to wait after the
    headers before any byte of the body, on every request). Unknown names get 404.
    """

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.log: list[tuple[str, dict[str, str]]] = []
        self.cut: set[str] = set()
        self.cut_always: set[str] = set()
        self.statuses: dict[str, list[int]] = defaultdict(list)
        self.ignore_range = False
        self.stall = 0.0
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/data/"

    def publish(self, name: str, payload: bytes, checksum: str | None = "right") -> None:
        """Serves `payload` as `name`, with a `name.md5` sidecar holding the right or a wrong digest (or none)."""
        self.files[name] = payload
        if checksum == "right":
            self.files[name + ".md5"] = f"{md5(payload)}  {name}\n".encode()
        elif checksum == "wrong":
            self.files[name + ".md5"] = f"{'0' * 32}  {name}\n".encode()

    def requests_for(self, name: str) -> list[dict[str, str]]:
        with self.lock:
            return [headers for path, headers in self.log if path == name]

    def clear_log(self) -> None:
        with self.lock:
            self.log.clear()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _make_handler(server: FakeServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # one request per connection

        def log_message(self, *args):  # keep the test output clean
            pass

        def _empty(self, code: int, **headers) -> None:
            self.send_response(code)
            for key, value in headers.items():
                self.send_header(key.replace("_", "-"), value)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self):
            prefix = "/data/"
            name = self.path.split("?")[0]
            name = name[len(prefix):] if name.startswith(prefix) else name.lstrip("/")
            with server.lock:
                server.log.append((name, {key.lower(): value for key, value in self.headers.items()}))
                status = server.statuses[name].pop(0) if server.statuses.get(name) else None
                cut = name in server.cut_always or name in server.cut
                server.cut.discard(name)
            if name not in server.files:
                self.send_error(404, "Not Found")
                return
            if status is not None:
                self._empty(status)
                return
            body = server.files[name]
            start, end = 0, len(body) - 1
            wanted = self.headers.get("Range")
            if wanted and not server.ignore_range:
                found = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted.strip())
                assert found, wanted
                start = int(found.group(1))
                end = min(int(found.group(2)), end) if found.group(2) else end
                if start >= len(body):
                    self._empty(416, Content_Range=f"bytes */{len(body)}")
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(body)}")
            else:
                self.send_response(200)
            payload = body[start:end + 1]
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if server.stall:  # not time.sleep: the `sleeps` fixture replaces it
                threading.Event().wait(server.stall)
            if cut:
                self.wfile.write(payload[: len(payload) // 2])
                self.wfile.flush()
                self.close_connection = True
                return  # the server closes the socket short of Content-Length
            self.wfile.write(payload)

    return Handler


@pytest.fixture
def server():
    fake = FakeServer()
    yield fake
    fake.close()


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """Records the download back-off instead of sleeping."""
    recorded: list[float] = []
    monkeypatch.setattr(dataset.time, "sleep", recorded.append)
    return recorded


def load_oasis(server: FakeServer, config, cache: Path, discs: str = "1", **kwargs) -> dataset.SliceSet:
    return dataset.load_slices("oasis", config, cache, oasis_url=server.url, discs=discs, progress=False,
                               workers=1, **kwargs)


def volume_dir(cache: Path) -> Path:
    return cache / "oasis1" / "volumes"


def visible_files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if not path.name.startswith("."))


def downloads(cache: Path) -> list[str]:
    folder = cache / "downloads"
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


# ---------------------------------------------------------------------------------------------------------------
# cli.parse_discs
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("1", [1]), ("12", [12]), ("1-3,7", [1, 2, 3, 7]), (" 3 , 1 ", [1, 3]), ("1-12", list(range(1, 13))),
    ("2-2", [2]), ("5,5,4-5", [4, 5]), ("1,", [1]),
])
def test_parse_discs(text, expected):
    assert cli.parse_discs(text) == expected


@pytest.mark.parametrize("text", ["0", "13", "1-13", "", "a", "1-b", "3-1", ",", "-1", "1.5"])
def test_parse_discs_rejects(text):
    with pytest.raises(cli.UserError, match="--discs"):
        cli.parse_discs(text)


# ---------------------------------------------------------------------------------------------------------------
# Checksums
# ---------------------------------------------------------------------------------------------------------------

def test_published_md5(server, disc1):
    assert dataset.published_md5(cli.OFFICIAL_OASIS_URL, DISC1) == "c83e216ef8654a7cc9e2a30a4cdbe0cc"
    assert dataset.published_md5(cli.OFFICIAL_OASIS_URL.rstrip("/"), DISC2) is None  # known, not requested
    assert server.log == []
    server.publish(DISC1, disc1)
    assert dataset.published_md5(server.url, DISC1) == md5(disc1)
    server.files[DISC1 + ".md5"] = md5(disc1).upper().encode()  # bare digest, any case
    assert dataset.published_md5(server.url.rstrip("/"), DISC1) == md5(disc1)
    server.files[DISC1 + ".md5"] = b"<html>not a digest</html>"
    assert dataset.published_md5(server.url, DISC1) is None
    assert dataset.published_md5(server.url, DISC2) is None  # 404
    assert dataset.published_md5("http://127.0.0.1:1/", DISC1, timeout=2) is None  # nothing listens


# ---------------------------------------------------------------------------------------------------------------
# Download and extraction
# ---------------------------------------------------------------------------------------------------------------

def test_clean_download_extracts_only_the_masked_volumes(server, disc1, config, cache):
    server.publish(DISC1, disc1)
    slices = load_oasis(server, config, cache)

    assert visible_files(volume_dir(cache)) == EXPECTED  # no RAW, FSL_SEG, t88_gfc, SUBJ_111, text or links
    marker = volume_dir(cache) / f".{DISC1}.extracted"
    assert sorted(marker.read_text().split()) == EXPECTED
    assert downloads(cache) == [DISC1]  # kept (no --delete-archives), no .part left
    assert (cache / "downloads" / DISC1).read_bytes() == disc1
    assert [path for path in cache.rglob("*") if path.name.endswith((".part", ".tmp"))] == []
    assert not any("passwd" in path.name for path in cache.rglob("*"))

    assert slices.images.dtype == np.float32 and slices.images.shape[1:] == (128, 128)
    assert slices.images.min() >= 0 and slices.images.max() <= 1
    assert set(slices.subjects) == {"OAS1_0001", "OAS1_0002", "OAS1_0003"}
    assert set(slices.sources) == {name for name in EXPECTED if name.endswith(".hdr")}
    assert slices.skipped == [] and slices.source == "oasis"
    assert len(slices) == 3 * 24  # the synthetic volumes' tissue-bearing slices
    assert len(server.requests_for(DISC1)) == 1 and len(server.requests_for(DISC1 + ".md5")) == 1
    assert "range" not in server.requests_for(DISC1)[0]

    # the second run reads the extraction marker and the slice cache: no HTTP request at all
    server.clear_log()
    again = load_oasis(server, config, cache)
    assert server.log == []
    assert np.array_equal(again.images, slices.images) and np.array_equal(again.splits, slices.splits)
    # even when the slice cache has to be rebuilt (other preprocessing), the archive is not fetched again
    load_oasis(server, make_config(overrides=["tissue_intensity=0.2"]), cache)
    assert server.log == []


def test_several_discs(server, disc1, config, cache):
    server.publish(DISC1, disc1)
    server.publish(DISC2, build_archive(2, {"OAS1_0042_MR1": 4}, decoys=False), checksum=None)
    slices = load_oasis(server, config, cache, discs="1-2")
    assert set(slices.subjects) == {"OAS1_0001", "OAS1_0002", "OAS1_0003", "OAS1_0042"}
    assert (volume_dir(cache) / f".{DISC2}.extracted").exists()
    assert downloads(cache) == [DISC1, DISC2]


def build_oasis2_archive(part: int, visits: list[str]) -> bytes:
    """A .tar.gz laid out like OAS2_RAW_PARTn.tar.gz: per visit RAW/mpr-1.nifti.{hdr,img} (the one wanted) and
    RAW/mpr-2.nifti.{hdr,img} (a decoy)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for number, visit in enumerate(visits):
            for scan in (1, 2):
                hdr, img = analyze_bytes(make_volume(seed=10 * part + number, fill=0.7 if scan == 1 else 0.9))
                for ext, payload in (("hdr", hdr), ("img", img)):
                    info = tarfile.TarInfo(f"OAS2_RAW_PART{part}/{visit}/RAW/mpr-{scan}.nifti.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def test_oasis2_keeps_visits_of_a_subject_together_and_apart_from_oasis1(server, disc1, config, cache):
    part1 = ["OAS2_0001_MR1", "OAS2_0001_MR2", "OAS2_0002_MR1", "OAS2_0003_MR1"]
    part2 = ["OAS2_0004_MR1", "OAS2_0004_MR2", "OAS2_0004_MR3", "OAS2_0005_MR1"]
    server.publish("OAS2_RAW_PART1.tar.gz", build_oasis2_archive(1, part1))
    server.publish("OAS2_RAW_PART2.tar.gz", build_oasis2_archive(2, part2), checksum=None)
    server.publish(DISC1, disc1)
    slices = dataset.load_slices("oasis2", config, cache, oasis_url=server.url, progress=False, workers=1)
    load_oasis(server, config, cache)

    volumes = cache / "oasis2" / "volumes"
    assert visible_files(volumes) == sorted(f"{visit}_mpr-1.nifti.{ext}" for visit in part1 + part2
                                            for ext in ("hdr", "img"))
    assert "RAW" in slices.note and "skull" in slices.note
    assert set(slices.subjects) == {f"OAS2_000{n}" for n in range(1, 6)}
    assert len(slices) == 8 * 24
    for subject in set(slices.subjects):  # every visit of a subject in one split
        assert len(set(slices.splits[slices.subjects == subject])) == 1
    assert sorted(path.name.split("-")[0] for path in (cache / "slices").glob("*.npz")) == ["oasis", "oasis2"]
    assert not any(path.name.startswith("OAS2") for path in volume_dir(cache).iterdir())


def test_resume_after_a_cut_uses_a_range_request(server, big_disc1, config, cache, sleeps):
    server.publish(DISC1, big_disc1)
    server.cut.add(DISC1)
    slices = load_oasis(server, config, cache)
    first, second = server.requests_for(DISC1)
    assert "range" not in first
    found = re.fullmatch(r"bytes=(\d+)-", second.get("range", ""))
    assert found, f"the retry did not resume: headers {second}"
    assert 0 < int(found.group(1)) <= len(big_disc1) // 2  # from what the cut connection delivered
    assert (cache / "downloads" / DISC1).read_bytes() == big_disc1  # and md5-checked against the sidecar
    assert len(sleeps) == 1
    assert visible_files(volume_dir(cache)) == EXPECTED and len(slices) == 3 * 24


def test_resume_a_part_file_left_by_an_earlier_run(server, disc1, config, cache):
    server.publish(DISC1, disc1)
    (cache / "downloads").mkdir()
    (cache / "downloads" / (DISC1 + ".part")).write_bytes(disc1[:1000])
    load_oasis(server, config, cache)
    (request,) = server.requests_for(DISC1)
    assert request["range"] == "bytes=1000-"
    assert (cache / "downloads" / DISC1).read_bytes() == disc1
    assert downloads(cache) == [DISC1]


def test_a_complete_part_file_is_not_fetched_again(server, disc1, config, cache):
    """A run killed after the last byte (say while the md5 was being checked) left a complete .part: the server
    answers its Range request with 416, which must finish the download, not fail it."""
    server.publish(DISC1, disc1)
    (cache / "downloads").mkdir()
    (cache / "downloads" / (DISC1 + ".part")).write_bytes(disc1)
    slices = load_oasis(server, config, cache)
    assert [request["range"] for request in server.requests_for(DISC1)] == [f"bytes={len(disc1)}-"]
    assert downloads(cache) == [DISC1] and len(slices) == 3 * 24


def test_a_complete_part_file_is_still_checked(server, disc1, config, cache):
    server.publish(DISC1, disc1)
    (cache / "downloads").mkdir()
    damaged = bytearray(disc1)
    damaged[100] ^= 0xFF  # the right size, the wrong bytes
    (cache / "downloads" / (DISC1 + ".part")).write_bytes(bytes(damaged))
    with pytest.raises(dataset.DataError, match="does not match the expected"):
        load_oasis(server, config, cache)
    assert downloads(cache) == []  # deleted, so the next run starts over
    load_oasis(server, config, cache)
    assert (cache / "downloads" / DISC1).read_bytes() == disc1


def test_a_server_that_ignores_range_restarts_the_file(server, big_disc1, config, cache, sleeps):
    server.publish(DISC1, big_disc1)
    server.cut.add(DISC1)
    server.ignore_range = True
    load_oasis(server, config, cache)
    first, second = server.requests_for(DISC1)
    assert "range" in second  # asked to resume, got 200 and the whole file
    assert (cache / "downloads" / DISC1).read_bytes() == big_disc1  # not the part followed by the whole


def test_cut_every_time_gives_up_then_resumes_on_the_next_run(server, big_disc1, tmp_path, sleeps):
    disc1 = big_disc1
    server.publish(DISC1, disc1)
    server.cut_always.add(DISC1)
    dest = tmp_path / "downloads" / DISC1
    with pytest.raises(dataset.DataError, match=r"after 2 retries.*kept, run again to resume") as raised:
        dataset.download(server.url + DISC1, dest, md5(disc1), retries=2, backoff=0.5, progress=False)
    assert server.url + DISC1 in str(raised.value)
    assert sleeps == [0.5, 1.0]  # exponential back-off
    part = dest.with_name(DISC1 + ".part")
    assert not dest.exists() and 0 < part.stat().st_size < len(disc1)
    have = part.stat().st_size
    server.cut_always.clear()
    server.clear_log()
    dataset.download(server.url + DISC1, dest, md5(disc1), progress=False)
    (request,) = server.requests_for(DISC1)
    assert request["range"] == f"bytes={have}-"
    assert dest.read_bytes() == disc1 and not part.exists()


def test_checksum_mismatch_is_an_error_and_leaves_nothing(server, disc1, config, cache):
    server.publish(DISC1, disc1, checksum="wrong")
    with pytest.raises(dataset.DataError, match="md5 .* does not match") as raised:
        load_oasis(server, config, cache)
    assert server.url + DISC1 in str(raised.value)
    assert downloads(cache) == []  # neither the archive nor its .part
    assert not volume_dir(cache).exists() or visible_files(volume_dir(cache)) == []


def test_download_checks_the_size_and_md5_given(server, disc1, tmp_path):
    server.publish(DISC1, disc1, checksum=None)
    dest = tmp_path / DISC1
    with pytest.raises(dataset.DataError, match="does not match the expected"):
        dataset.download(server.url + DISC1, dest, "f" * 32, progress=False)
    assert list(tmp_path.iterdir()) == []
    assert dataset.download(server.url + DISC1, dest, md5(disc1).upper(), progress=False) == dest
    server.clear_log()
    assert dataset.download(server.url + DISC1, dest, progress=False) == dest  # already there: no request
    assert server.log == []


def test_404_names_the_url(server, disc1, config, cache):
    server.publish(DISC1, disc1)
    with pytest.raises(dataset.DataError, match="HTTP 404") as raised:
        load_oasis(server, config, cache, discs="2")
    assert server.url + DISC2 in str(raised.value)
    assert "--oasis-url" in str(raised.value)
    assert downloads(cache) == []


def test_500_is_retried_then_an_error(server, disc1, tmp_path, sleeps):
    server.publish(DISC1, disc1)
    server.statuses[DISC1] = [500] * 10
    with pytest.raises(dataset.DataError, match="HTTP 500 after 2 retries") as raised:
        dataset.download(server.url + DISC1, tmp_path / DISC1, retries=2, backoff=0.01, progress=False)
    assert server.url + DISC1 in str(raised.value)
    assert len(server.requests_for(DISC1)) == 3
    assert sleeps == [0.01, 0.02]
    assert not (tmp_path / DISC1).exists()


def test_500_then_success(server, disc1, config, cache, sleeps):
    server.publish(DISC1, disc1)
    server.statuses[DISC1] = [500, 503]
    slices = load_oasis(server, config, cache)
    assert len(server.requests_for(DISC1)) == 3 and len(sleeps) == 2
    assert set(slices.subjects) == {"OAS1_0001", "OAS1_0002", "OAS1_0003"}


def test_a_stalled_server_times_out_retries_then_is_an_error(server, disc1, tmp_path, sleeps):
    server.publish(DISC1, disc1)
    server.stall = 1.5
    with pytest.raises(dataset.DataError, match=r"no answer within 0\.3 s after 2 retries") as raised:
        dataset.download(server.url + DISC1, tmp_path / DISC1, timeout=0.3, retries=2, backoff=0.01, progress=False)
    assert server.url + DISC1 in str(raised.value) and "run again" in str(raised.value)
    assert len(server.requests_for(DISC1)) == 3 and sleeps == [0.01, 0.02]
    assert not (tmp_path / DISC1).exists()


def test_an_empty_part_file_is_deleted_not_called_resumable(server, disc1, tmp_path, sleeps):
    """The stalled server sends headers and no byte: the .part opened for the body stays empty, and an empty
    file is nothing to resume."""
    server.publish(DISC1, disc1)
    server.stall = 1.5
    with pytest.raises(dataset.DataError) as raised:
        dataset.download(server.url + DISC1, tmp_path / DISC1, timeout=0.3, retries=1, backoff=0.01, progress=False)
    assert "kept" not in str(raised.value) and "resume" not in str(raised.value)
    assert str(raised.value).endswith("run again later")
    assert list(tmp_path.rglob("*.part")) == []


def test_403_fails_without_retry(server, disc1, tmp_path, sleeps):
    server.publish(DISC1, disc1)
    server.statuses[DISC1] = [403, 403]  # a retry would get 403 again, then the file
    with pytest.raises(dataset.DataError, match="HTTP 403; check --oasis-url") as raised:
        dataset.download(server.url + DISC1, tmp_path / DISC1, backoff=0.01, progress=False)
    assert server.url + DISC1 in str(raised.value)
    assert len(server.requests_for(DISC1)) == 1 and sleeps == []
    assert list(tmp_path.iterdir()) == []


def test_other_4xx_is_an_error_without_retry(server, disc1, tmp_path, sleeps):
    server.publish(DISC1, disc1)
    server.statuses[DISC1] = [400]
    with pytest.raises(dataset.DataError, match="HTTP 400"):
        dataset.download(server.url + DISC1, tmp_path / DISC1, progress=False)
    assert sleeps == [] and list(tmp_path.iterdir()) == []


def test_an_archive_that_is_not_gzip(server, config, cache):
    server.publish(DISC1, b"<html><body>Please log in</body></html>\n" * 50)
    with pytest.raises(dataset.DataError, match=r"not a readable \.tar\.gz") as raised:
        load_oasis(server, config, cache)
    assert DISC1 in str(raised.value)
    assert not (volume_dir(cache) / f".{DISC1}.extracted").exists()


def test_a_truncated_archive(server, disc1, config, cache):
    server.publish(DISC1, disc1[: len(disc1) * 2 // 3])  # consistent size and md5, but the gzip stream ends early
    with pytest.raises(dataset.DataError, match=r"not a readable \.tar\.gz"):
        load_oasis(server, config, cache)
    assert not (volume_dir(cache) / f".{DISC1}.extracted").exists()


def test_an_archive_without_oasis_volumes(server, config, cache):
    server.publish(DISC1, build_archive(1, {}, decoys=False))
    with pytest.raises(dataset.DataError, match="no member matches"):
        load_oasis(server, config, cache)
    assert not (volume_dir(cache) / f".{DISC1}.extracted").exists()


def test_delete_archives(server, disc1, config, cache):
    server.publish(DISC1, disc1)
    slices = load_oasis(server, config, cache, delete_archives=True)
    assert downloads(cache) == []
    assert visible_files(volume_dir(cache)) == EXPECTED
    assert len(slices) == 3 * 24
    server.clear_log()
    load_oasis(server, config, cache, delete_archives=True)  # the marker is enough: no new download
    assert server.log == []


def test_extract_members_flattens_and_ignores_links(tmp_path, disc1):
    archive = tmp_path / DISC1
    archive.write_bytes(disc1)
    written = dataset.extract_members(archive, dataset.OASIS1_MEMBER, tmp_path / "out")
    assert sorted(path.name for path in written) == EXPECTED
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == EXPECTED
    assert all(not path.is_symlink() for path in (tmp_path / "out").iterdir())


# ---------------------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------------------

def run_dataset_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "dataset.py", *args], cwd=PROJECT_ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)


def test_cli_oasis_download(server, disc1, tmp_path):
    server.publish(DISC1, disc1)
    cache = tmp_path / "cache"
    result = run_dataset_cli("--data", "oasis", "--oasis-url", server.url, "--discs", "1", "--cache", str(cache))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "source: oasis" in result.stdout
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()
            if line.split() and line.split()[0] in (*dataset.SPLITS, "all")}
    assert rows["all"][:2] == ["3", str(3 * 24)]
    assert "slice shape (128, 128), float32" in result.stdout
    assert visible_files(volume_dir(cache)) == EXPECTED


@pytest.mark.parametrize("discs", ["13", "0", "x"])
def test_cli_bad_disc_number(server, tmp_path, discs):
    result = run_dataset_cli("--data", "oasis", "--oasis-url", server.url, "--discs", discs,
                             "--cache", str(tmp_path / "cache"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith("error: --discs")
    assert server.log == []  # refused before any download


def test_cli_download_error_exits_2(server, tmp_path):
    result = run_dataset_cli("--data", "oasis", "--oasis-url", server.url, "--discs", "3",
                             "--cache", str(tmp_path / "cache"), "--no-progress")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "HTTP 404" in lines[0] and "oasis_cross-sectional_disc3.tar.gz" in lines[0]


# ---------------------------------------------------------------------------------------------------------------
# A server that cannot be reached: no retry can help, so the failure is at once, in one short line
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released), so a connection is refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def timed_download(url: str, dest: Path) -> tuple[dataset.DataError, float]:
    """download() with the default retries and back-off, expected to fail: the error and the seconds it took."""
    start = time.perf_counter()
    with pytest.raises(dataset.DataError) as raised:
        dataset.download(url, dest, progress=False)
    return raised.value, time.perf_counter() - start


def test_a_refused_connection_fails_at_once_without_retry(closed_port, tmp_path, sleeps):
    error, seconds = timed_download(f"http://127.0.0.1:{closed_port}/data/{DISC1}", tmp_path / "cache" / DISC1)
    assert sleeps == [] and seconds < 5
    assert str(error).startswith(f"cannot reach 127.0.0.1:{closed_port} (connection refused")
    assert "--data FOLDER" in str(error) and "predict.py" in str(error)
    assert not (tmp_path / "cache").exists()  # nothing written: no folder, no empty .part


def test_an_unresolvable_host_fails_at_once_as_name_not_resolved(tmp_path, sleeps):
    error, seconds = timed_download(f"http://oasis.invalid/data/{DISC1}", tmp_path / "cache" / DISC1)
    assert sleeps == [] and seconds < 5  # the .invalid top-level domain never resolves
    assert str(error).startswith("cannot reach oasis.invalid (name not resolved: no network?); ")
    assert len(str(error)) < 250 and "Error" not in str(error)  # no urllib3 internals
    assert not (tmp_path / "cache").exists()


def test_a_malformed_url_fails_at_once(tmp_path, sleeps):
    with pytest.raises(dataset.DataError, match="check --oasis-url"):
        dataset.download(f"oasis.example/{DISC1}", tmp_path / DISC1, progress=False)
    assert sleeps == [] and list(tmp_path.iterdir()) == []


def test_cli_without_a_reachable_server_is_one_short_line_at_once(closed_port, tmp_path):
    start = time.perf_counter()
    result = run_dataset_cli("--data", "oasis", "--oasis-url", f"http://127.0.0.1:{closed_port}/data/",
                             "--discs", "1", "--cache", str(tmp_path / "cache"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot reach 127.0.0.1:{closed_port} (connection refused") and len(line) < 250
    assert time.perf_counter() - start < 30  # the interpreter's start-up, no back-off (4 retries wait 30 s)
    assert not (tmp_path / "cache").exists()
