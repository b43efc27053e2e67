"""Files named by a local path or a URL: listing, globbing, sizes, streaming and ranged reads.

The corpus readers (common/corpus.py) open every input through this module, so a corpus may live on
object storage: ``s3://bucket/prefix/*.parquet``, ``gs://bucket/dir/``, or any fsspec URL. Routes:

- a local path (or ``file://PATH``): the standard library, exactly as before;
- ``s3://`` (``s3a://``) and ``gs://`` (``gcs://``): pyarrow's own S3 / GCS clients (pyarrow is a core
  dependency, so no extra package). Credentials come from the environment the way the AWS and Google
  SDKs read them: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``,
  ``AWS_PROFILE`` and ``~/.aws``, an instance or pod role; ``GOOGLE_APPLICATION_CREDENTIALS`` or the
  machine's service account. Endpoint and region are read here, as boto3 reads them:
  ``AWS_ENDPOINT_URL_S3`` (else ``AWS_ENDPOINT_URL``) for S3-compatible stores (MinIO, R2, Ceph),
  ``AWS_REGION`` (else ``AWS_DEFAULT_REGION``, else the bucket's own region, asked once),
  ``STORAGE_EMULATOR_HOST`` for a GCS emulator;
- any other scheme (``az://``, ``abfs://``, ``hf://``, ``memory://``, ...): fsspec, which needs the
  scheme's implementation package (``adlfs`` for Azure, ``huggingface_hub`` for ``hf://``).

Nothing is downloaded whole: a streamed file is fetched in ranged reads of ``STREAM_BUFFER`` bytes
(one request each, only as the reader advances), a Parquet file reads its footer and then the column
chunks it needs, and :func:`read_range` fetches exactly the bytes asked for. A URL carries no query
string (``?`` is a glob character here): endpoint and credentials live in the environment, so the URL,
and the corpus source ids derived from it, never depend on them (docs/operations.md, "Object storage").

Every failure on a URL is a :class:`StorageError` (a ``ValueError``) of one line that names the URL
and, where it helps, the environment variable to set.
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Callable
from typing import Any, BinaryIO, TypeVar

# The names (pure string functions) are common/urls.py's; re-exported as this module's API.
from common.urls import _URL, common_parent, glob_regex, has_magic, is_url, join, local_path, relative, scheme_of

__all__ = ["REQUEST_THREADS", "STREAM_BUFFER", "StorageError", "client_env", "common_parent", "glob", "glob_regex",
           "glob_sized", "has_magic", "is_url", "join", "kind", "list_files", "list_sized", "local_path", "map_ordered",
           "open_binary", "open_random_access", "read_range", "relative", "scheme_of", "size", "stat"]

STREAM_BUFFER = 8 << 20
"""Bytes fetched per request when a file is streamed: large enough that a request's latency is small
beside its transfer, small enough that a reader holds little (docs/operations.md, "Object storage")."""

REQUEST_THREADS = 16
"""Concurrent requests of :func:`map_ordered` (one per object: sizes, Parquet footers, sniffs)."""
T = TypeVar("T")

_S3 = ("s3", "s3a")
_GCS = ("gs", "gcs")
_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE",
        "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "STORAGE_EMULATOR_HOST",
        "GOOGLE_APPLICATION_CREDENTIALS")
"""Settings a client is built from: a client is cached per their values, so a changed variable counts."""
_FORWARD = _ENV + ("AWS_DEFAULT_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_EC2_METADATA_DISABLED",
                   "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE")
"""What :func:`client_env` hands on: the settings and where the SDKs look for more."""


class StorageError(ValueError):
    """A URL that cannot be listed or read: one line naming the URL and what to do."""


def client_env() -> dict[str, str]:
    """The variables the S3 / GCS clients read that are set in this process: what a driver hands its
    Ray workers (``runtime_env={"env_vars": ...}``) when they, not the driver, open the corpus, so a
    worker reaches the same endpoint with the same credentials (docs/operations.md, "Object storage")."""
    return {k: os.environ[k] for k in _FORWARD if k in os.environ}


# -- names -----------------------------------------------------------------------------------------


def _split(url: str) -> tuple[str, str]:
    """``s3://b/k/`` -> (``s3``, ``b/k``): the scheme and the path inside the store, no trailing slash."""
    m = _URL.match(url)
    if m is None:
        raise StorageError(f"{url!r} is not a URL")
    return m.group(1).lower(), m.group(2).rstrip("/")


