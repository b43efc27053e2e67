"""A corpus on object storage (common/storage.py, docs/operations.md "Object storage"), tested against a
local S3 server: moto in server mode on 127.0.0.1, started and stopped by a module fixture, behind a
TCP relay that counts the bytes the server sends, so "streams, never downloads whole files" is measured
on the wire. Credentials are fake and set only inside each test; no real endpoint is ever contacted."""

from __future__ import annotations

import glob as globmod
import json
import os
import re
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from common import storage
from common.corpus import CorpusConfig, CorpusStats, iter_documents, iter_pieces
from common.corpus_sources import check_sources, expand_sources
from tests.helpers import owt_documents, write_corpus

pytest.importorskip("moto", reason="the local S3 server: pip install -e '.[dev]'")
ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CountingRelay:
    """127.0.0.1:port -> the S3 server, counting the bytes the server sends back (bodies + headers) and
    recording each request line the client sends (``"HEAD /bucket/key"``)."""

    REQUEST_LINE = re.compile(rb"(GET|HEAD|PUT|POST|DELETE) (\S+) HTTP/1\.[01]\r\n")

    def __init__(self, upstream: int):
        self.upstream, self.received, self._lock = upstream, 0, threading.Lock()
        self.requests: list[str] = []
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return  # closed
            server = socket.create_connection(("127.0.0.1", self.upstream))
            self._conns += [client, server]
            threading.Thread(target=self._pipe, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        pending = b""  # the client's bytes not yet searched for request lines (a line may span two reads)
        try:
            while data := src.recv(1 << 16):
                if count:
                    with self._lock:
                        self.received += len(data)
                else:
                    pending += data
                    ends = 0
                    for m in self.REQUEST_LINE.finditer(pending):
                        with self._lock:
                            self.requests.append(f"{m.group(1).decode()} {m.group(2).decode().split('?')[0]}")
                        ends = m.end()
                    pending = pending[max(ends, len(pending) - 4096):]
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._sock.close()
        for s in self._conns:
            s.close()


@pytest.fixture(scope="module")
def s3_server():
    """(direct endpoint, relay) of a moto S3 server on 127.0.0.1; stopped when the module ends."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    relay = CountingRelay(port)
    try:
        yield f"http://127.0.0.1:{port}", relay
    finally:
        relay.close()
        server.stop()


def fake_env(endpoint: str, tmp_path: Path) -> dict[str, str]:
    """Fake credentials and the local endpoint; no ~/.aws file, no instance metadata lookups."""
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-credentials"),
            "AWS_CONFIG_FILE": str(tmp_path / "no-config")}


_UNSET = ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN", "AWS_DEFAULT_PROFILE")


class Bucket:
    """A fresh bucket on the test server; ``put`` uploads with boto3 (not the code under test)."""

    def __init__(self, endpoint: str):
        import boto3

        self.name = f"b-{uuid.uuid4().hex[:12]}"
        self.client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                   aws_access_key_id="testing", aws_secret_access_key="testing")
        self.client.create_bucket(Bucket=self.name)

    def url(self, key: str = "") -> str:
        return f"s3://{self.name}/{key}"

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.name, Key=key, Body=data)

    def upload(self, local: Path, prefix: str) -> None:
        for f in sorted(local.rglob("*")):
            if f.is_file():
                self.put(f"{prefix}/{f.relative_to(local).as_posix()}", f.read_bytes())


@pytest.fixture
def s3(s3_server, monkeypatch, tmp_path):
    """A fresh bucket, with the environment pointing at the relay (set for this test only)."""
    endpoint, relay = s3_server
    for k in _UNSET:
        monkeypatch.delenv(k, raising=False)
    for k, v in fake_env(f"http://127.0.0.1:{relay.port}", tmp_path).items():
        monkeypatch.setenv(k, v)
    return Bucket(endpoint)


def make_tree(root: Path) -> Path:
    """Text, JSONL and Parquet files in nested folders (names that sort differently by path and by string)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = owt_documents(12)
    (root / "a").mkdir(parents=True)
    (root / "a-b").mkdir()
    write_corpus(root / "x.txt", docs[:2])
    write_corpus(root / "a" / "y.txt", docs[2:4])
    (root / "a-b" / "z.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[4:7]))
    pq.write_table(pa.table({"text": docs[7:10]}), root / "a" / "p.parquet", row_group_size=2)
    pq.write_table(pa.table({"text": docs[10:]}), root / "q.parquet")
    (root / "notes.csv").write_text("not,a,corpus\n")
    return root


def docs_of(paths: list[str], stats: CorpusStats | None = None) -> list[tuple[str, str]]:
    return list(iter_documents(CorpusConfig(paths), stats))


# -- names and globs --------------------------------------------------------------------------------


def test_url_names():
    assert storage.is_url("s3://b/k") and storage.is_url("gs://b/k") and storage.is_url("memory://x")
    assert not storage.is_url("hf:openwebtext") and not storage.is_url("/a/b") and not storage.is_url("file:///a")
    assert storage.local_path("file:///a/b.txt") == "/a/b.txt" and storage.local_path("a/b") == "a/b"
    assert storage.common_parent(["s3://b/p/x.txt", "s3://b/p/q/y.txt"]) == "s3://b/p"
    assert storage.relative("s3://b/p/q/y.txt", "s3://b/p/") == "q/y.txt"


def test_client_env_lists_what_is_set(monkeypatch):
    for k in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_SECRET_ACCESS_KEY", "GOOGLE_APPLICATION_CREDENTIALS"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    env = storage.client_env()
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000" and env["AWS_SECRET_ACCESS_KEY"] == "s"
    assert "AWS_PROFILE" not in env and "HOME" not in env and "PATH" not in env


@pytest.mark.parametrize("pattern", ["*.txt", "*", "a/*", "*/*.parquet", "**/*.txt", "**", "a*/*", "?.txt",
                                     "[xq].*", "[!x]*.parquet", "**/a/*.txt", "a-b/**/*.jsonl"])
def test_glob_matches_like_the_glob_module(s3, tmp_path, pattern):
    """Parity with ``glob.glob(recursive=True)`` over the same tree, hidden files included."""
    root = make_tree(tmp_path / "c")
    (root / ".hidden.txt").write_text("x")
    (root / "a" / ".h").mkdir()
    (root / "a" / ".h" / "u.txt").write_text("x")
    s3.upload(root, "c")
    want = sorted(Path(f) for f in globmod.glob(str(root / pattern), recursive=True) if os.path.isfile(f))
    got = storage.glob(s3.url(f"c/{pattern}"))
    assert got == [s3.url(f"c/{f.relative_to(root).as_posix()}") for f in want]


# -- corpus sources: the same ids, documents and order as the same files on disk ----------------------


@pytest.mark.parametrize("spec", ["c/*.parquet", "c/**/*.parquet", "c/**/*.jsonl", "c/**", "c", "c/", "c/x.txt",
                                  "c/a/*"])
def test_sources_and_documents_equal_local(s3, tmp_path, spec):
    root = make_tree(tmp_path / "c")
    s3.upload(root, "c")
    local = expand_sources([str(tmp_path / spec)])
    remote = expand_sources([s3.url(spec)])
    assert [(k, s) for k, _, s in remote] == [(k, s) for k, _, s in local]
    assert all(loc.startswith(s3.url("c/")) for _, loc, _ in remote)
    local_stats, remote_stats = CorpusStats(), CorpusStats()
    assert docs_of([s3.url(spec)], remote_stats) == docs_of([str(tmp_path / spec)], local_stats)
    assert remote_stats.to_json() == local_stats.to_json()


def test_source_ids_do_not_depend_on_endpoint_or_credentials(s3, s3_server, tmp_path, monkeypatch):
    s3.upload(make_tree(tmp_path / "c"), "c")
    via_relay = expand_sources([s3.url("c/**/*.txt")])
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server[0])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "another")
    assert expand_sources([s3.url("c/**/*.txt")]) == via_relay


