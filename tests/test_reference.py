"""The prepared reference and its cache: a hit writes what a rebuild writes, byte for byte; anything that
could make the cached state differ from a rebuild (other reference bytes, another model, a damaged file)
is a miss."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from pipeline import reference as ref
from pipeline import schema as s
from pipeline.bundle import ModelBundle
from pipeline.cli import main
from pipeline.ingest import DETECT


@pytest.fixture(scope="module")
def model_folder(demo, tmp_path_factory) -> Path:
    from pipeline.config import load_config
    from pipeline.train import train

    result = train(load_config(demo.config), demo.records, demo.corrections)
    return result.bundle.save(tmp_path_factory.mktemp("model") / "bundle")


def score(model: Path, batch: Path, reference: Path, output: Path, *extra: str) -> int:
    argv = ["score", "--model", str(model), "--input", str(batch), "--reference", str(reference)]
    return main([*argv, "--output", str(output), *extra])


def outputs(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in (s.RECORDS_FILE, s.FLAGS_FILE)}


def entries(cache: Path) -> list[Path]:
    return sorted(cache.glob("*.pkl"))


def no_rebuild(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the reference was rebuilt although the cache holds it")

    monkeypatch.setattr(ref, "build_reference", fail)


def test_a_cache_hit_writes_what_a_rebuild_writes(demo, model_folder, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    assert score(model_folder, demo.batch, demo.records, tmp_path / "fresh", "--no-cache") == 0
    assert score(model_folder, demo.batch, demo.records, tmp_path / "first", "--cache-dir", str(cache)) == 0
    assert len(entries(cache)) == 1
    no_rebuild(monkeypatch)
    assert score(model_folder, demo.batch, demo.records, tmp_path / "hit", "--cache-dir", str(cache)) == 0
    fresh = outputs(tmp_path / "fresh")
    assert fresh[s.FLAGS_FILE].count(b"\n") > 10  # flags of every kind to compare, not an empty file
    assert outputs(tmp_path / "first") == fresh
    assert outputs(tmp_path / "hit") == fresh
    # Chunks of 37 rows on a cache hit: the loaded index grows chunk by chunk as a rebuilt one does.
    args = ("--cache-dir", str(cache), "--chunk-rows", "37")
    assert score(model_folder, demo.batch, demo.records, tmp_path / "chunked", *args) == 0
    assert outputs(tmp_path / "chunked") == fresh


def test_a_changed_reference_is_not_served_from_the_cache(demo, model_folder, tmp_path):
    cache = tmp_path / "cache"
    reference = tmp_path / "reference.csv"
    text = demo.records.read_text(encoding="utf-8")
    reference.write_text(text, encoding="utf-8")
    assert score(model_folder, demo.batch, reference, tmp_path / "before", "--cache-dir", str(cache)) == 0
    # One letter of one customer's name changed: same size, and the modification time put back.
    stat = reference.stat()
    header, first, rest = text.split("\n", 2)
    name_at = header.split(",").index("customer_name")
    cells = first.split(",")
    cells[name_at] = cells[name_at][:-1] + ("x" if cells[name_at][-1] != "x" else "y")
    reference.write_text("\n".join([header, ",".join(cells), rest]), encoding="utf-8")
    os.utime(reference, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert reference.stat().st_size == stat.st_size
    assert score(model_folder, demo.batch, reference, tmp_path / "after", "--cache-dir", str(cache)) == 0
    assert len(entries(cache)) == 2  # a second entry: the first was not taken for it
    assert score(model_folder, demo.batch, reference, tmp_path / "fresh", "--no-cache") == 0
    assert outputs(tmp_path / "after") == outputs(tmp_path / "fresh")


@pytest.mark.parametrize("damage", ["truncated", "flipped", "garbage", "other key"])
def test_a_damaged_entry_is_rebuilt_with_one_warning(demo, model_folder, tmp_path, caplog, damage):
    cache = tmp_path / "cache"
    assert score(model_folder, demo.batch, demo.records, tmp_path / "first", "--cache-dir", str(cache)) == 0
    [entry] = entries(cache)
    data = entry.read_bytes()
    if damage == "truncated":
        entry.write_bytes(data[: len(data) // 2])
    elif damage == "flipped":  # one byte deep inside the pickle: it may still load, the checksum will not
        at = len(data) * 2 // 3
        entry.write_bytes(data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :])
    elif damage == "garbage":
        entry.write_bytes(b"not a cache file")
    else:  # a sound entry (its checksum matches) whose payload is another key's: a copied file
        state = ref._read_entry(entry)
        state["key"] = "e" * 64
        with open(entry, "wb") as fh:
            ref._write_entry(fh, state)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.reference"):
        argv = ("--cache-dir", str(cache))
        assert score(model_folder, demo.batch, demo.records, tmp_path / "again", *argv) == 0
    assert outputs(tmp_path / "again") == outputs(tmp_path / "first")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "rebuilding" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()
    [rebuilt] = entries(cache)
    assert rebuilt == entry and ref._read_entry(rebuilt)["key"] == entry.stem  # rebuilt in its place


def test_no_cache_neither_reads_nor_writes_the_cache(demo, model_folder, tmp_path, monkeypatch):
    monkeypatch.setenv(ref.CACHE_ENV, str(tmp_path / "env-cache"))
    assert score(model_folder, demo.batch, demo.records, tmp_path / "out", "--no-cache") == 0
    assert not (tmp_path / "env-cache").exists()
    # Without --cache-dir the cache is $PIPELINE_CACHE_DIR.
    assert score(model_folder, demo.batch, demo.records, tmp_path / "cached") == 0
    assert len(entries(tmp_path / "env-cache")) == 1
    assert outputs(tmp_path / "cached") == outputs(tmp_path / "out")


def test_an_unwritable_cache_folder_costs_a_warning_only(demo, model_folder, tmp_path, caplog):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="pipeline.reference"):
        assert (
            score(model_folder, demo.batch, demo.records, tmp_path / "out", "--cache-dir", str(blocked)) == 0
        )
    assert any("cannot write" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "out" / s.FLAGS_FILE).is_file()


def test_the_key_follows_the_bytes_the_model_and_the_columns(demo, model_folder, tmp_path):
    bundle = ModelBundle.load(model_folder)
    copy = tmp_path / "copy.csv"
    copy.write_bytes(demo.records.read_bytes())
    key = ref.reference_key(bundle, copy, DETECT)
    os.utime(copy, (1_000_000_000, 1_000_000_000))  # re-exported, same rows: still the same state
    assert ref.reference_key(bundle, copy, DETECT) == key
    assert ref.reference_key(bundle, demo.records, DETECT) == key  # where it lies does not matter
    copy.write_bytes(demo.records.read_bytes() + b"\n")
    assert ref.reference_key(bundle, copy, DETECT) != key
    copy.write_bytes(demo.records.read_bytes())
    other_model = ModelBundle.load(model_folder)
    other_model.digest = "0" * 64
    assert ref.reference_key(other_model, copy, DETECT) != key
    fewer = bundle.config.model_copy(
        update={"fields": {k: v for k, v in bundle.config.fields.items() if k != "street"}}
    )
    assert ref.reference_key(ModelBundle.load(model_folder), copy, DETECT) == key
    narrower = ModelBundle.load(model_folder)
    narrower.config = fewer
    assert ref.reference_key(narrower, copy, DETECT) != key


def test_a_model_never_saved_is_prepared_without_the_cache(demo, model_folder, tmp_path):
    bundle = ModelBundle.load(model_folder)
    bundle.digest = ""
    cache = ref.ReferenceCache(tmp_path / "cache")
    prepared = ref.prepare_reference(bundle, demo.records, cache=cache)
    assert prepared.rows == len(prepared.ids) > 0
    assert not (tmp_path / "cache").exists()


def test_only_the_most_recently_used_entries_are_kept(tmp_path):
    cache = ref.ReferenceCache(tmp_path, keep=2)
    for age, name in enumerate(["c", "b", "a"]):  # a is the oldest
        path = cache.entry(name * 64)
        path.write_bytes(b"x")
        os.utime(path, (1_000_000 - age * 1000, 1_000_000 - age * 1000))
    cache.prune()
    assert [p.stem[0] for p in entries(tmp_path)] == ["b", "c"]


@pytest.mark.parametrize("problem", ["missing", "empty", "repeated id"])
def test_a_bad_reference_is_bad_input_with_the_cache_too(demo, model_folder, tmp_path, capsys, problem):
    reference = tmp_path / "reference.csv"
    if problem == "empty":
        reference.write_bytes(b"")
    elif problem == "repeated id":
        lines = demo.records.read_text(encoding="utf-8").splitlines(keepends=True)
        reference.write_text("".join([*lines, lines[1]]), encoding="utf-8")
    args = ("--cache-dir", str(tmp_path / "cache"))
    assert score(model_folder, demo.batch, reference, tmp_path / "out", *args) == 2
    assert str(reference) in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not entries(tmp_path / "cache")