# -- clients ---------------------------------------------------------------------------------------


def _filesystem(scheme: str, bucket: str) -> tuple[Any, str]:
    """(a ``pyarrow.fs.FileSystem``, how the store is reached, for messages), cached per settings."""
    return _cached_filesystem(scheme, bucket if scheme in _S3 else "", tuple(os.environ.get(v) for v in _ENV))


@functools.lru_cache(maxsize=64)
def _cached_filesystem(scheme: str, bucket: str, _env: tuple) -> tuple[Any, str]:
    import pyarrow.fs as pafs

    if scheme in _S3:
        var = "AWS_ENDPOINT_URL_S3" if os.environ.get("AWS_ENDPOINT_URL_S3") else "AWS_ENDPOINT_URL"
        endpoint = os.environ.get(var)
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        kw: dict[str, Any] = {}
        if endpoint:
            kw["endpoint_override"] = endpoint  # "http://host:port" picks the scheme too
        elif region is None:
            try:  # AWS answers a request to another region's bucket with a redirect pyarrow does not follow
                region = pafs.resolve_s3_region(bucket)
            except OSError:
                region = None  # the first real request says what is wrong (no such bucket, no network)
        if region:
            kw["region"] = region
        where = f"the S3 endpoint {endpoint} ({var})" if endpoint else "AWS S3"
        return pafs.S3FileSystem(**kw), where
    if scheme in _GCS:
        import datetime

        host = os.environ.get("STORAGE_EMULATOR_HOST")
        if host:
            proto, _, hostport = host.rpartition("://")
            fs = pafs.GcsFileSystem(anonymous=True, endpoint_override=hostport, scheme=proto or "http")
            return fs, f"the GCS emulator {host} (STORAGE_EMULATOR_HOST)"
        # The client retries for 15 minutes by default; a missing credential should cost seconds.
        return pafs.GcsFileSystem(retry_time_limit=datetime.timedelta(seconds=20)), "Google Cloud Storage"
    import fsspec

    try:
        fs = fsspec.filesystem(scheme)
    except ImportError as e:  # fsspec names the package: "Install adlfs to access Azure ..."
        raise StorageError(f"{scheme}:// URLs need fsspec's implementation for {scheme}: {e}") from e
    except ValueError as e:
        raise StorageError(
            f"unknown URL scheme {scheme}:// ({e}): use s3://, gs://, a local path, or a scheme fsspec knows"
        ) from e
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), f"{scheme}:// (fsspec)"


def _resolve(url: str) -> tuple[Any, str, str]:
    """-> (filesystem, path inside it, how the store is reached)."""
    scheme, path = _split(url)
    if not path:
        raise StorageError(f"{url!r} names no bucket")
    bucket = path.split("/", 1)[0]
    if scheme in _S3 + _GCS and has_magic(bucket):
        raise StorageError(f"{url}: a glob in the bucket name is not supported; name the bucket")
    fs, where = _filesystem(scheme, bucket)
    if scheme not in _S3 + _GCS:
        import fsspec

        path = fsspec.filesystem(scheme)._strip_protocol(url).rstrip("/") or path
    return fs, path, where