def test_fsspec_schemes(tmp_path):
    """Schemes other than s3/gs go through fsspec (here its in-memory store: no server needed)."""
    import fsspec

    root = make_tree(tmp_path / "c")
    mem = fsspec.filesystem("memory")
    base = f"/t-{uuid.uuid4().hex[:8]}"
    for f in root.rglob("*"):
        if f.is_file():
            mem.pipe(f"{base}/{f.relative_to(root).as_posix()}", f.read_bytes())
    try:
        url = f"memory:/{base}/**/*.parquet"
        assert docs_of([url]) == docs_of([str(root / "**" / "*.parquet")])
        assert docs_of([f"memory:/{base}"]) == docs_of([str(root)])
    finally:
        mem.rm(base, recursive=True)


def test_file_urls_are_local_paths(tmp_path):
    root = make_tree(tmp_path / "c")
    assert expand_sources([f"file://{root}"]) == expand_sources([str(root)])


# -- streaming: bytes on the wire are bounded by what is read, not by the file ------------------------


def test_streaming_reads_are_bounded(s3, s3_server, tmp_path):
    _, relay = s3_server
    doc = ("word " * 200 + "\n") * 10  # ~10 KB per document
    body = "".join(doc + "<|endoftext|>\n" for _ in range(3200)).encode()  # ~32 MiB
    s3.put("big/corpus.txt", body)
    url = s3.url("big/corpus.txt")

    start = relay.received
    assert storage.read_range(url, 20 * MiB, 1000) == body[20 * MiB:20 * MiB + 1000]
    assert relay.received - start < 64 << 10  # one small ranged request, not the object

    start = relay.received
    first = next(iter_pieces(CorpusConfig([url])))
    assert first.text == doc.rstrip("\n") and first.last
    got = relay.received - start
    assert got < storage.STREAM_BUFFER + MiB < len(body) // 3, got  # one read-ahead buffer, not 32 MiB

    start = relay.received
    with storage.open_binary(url) as f:
        f.seek(len(body) - 100)
        assert f.read() == body[-100:]
    assert relay.received - start < 64 << 10  # a seek skips what lies before it


