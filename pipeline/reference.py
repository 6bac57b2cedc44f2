"""The reference records prepared for scoring, built once per model and reference and cached on disk.

Scoring against a reference needs two things built from it: the error model's lookups (known codes, a
customer's name and code, a customer's usual amount; `ErrorModel.with_reference`) and the duplicate
matcher's index (`DuplicateModel.matcher`). For a reference of a million rows that is most of the work of a
small nightly batch, and it is the same work every night the model and the reference are the same. So the
prepared state is written to a cache folder and loaded from there the next time.

The key is a SHA-256 over what the prepared state depends on, so a hit is always the state a rebuild
would make:

* the model: `ModelBundle.digest`, the digest of its saved files (a bundle that was never saved has none
  and is not cached);
* the reference file: its size and the SHA-256 of its bytes (not its modification time, so a nightly
  re-export of the same rows still hits; a changed byte misses);
* the configured columns and read options the reference is read with;
* the code that builds the state: a digest of this package's source and the versions of Python and the
  libraries whose objects are stored.

An entry is one file, `<key>.pkl`: a header line, a pickle of the state, and the payload's SHA-256 checked
on every load. It is written to a temporary file and renamed into place, so a killed run leaves no partial
entry; an entry that does not load, does not check out or holds another key is removed and the state is
rebuilt, with one warning. The `KEEP_ENTRIES` most recently used entries are kept.

The cache folder defaults to `$PIPELINE_CACHE_DIR`, else `$XDG_CACHE_HOME/pipeline/references`, else
`~/.cache/pipeline/references` (`score --cache-dir`, `--no-cache`). Entries are pickles: keep the folder
writable by the scoring account only, as for the model itself.

>>> # prepared = prepare_reference(bundle, Path("history.csv"), cache=ReferenceCache.default())
>>> # prepared.matcher.match(chunk); prepared.errors.assess(chunk)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any, BinaryIO

from pipeline.bundle import ModelBundle
from pipeline.errors import ErrorModel
from pipeline.ingest import (
    DETECT,
    ReadOptions,
    check_readable,
    check_unique_ids,
    file_digest,
    read_table,
    require_columns,
)
from pipeline.linkage import Matcher
from pipeline.memory import collector_paused

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
CACHE_ENV = "PIPELINE_CACHE_DIR"
KEEP_ENTRIES = 3
MAGIC = b"pipeline-reference-cache\n"
SUFFIX = ".pkl"
_DIGEST_HEX = 64
_LIBRARIES = ("numpy", "pandas", "pyarrow", "scikit-learn", "dedupe")


@dataclass
class PreparedReference:
    """What scoring needs of the reference: the error model whose lookups know it, the duplicate matcher
    indexing it (oldest first; `evict` as the batch job builds it), its ids and its row count."""

    errors: ErrorModel
    matcher: Matcher
    ids: list[str]
    rows: int


def build_reference(bundle: ModelBundle, path: Path, *, options: ReadOptions = DETECT) -> PreparedReference:
    """Reads the reference (the configured columns only), checks it and prepares it for `bundle`."""
    config = bundle.config
    reference = read_table(path, options=options, columns=config.required_columns())
    require_columns(reference, config.required_columns(), source=path, what="configured")
    check_unique_ids(reference[config.id_column], source=path, id_column=config.id_column)
    errors = bundle.errors.with_reference(reference)
    matcher = bundle.duplicates.matcher(reference, evict=True)
    return PreparedReference(errors, matcher, reference[config.id_column].tolist(), len(reference))


def prepare_reference(
    bundle: ModelBundle,
    path: Path,
    *,
    options: ReadOptions = DETECT,
    cache: ReferenceCache | None = None,
) -> PreparedReference:
    """The prepared reference, from `cache` when it holds this model's state for these exact reference
    bytes, else built (`build_reference`) and stored there. Without a cache, or for a bundle that has no
    digest (never saved), it is simply built."""
    if cache is None or not bundle.digest:
        return build_reference(bundle, path, options=options)
    started = time.perf_counter()
    check_readable(Path(path))  # a missing or empty file is bad input (exit 2), as without the cache
    key = reference_key(bundle, path, options)
    prepared = cache.load(key, bundle)
    if prepared is not None:
        logger.info(
            "reference %s: prepared state loaded from %s in %.1f s",
            path,
            cache.folder,
            time.perf_counter() - started,
        )
        return prepared
    prepared = build_reference(bundle, path, options=options)
    logger.info("reference %s: prepared in %.1f s", path, time.perf_counter() - started)
    cache.save(key, prepared)
    return prepared


def reference_key(bundle: ModelBundle, path: Path, options: ReadOptions) -> str:
    """The cache key of `bundle` scoring against the reference file `path` (see the module docstring)."""
    path = Path(path)
    content = file_digest(path)
    parts = {
        "format": CACHE_FORMAT,
        "code": code_digest(),
        "model": bundle.digest,
        "reference": {"size": path.stat().st_size, "sha256": content},
        "columns": bundle.config.required_columns(),
        "read": [options.delimiter, options.encoding, options.sheet],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


@cache
def code_digest() -> str:
    """A digest of this package's source files and of the Python and library versions: state prepared by
    other code is never loaded, even when the package version was not raised."""
    sha = hashlib.sha256(repr(sys.version_info[:3]).encode())
    for name in _LIBRARIES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            sha.update(f"{name}={metadata.version(name)};".encode())
    package = Path(__file__).resolve().parent
    for file in sorted(package.rglob("*.py")):
        sha.update(file.relative_to(package).as_posix().encode() + b"\0" + file.read_bytes())
    return sha.hexdigest()


def default_cache_dir() -> Path:
    """`$PIPELINE_CACHE_DIR`, else `$XDG_CACHE_HOME/pipeline/references`, else `~/.cache/pipeline/...`."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pipeline" / "references"