def _explain(url: str, e: BaseException, where: str) -> StorageError:
    """One line for a client error on ``url``: what went wrong and the variable to set."""
    msg = " ".join(str(e).split())
    scheme = scheme_of(url) or ""
    if "NO_SUCH_BUCKET" in msg or "The specified bucket does not exist" in msg:
        text = f"{url}: bucket {_split(url)[1].split('/', 1)[0]!r} does not exist on {where}"
    elif isinstance(e, FileNotFoundError) or "NO_SUCH_KEY" in msg or "NOT_FOUND" in msg:
        text = f"{url} does not exist on {where}"
    elif "NETWORK_CONNECTION" in msg or "curlCode" in msg or ("UNAVAILABLE" in msg and "OAuth2" not in msg):
        detail = msg.split("Details:")[-1].strip() if "Details:" in msg else msg
        hint = ("set AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) to a reachable S3 endpoint, or unset it for AWS"
                if scheme in _S3 else "check the network")
        text = f"{url}: cannot reach {where} ({detail}): {hint}"
    elif scheme in _S3 and ("ACCESS_DENIED" in msg or "InvalidAccessKeyId" in msg or "SignatureDoesNotMatch" in msg
                            or isinstance(e, PermissionError)):
        if os.environ.get("AWS_ACCESS_KEY_ID"):
            who = "the credentials in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY may not read it"
        elif os.environ.get("AWS_PROFILE"):
            who = f"the profile {os.environ['AWS_PROFILE']!r} (AWS_PROFILE) may not read it"
        else:
            who = ("no credentials in the environment: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
                   "AWS_PROFILE (a ~/.aws profile or an instance role, if any, was refused)")
        text = f"{url}: access denied by {where}: {who}"
    elif scheme in _GCS and ("OAuth2" in msg or "credentials" in msg.lower()):
        text = (f"{url}: no usable Google Cloud credentials: set GOOGLE_APPLICATION_CREDENTIALS to a service "
                f"account key file, or run where a service account is attached")
    elif scheme in _GCS and ("PERMISSION_DENIED" in msg or isinstance(e, PermissionError)):
        text = f"{url}: access denied by {where}: the account of GOOGLE_APPLICATION_CREDENTIALS may not read it"
    else:
        text = f"{url}: {msg or type(e).__name__}"
    return StorageError(text)


def _call(url: str, fn):  # noqa: ANN001, ANN202 - a thunk over a client call
    """``fn()`` with a client error on ``url`` turned into one :class:`StorageError` line."""
    fs, path, where = _resolve(url)
    try:
        return fn(fs, path)
    except StorageError:
        raise
    except (OSError, ValueError) as e:
        raise _explain(url, e, where) from e


# -- listing ---------------------------------------------------------------------------------------


def kind(url: str) -> str | None:
    """``"file"``, ``"dir"`` (a prefix that holds objects) or None when nothing is there; a missing
    bucket is an error, not None."""
    return stat(url)[0]


def stat(url: str) -> tuple[str | None, int]:
    """(:func:`kind`, bytes of the file; 0 when it is not a file), from one request."""
    import pyarrow.fs as pafs

    def probe(fs, path):  # noqa: ANN001, ANN202
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return "file", info.size
        if info.type == pafs.FileType.Directory:
            return "dir", 0
        bucket = path.lstrip("/").split("/", 1)[0]
        if scheme_of(url) in _S3 + _GCS and fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise OSError(f"NO_SUCH_BUCKET: The specified bucket does not exist: {bucket}")
        return None, 0

    return _call(url, probe)


def _list(url: str, recursive: bool) -> list[tuple[str, int]]:
    """(path inside the store, size) of every file under the folder ``url``; [] when there is none."""
    import pyarrow.fs as pafs

    def ls(fs, path):  # noqa: ANN001, ANN202
        sel = pafs.FileSelector(path, recursive=recursive, allow_not_found=True)
        return [(i.path, i.size) for i in fs.get_file_info(sel) if i.type == pafs.FileType.File]

    return _call(url, ls)


def _sort_key(rel: str) -> list[str]:
    # Path order (by parts), which is how local directories and globs are sorted (common/corpus.py):
    # the same files locally and in a bucket come in the same order, hence the same shards.
    return rel.split("/")


def list_files(url: str) -> list[str]:
    """URLs of every file under the folder (prefix) ``url``, recursively, in path order."""
    return [u for u, _ in list_sized(url)]


def list_sized(url: str) -> list[tuple[str, int]]:
    """(URL, bytes) of every file under the folder (prefix) ``url``, recursively, in path order. The
    sizes come with the listing (a thousand objects per request on S3), so a caller that needs them,
    such as planning stage-1 tasks (common/partition.py), never asks each object again."""
    _, base, _ = _resolve(url)
    rels = [(p[len(base):].lstrip("/"), n) for p, n in _list(url, recursive=True)]
    return [(join(url, r), n) for r, n in sorted(rels, key=lambda rn: _sort_key(rn[0]))]


def glob(url: str) -> list[str]:
    """URLs of the files matching the glob ``url``, in path order ([] when none does)."""
    return [u for u, _ in glob_sized(url)]