def test_parquet_reads_only_the_text_column(s3, s3_server, tmp_path):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, relay = s3_server
    n = 2000
    blob = np.random.default_rng(0).bytes(4000 * n)  # incompressible
    table = pa.table({"text": [f"document {i}" for i in range(n)],
                      "image": [blob[4000 * i:4000 * (i + 1)] for i in range(n)]})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=500, compression="none")
    data = (tmp_path / "t.parquet").read_bytes()
    s3.put("pq/t.parquet", data)
    start = relay.received
    got = docs_of([s3.url("pq/t.parquet")])
    assert [t for _, t in got] == [f"document {i}" for i in range(n)]
    assert relay.received - start < len(data) // 10, (relay.received - start, len(data))


# -- planning stage-1 tasks: sizes from the listing, footers on threads, the serial walk's plan ----------


def test_map_ordered_keeps_the_input_order():
    """Calls run concurrently for URLs, yet results and the first failure follow the input order."""
    import time

    names = [f"s3://b/k{i}" for i in range(24)]

    def slow(name: str) -> str:
        i = int(name.rsplit("k", 1)[1])
        time.sleep(0.002 * (24 - i))  # later names finish first
        if i in (5, 9):
            raise ValueError(f"failed {name}")
        return name.upper()

    assert storage.map_ordered(lambda n: n.upper(), names) == [n.upper() for n in names]
    with pytest.raises(ValueError, match="failed s3://b/k5$"):
        storage.map_ordered(slow, names)


def serial_plan(cfg: CorpusConfig, task_bytes: int, monkeypatch) -> list:
    """The plan a serial walk builds: each file's size asked on its own, Parquet footers one after another."""
    import common.partition as partition

    with monkeypatch.context() as m:
        m.setattr(partition, "sized_sources", lambda paths: [(*src, None) for src in expand_sources(paths)])
        m.setattr(partition, "map_ordered", lambda fn, names: [fn(n) for n in names])
        return partition.plan(cfg, task_bytes)


def shape(tasks: list) -> list:
    """A plan without its locations (a bucket's and a folder's differ; source ids do not)."""
    return [(t.index, t.role, t.bytes, [(r.kind, r.source, r.start, r.end, r.size) for r in t.ranges]) for t in tasks]