class ReferenceCache:
    """A folder of prepared references, one file per key (see the module docstring).

    >>> # cache = ReferenceCache(Path("/var/cache/pipeline")); cache.load(key, bundle) or ...
    """

    def __init__(self, folder: Path, keep: int = KEEP_ENTRIES) -> None:
        self.folder = Path(folder)
        self.keep = keep

    @classmethod
    def default(cls) -> ReferenceCache:
        return cls(default_cache_dir())

    def entry(self, key: str) -> Path:
        return self.folder / f"{key}{SUFFIX}"

    def load(self, key: str, bundle: ModelBundle) -> PreparedReference | None:
        """The state stored under `key`, on `bundle`'s models; None when there is none. An entry that is
        damaged or not what its name says is removed (one warning) and None returned: it is rebuilt."""
        path = self.entry(key)
        if not path.is_file():
            logger.info("reference cache: no entry for this model and reference yet in %s", self.folder)
            return None
        try:
            state = _read_entry(path)
            if state.get("format") != CACHE_FORMAT or state.get("key") != key:
                raise ValueError("it was written for another model, reference or version")
            prepared = PreparedReference(
                errors=state["errors"],
                matcher=Matcher.from_state(bundle.duplicates, state["matcher"]),
                ids=state["ids"],
                rows=int(state["rows"]),
            )
            if not isinstance(prepared.errors, ErrorModel):
                raise ValueError("it holds no error model")
        except Exception as exc:  # noqa: BLE001 - any damage means: rebuild, never use
            logger.warning("reference cache: %s is unusable (%s); rebuilding it", path, _short(exc))
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # most recently used: kept longest
        return prepared

    def save(self, key: str, prepared: PreparedReference) -> None:
        """Stores `prepared` under `key`, atomically; a folder that cannot be written costs a warning only."""
        state = {
            "format": CACHE_FORMAT,
            "key": key,
            "rows": prepared.rows,
            "ids": prepared.ids,
            "errors": prepared.errors,
            "matcher": prepared.matcher.export_state(),
        }
        started = time.perf_counter()
        temporary = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            handle, name = tempfile.mkstemp(prefix=f".{key[:16]}.", suffix=".partial", dir=self.folder)
            temporary = Path(name)
            with os.fdopen(handle, "wb") as fh:
                _write_entry(fh, state)
            os.replace(temporary, self.entry(key))
            temporary = None
        except OSError as exc:
            logger.warning("reference cache: cannot write to %s (%s); not cached", self.folder, _short(exc))
            return
        finally:
            if temporary is not None:
                with contextlib.suppress(OSError):
                    temporary.unlink()
        logger.info(
            "reference cache: stored %s (%.0f MB) in %.1f s",
            self.entry(key),
            self.entry(key).stat().st_size / 2**20,
            time.perf_counter() - started,
        )
        self.prune()

    def prune(self) -> None:
        """Removes all but the `keep` most recently used entries (and leftovers of killed writes)."""
        with contextlib.suppress(OSError):
            entries = sorted(self.folder.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
            for old in entries[self.keep :]:
                old.unlink(missing_ok=True)
                logger.info("reference cache: removed %s (least recently used)", old)
            day_ago = time.time() - 86_400
            for partial in self.folder.glob(".*.partial"):
                if partial.stat().st_mtime < day_ago:  # a write still running elsewhere is younger
                    partial.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ entry file


class _Hashing:
    """A file wrapper that hashes every byte read or written through it (pickle streams through it)."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.sha = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        return self.fh.write(data)

    def read(self, size: int = -1) -> bytes:
        data = self.fh.read(size)
        self.sha.update(data)
        return data

    def readinto(self, buffer: Any) -> int:
        count = self.fh.readinto(buffer)
        self.sha.update(memoryview(buffer)[:count])
        return count

    def readline(self, size: int = -1) -> bytes:
        data = self.fh.readline(size)
        self.sha.update(data)
        return data


def _write_entry(fh: BinaryIO, state: dict[str, Any]) -> None:
    """MAGIC, the payload's SHA-256 (hex, filled in after), a newline, then the pickled payload."""
    fh.write(MAGIC + b"0" * _DIGEST_HEX + b"\n")
    hashing = _Hashing(fh)
    pickle.dump(state, hashing, protocol=pickle.HIGHEST_PROTOCOL)
    fh.seek(len(MAGIC))
    fh.write(hashing.sha.hexdigest().encode())
    fh.flush()
    os.fsync(fh.fileno())


def _read_entry(path: Path) -> dict[str, Any]:
    with open(path, "rb") as fh:
        if fh.read(len(MAGIC)) != MAGIC:
            raise ValueError("not a reference cache file")
        expected = fh.read(_DIGEST_HEX + 1)[:_DIGEST_HEX].decode("ascii", "replace")
        hashing = _Hashing(fh)
        with collector_paused():  # many small containers, which the collector would walk as they load
            state = pickle.load(hashing)
        if hashing.read() or hashing.sha.hexdigest() != expected:
            raise ValueError("its checksum does not match: the file is damaged")
    if not isinstance(state, dict):
        raise ValueError("not a reference cache entry")
    return state


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:200] if text else type(exc).__name__