def glob_sized(url: str) -> list[tuple[str, int]]:
    """(URL, bytes) of the files matching the glob ``url``, in path order; sizes as :func:`list_sized`."""
    scheme, path = _split(url)
    segs = path.split("/")
    first = next(i for i, s in enumerate(segs) if has_magic(s))
    if first == 0:
        raise StorageError(f"{url}: a glob in the bucket name is not supported; name the bucket")
    base_url = f"{url[:url.index('://') + 3]}{'/'.join(segs[:first])}"
    rest = segs[first:]
    regex = glob_regex("/".join(rest))
    _, base, _ = _resolve(base_url)
    # One level is listed when only the last name has wildcards (a delimiter listing: no walk of the
    # whole prefix); otherwise everything under the base, filtered by the pattern.
    recursive = len(rest) > 1 or "**" in rest[0]
    rels = [(p[len(base):].lstrip("/"), n) for p, n in _list(base_url, recursive=recursive)]
    if not rels:  # a listing of a missing bucket is merely empty: say which bucket is missing
        try:
            kind(base_url)
        except StorageError as e:
            raise StorageError(str(e).replace(base_url, url, 1)) from e
    hits = sorted(((r, n) for r, n in rels if regex.match(r)), key=lambda rn: _sort_key(rn[0]))
    return [(join(base_url, r), n) for r, n in hits]


def map_ordered(fn: Callable[[str], T], names: list[str]) -> list[T]:
    """``[fn(n) for n in names]``; when any name is a URL, on ``REQUEST_THREADS`` threads (each call is
    a request or two whose latency dominates: a serial walk over 10,000 objects costs minutes). The
    results, and the first failure raised, follow the order of ``names``, so the outcome is the serial one."""
    if not any(is_url(n) for n in names):
        return [fn(n) for n in names]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(REQUEST_THREADS, len(names))) as pool:
        return list(pool.map(fn, names))


# -- reading ---------------------------------------------------------------------------------------


def size(name: str) -> int:
    """Bytes in the file ``name`` (a path or a URL)."""
    if not is_url(name):
        return os.path.getsize(local_path(name))
    import pyarrow.fs as pafs

    def get(fs, path):  # noqa: ANN001, ANN202
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(path)
        return info.size

    return _call(name, get)


def read_range(name: str, start: int, length: int) -> bytes:
    """``length`` bytes from offset ``start`` (fewer at the end of the file): one ranged request."""
    if not is_url(name):
        with open(local_path(name), "rb") as f:
            f.seek(start)
            return f.read(length)
    return _call(name, lambda fs, path: fs.open_input_file(path).read_at(length, start))


class _Raw(io.RawIOBase):
    """A pyarrow random-access file as a raw Python stream: each ``readinto`` is one ranged read."""

    def __init__(self, f: Any, url: str, where: str):
        self._f, self._url, self._where = f, url, where

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # noqa: ANN001 - a writable buffer
        try:
            data = self._f.read(len(b))
        except OSError as e:
            raise _explain(self._url, e, self._where) from e
        n = len(data)
        b[:n] = data
        return n

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        return self._f.seek(pos, whence)

    def tell(self) -> int:
        return self._f.tell()

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()


def open_binary(name: str, buffer_size: int = STREAM_BUFFER) -> BinaryIO:
    """A buffered, seekable binary reader (``read``, ``readline``, iteration, ``seek``) over a path or
    a URL. For a URL, bytes arrive in ranged reads of ``buffer_size`` as the reader advances: opening a
    file downloads nothing, and seeking to an offset skips what lies before it."""
    if not is_url(name):
        return open(local_path(name), "rb")  # noqa: SIM115 - the caller closes it
    fs, path, where = _resolve(name)
    try:
        f = fs.open_input_file(path)
    except (OSError, ValueError) as e:
        raise _explain(name, e, where) from e
    return io.BufferedReader(_Raw(f, name, where), buffer_size=buffer_size)  # type: ignore[return-value]


def open_random_access(name: str) -> Any:
    """What ``pyarrow.parquet.ParquetFile`` should be given: the path itself for a local file, else
    a pyarrow random-access file whose reads are ranged requests (the footer, then only the column
    chunks read)."""
    if not is_url(name):
        return local_path(name)
    return _call(name, lambda fs, path: fs.open_input_file(path))