@pytest.mark.parametrize("task_bytes", [700, 1 << 20])
def test_plan_uses_listing_sizes_and_equals_the_serial_plan(s3, s3_server, tmp_path, monkeypatch, task_bytes):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from common.partition import plan

    _, relay = s3_server
    root = make_tree(tmp_path / "c")
    docs = owt_documents(24)
    (root / "many").mkdir()
    for i in range(20):
        write_corpus(root / "many" / f"t{i:02d}.txt", docs[i:i + 2])
    (root / "many" / "r.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[:5]))
    pq.write_table(pa.table({"text": docs}), root / "many" / "big.parquet", row_group_size=5)
    s3.upload(root, "c")
    n_parquet = 3
    local = plan(CorpusConfig([str(root)]), task_bytes)
    assert local == serial_plan(CorpusConfig([str(root)]), task_bytes, monkeypatch)
    for where in ([s3.url("c/")], [s3.url("c/**")], [s3.url("c/x.txt"), s3.url("c/many/big.parquet")]):
        cfg = CorpusConfig(where)
        first = len(relay.requests)
        got = plan(cfg, task_bytes)
        asked = relay.requests[first:]
        first = len(relay.requests)
        assert got == serial_plan(cfg, task_bytes, monkeypatch), where  # the same Task list
        serial_asked = relay.requests[first:]
        assert all(r.size == storage.size(r.location) for t in got for r in t.ranges), where
        # Beside the listing and the probe of each URL given, objects are asked one by one only for a
        # Parquet footer (open + read), never for a size: no text or JSONL file is asked at all.
        given = {"/" + u.split("://", 1)[1].rstrip("/") for u in where}
        per_object = [q for q in asked if q.count("/") > 1 and q.split(" ", 1)[1] not in given]
        assert all(q.endswith(".parquet") for q in per_object), asked
        assert len(per_object) <= 2 * n_parquet and len(asked) - len(per_object) <= 3 * len(where), asked
        assert len(serial_asked) > len(asked), (serial_asked, asked)
    assert shape(plan(CorpusConfig([s3.url("c/")]), task_bytes)) == shape(local)  # the bucket's plan is the folder's


# -- user errors: one line naming the URL --------------------------------------------------------------


def test_check_sources_errors(s3, tmp_path):
    s3.put("c/a.txt", b"a\n")
    s3.put("c/empty.txt", b"")
    s3.put("bin/b.txt", b"abc\0def")
    check_sources(CorpusConfig([s3.url("c/a.txt")]))
    with pytest.raises(ValueError, match=r"s3://b-\w+/bin/b.txt' looks binary"):
        check_sources(CorpusConfig([s3.url("bin/")]))
    with pytest.raises(ValueError, match=r"is empty \(0 bytes\)"):
        check_sources(CorpusConfig([s3.url("c/empty.txt")]))
    with pytest.raises(ValueError, match=r"corpus prefix 's3://.*/c2/' has no \.txt"):
        s3.put("c2/x.csv", b"x")
        check_sources(CorpusConfig([s3.url("c2/")]))


def cli(*args: str, env: dict) -> subprocess.Popen:
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "GOOGLE_"))}
    return subprocess.Popen([sys.executable, "-m", "pipeline.stage1", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**keep, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **env})


def test_cli_errors_are_one_line(s3_server, tmp_path, tiny_tokenizer_dir):
    endpoint, _ = s3_server
    bucket = Bucket(endpoint)
    bucket.put("c/a.txt", b"hello\n")
    env = fake_env(endpoint, tmp_path)
    no_creds = {k: v for k, v in env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    unreachable = {**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    cases = {  # name: (corpus, env, what the line says)
        "missing bucket": ("s3://no-such-bucket-here/c/*.txt", env, "bucket 'no-such-bucket-here' does not exist"),
        "missing key": (bucket.url("c/b.txt"), env, f"corpus URL '{bucket.url('c/b.txt')}' does not exist"),
        "glob matches nothing": (bucket.url("c/*.parquet"), env, "matches no file"),
        "no credentials": (bucket.url("c/a.txt"), no_creds, "no credentials in the environment: set AWS_ACCESS_KEY_ID"),
        "unreachable": (bucket.url("c/a.txt"), unreachable, "cannot reach the S3 endpoint http://127.0.0.1:"),
    }
    out = tmp_path / "out"
    procs = {}
    for name, (corpus, e, _) in cases.items():
        procs[name] = cli("--corpus", corpus, "--tokenizer", str(tiny_tokenizer_dir), "--out", str(out),
                          "--in-process", env=e)
        if len(procs) % 2 == 0:  # two at a time: mostly Python start-up
            for p in procs.values():
                p.wait(timeout=300)
    for name, (corpus, _, expected) in cases.items():
        p = procs[name]
        _, err = p.communicate(timeout=300)
        assert p.returncode == 2, (name, err[-2000:])
        assert "Traceback" not in err, (name, err[-2000:])
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and expected in lines[0], (name, err[-2000:])
        assert corpus in lines[0], (name, lines[0])
        assert not out.exists(), name  # refused before anything was written


def test_ray_job_accepts_urls(monkeypatch, tmp_path):
    from pipeline.raylib import JOB_ENV, check_job_paths

    monkeypatch.setenv(JOB_ENV, json.dumps({"metadata": {"job_submission_id": "raysubmit_T"}}))
    check_job_paths({"--out": str(tmp_path), "--corpus": ["s3://b/p/*.parquet", "gs://b/x.txt"]})
    with pytest.raises(ValueError, match="relative path"):
        check_job_paths({"--out": str(tmp_path), "--corpus": ["s3://b/p/*.parquet", "c.txt"]})


# -- stage 1 end to end ----------------------------------------------------------------------------------


def test_stage1_from_s3_writes_the_same_shards_as_local(s3, tmp_path, tiny_tokenizer_dir, ray_local):
    """The bucket is read by Ray workers (the test's Ray started before the test set its variables, so
    they reach the server only if stage 1 hands them on); the local copy in-process."""
    from pipeline.stage1 import TokenizeConfig, run

    root = make_tree(tmp_path / "c")
    s3.upload(root, "corpus")
    manifests = {}
    for name, corpus in (("local", str(root)), ("s3", s3.url("corpus/"))):
        cfg = TokenizeConfig(corpus=[corpus], tokenizer=str(tiny_tokenizer_dir), out=str(tmp_path / name),
                             seq_len=16, val_fraction=0.2, in_process=name == "local", shard_mb=0.002,
                             num_workers=2)
        manifests[name] = run(cfg)
    shards = {name: {p.relative_to(tmp_path / name).as_posix(): p.read_bytes()
                     for p in sorted((tmp_path / name).rglob("*"))
                     if p.is_file() and p.name.startswith(("train", "val"))} for name in manifests}
    assert len(shards["local"]) > 2
    assert shards["s3"] == shards["local"]
    local, remote = manifests["local"].corpus, manifests["s3"].corpus
    assert remote["fingerprint"] == local["fingerprint"] and remote["files"] == local["files"]
    assert remote["sources"] == [s3.url("corpus/")]


@pytest.mark.slow  # ~40 s beside the stage-1 test above, which proves the Ray path already
def test_stage2_corpus_shortcut_reads_s3(s3, tmp_path, tiny_teacher_dir, ray_local, capsys):
    """``pipeline/extract.py --corpus s3://...`` runs stage 1 from the bucket, then stage 2."""
    from pipeline.extract import main
    from sae import save_sae
    from shards import load_manifest
    from tests.helpers import random_sae

    save_sae(random_sae(d=64, c=300, k=8, layer=1, seed=1), tmp_path / "sae")
    s3.put("c/c.txt", write_corpus(tmp_path / "c.txt", owt_documents(4)).read_bytes())
    argv = ["--teacher", str(tiny_teacher_dir), "--sae", str(tmp_path / "sae"), "--out", str(tmp_path / "o"),
            "--seq-len", "16", "--k-mix", "0", "--ray-address", "local"]
    assert main(["--corpus", s3.url("c/*.txt"), *argv]) == 0
    m = load_manifest(tmp_path / "o" / "tokens" / "manifest.json")
    assert m.corpus["sources"] == [s3.url("c/*.txt")] and m.corpus["files"] == ["c.txt"]
    assert main(["--corpus", s3.url("c/nope.txt"), *argv]) == 2
    assert f"error: corpus URL '{s3.url('c/nope.txt')}' does not exist" in capsys.readouterr().err
