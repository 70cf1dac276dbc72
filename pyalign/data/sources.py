"""Data sources: where preference data comes from, and the pairs it yields (docs/data.md).

A source is a path string (a local file or folder, as before) or a mapping::

    {path: FILE_OR_FOLDER | name: HUB_NAME, schema, dimension, split, config, data_dir, revision,
     relabel, on_bad_row, limit, cache_dir}

- ``path``: a JSONL file (read line by line, so errors name the line), any other file ``datasets``
  reads (``.json``, ``.jsonl.gz``, ``.parquet``, ``.csv``, ``.tsv``, ``.arrow``), a folder written by
  ``Dataset.save_to_disk``, or a folder of data files (e.g. a downloaded hub repository);
- ``name``: a Hugging Face hub data set, used from the local cache or downloaded when the hub
  answers (:mod:`pyalign.data.hub`: never a hang when it does not);
- ``schema``: how rows map to pairs (:mod:`pyalign.data.adapters`), guessed from the columns when
  left out; ``dimension``: which pair stream of a multi-dimension schema;
- ``relabel: reward_augmented``: reward-conditioned pairs (:mod:`pyalign.data.relabel`);
- ``on_bad_row``: ``fail`` (default: the error names the row index and the field) or ``skip``
  (skipped rows are counted and the first ones logged);
- ``limit``: only the first N rows of the split.

:func:`load_pairs` gives the pairs, :func:`fingerprint` the key of what was loaded (for caches),
:func:`check_data_source` validates a source for a config field.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pyalign.data.adapters import ADAPTERS, SCHEMAS, Adapter, get_adapter, guess_schema
from pyalign.data.pairs import PreferencePair, RatingRecord, RowError, prompt_json
from pyalign.data.reading import COMPRESSION_SUFFIXES, DATASETS_SUFFIXES, DataSource, RowTable, read_rows
from pyalign.data.relabel import DEFAULT_TEMPLATE, METHODS, RelabelSpec, reward_augmented
from pyalign.io import file_fingerprint

logger = logging.getLogger("pyalign.data")
ON_BAD_ROW = ("fail", "skip")
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class BadRowError(ValueError):
    """A row does not fit the schema (``on_bad_row: fail``); names the row index and the field."""

    def __init__(self, message: str, index: int, field: str):
        super().__init__(message)
        self.index, self.field = index, field


@dataclass
class LoadReport:
    source: str
    schema: str
    dimension: str | None
    rows: int = 0
    pairs: int = 0
    skipped: list = field(default_factory=list)  # (row index, field, message)
    relabel_dropped_ties: int = 0

    def summary(self) -> str:
        text = f"{self.source}: {self.rows} rows, schema {self.schema}"
        text += f", dimension {self.dimension}" if self.dimension else ""
        text += f" -> {self.pairs} pairs"
        if self.skipped:
            text += f"; {len(self.skipped)} bad rows skipped"
        if self.relabel_dropped_ties:
            text += f"; {self.relabel_dropped_ties} tied pairs dropped by relabeling"
        return text


@dataclass
class LoadedPairs:
    pairs: list[PreferencePair]
    report: LoadReport
    fingerprint: str


# ----------------------------------------------------------------------------- parsing sources

def _fail(where: str, expected: str, value: Any) -> ValueError:
    return ValueError(f"{where}: expected {expected}, got {value!r}")


def _optional_text(where: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise _fail(where, "a non-empty string", value)
    return value


def _local_path(where: str, value: Any) -> str:
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise _fail(where, "a path", value)
    path = Path(value).expanduser().resolve()
    if not path.exists():
        raise ValueError(f"{where}: file not found: {path}")
    return str(path)


def _relabel_spec(where: str, value: Any) -> RelabelSpec | None:
    if value is None or isinstance(value, RelabelSpec):
        return value
    if isinstance(value, str):
        value = {"method": value}
    if not isinstance(value, dict):
        raise _fail(where, f"one of {', '.join(METHODS)}, or a mapping with method", value)
    known = {f.name for f in fields(RelabelSpec)}
    for key in value:
        if key not in known:
            raise ValueError(f"{where}.{key}: unknown field (known: {', '.join(sorted(known))})")
    method = value.get("method")
    if method not in METHODS:
        raise _fail(f"{where}.method" if "method" in value and len(value) > 1 else where, f"one of {', '.join(METHODS)}", method)
    template = value.get("template", DEFAULT_TEMPLATE)
    if not isinstance(template, str) or "{score}" not in template:
        raise _fail(f"{where}.template", "a string containing {score}", template)
    score_range = value.get("score_range")
    if score_range is not None:
        if (not isinstance(score_range, (list, tuple)) or len(score_range) != 2
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in score_range)
                or score_range[0] >= score_range[1]):
            raise _fail(f"{where}.score_range", "[low, high] with low < high", score_range)
        score_range = (float(score_range[0]), float(score_range[1]))
    return RelabelSpec(method, template, score_range, _optional_text(f"{where}.score_name", value.get("score_name")))


def parse_source(value: Any, where: str = "source") -> DataSource:
    """A :class:`DataSource` from a path, a mapping (see the module docstring) or a DataSource.
    Errors name the field (``where.key``) and what was expected; a local path must exist."""
    if isinstance(value, DataSource):
        return value
    if isinstance(value, (str, os.PathLike)):
        return DataSource(path=_local_path(where, value))
    if not isinstance(value, dict):
        raise _fail(where, "a path or a mapping with path or name", value)
    value = {k: v for k, v in value.items() if v is not None}  # null means absent (as config.json writes it)
    known = [f.name for f in fields(DataSource)]
    for key in value:
        if key not in known:
            raise ValueError(f"{where}.{key}: unknown field (known: {', '.join(known)})")
    if ("path" in value) == ("name" in value):
        raise ValueError(f"{where}: give exactly one of path (a local file or folder) and name (a hub data set)")
    kwargs: dict[str, Any] = {}
    if "path" in value:
        kwargs["path"] = _local_path(f"{where}.path", value["path"])
    else:
        name = value["name"]
        if not isinstance(name, str) or not _HUB_NAME.fullmatch(name):
            raise _fail(f"{where}.name", "a hub data set name like owner/name", name)
        kwargs["name"] = name
    for key in ("config", "data_dir", "revision"):
        kwargs[key] = _optional_text(f"{where}.{key}", value.get(key))
    kwargs["split"] = _optional_text(f"{where}.split", value.get("split", "train")) or "train"
    schema = value.get("schema")
    if schema is not None:
        try:
            schema = get_adapter(schema).name
        except ValueError:
            raise _fail(f"{where}.schema", "one of " + ", ".join(SCHEMAS), schema) from None
    kwargs["schema"] = schema
    dimension = _optional_text(f"{where}.dimension", value.get("dimension"))
    if schema is None and dimension is not None:  # checked fully once the columns show the schema
        known = {name for a in ADAPTERS.values() for name in (*a.dimensions, *a.aliases)}
        if dimension not in known:
            raise _fail(f"{where}.dimension", "one of " + ", ".join(
                f"{a.name}: {'/'.join(a.dimensions)}" for a in ADAPTERS.values() if a.dimensions), dimension)
    if schema is not None:
        try:
            dimension = get_adapter(schema).dimension(dimension) if get_adapter(schema).has_pairs else dimension
        except ValueError as error:
            raise ValueError(f"{where}.{error}") from None
    kwargs["dimension"] = dimension
    kwargs["relabel"] = _relabel_spec(f"{where}.relabel", value.get("relabel"))
    on_bad_row = value.get("on_bad_row", "fail")
    if on_bad_row not in ON_BAD_ROW:
        raise _fail(f"{where}.on_bad_row", "fail or skip", on_bad_row)
    kwargs["on_bad_row"] = on_bad_row
    limit = value.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise _fail(f"{where}.limit", "a positive integer", limit)
    kwargs["limit"] = limit
    if value.get("cache_dir") is not None:
        cache_dir = value["cache_dir"]
        if not isinstance(cache_dir, (str, os.PathLike)) or not str(cache_dir).strip():
            raise _fail(f"{where}.cache_dir", "a path", cache_dir)
        kwargs["cache_dir"] = str(Path(cache_dir).expanduser().resolve())
    return DataSource(**kwargs)


def check_data_source(where: str, value: Any):
    """Config field check: a path string stays the resolved path string (as before); a mapping
    becomes a :class:`DataSource`. Raises ValueError starting with ``where``."""
    if isinstance(value, (str, os.PathLike)):
        return parse_source(value, where).path
    return parse_source(value, where)


def source_from_cli(text: str, **options) -> DataSource:
    """``pyalign data ... SOURCE``: an existing local path, else a hub name (``owner/name``)."""
    options = {k: v for k, v in options.items() if v is not None}
    if Path(text).expanduser().exists():
        return parse_source({"path": text, **options}, "SOURCE")
    if _HUB_NAME.fullmatch(text) and not Path(text).suffix.lower() in (*DATASETS_SUFFIXES, *COMPRESSION_SUFFIXES):
        return parse_source({"name": text, **options}, "SOURCE")
    raise FileNotFoundError(f"SOURCE: no such file or folder: {text} (and not a hub data set name like owner/name)")


# ----------------------------------------------------------------------------- pairs

def schema_adapter(source: DataSource, table: RowTable) -> Adapter:
    """The source's schema, or the one its columns show."""
    if source.schema is not None:
        return get_adapter(source.schema)
    try:
        return get_adapter(guess_schema(table.columns, table.first))
    except ValueError as error:
        raise ValueError(f"{source.label}: {error}") from None


def resolve_schema(source: DataSource, table: RowTable) -> tuple[Adapter, str | None]:
    adapter = schema_adapter(source, table)
    dimension = source.dimension
    if adapter.has_pairs:
        try:
            dimension = adapter.dimension(source.dimension)
        except ValueError as error:
            raise ValueError(f"{source.label}: {error}") from None
    return adapter, dimension


def _error_handler(source: DataSource, table: RowTable, report: LoadReport):
    def on_error(index: int, error: RowError) -> None:
        message = f"{table.describe(index)}: {error}"
        if source.on_bad_row == "fail":
            raise BadRowError(message + " (on_bad_row: skip skips such rows)", index, error.field)
        report.skipped.append((index, error.field, message))
    return on_error


def _counted(rows: Iterable, report: LoadReport) -> Iterator:
    for item in rows:
        report.rows += 1
        yield item


def _relabel(source: DataSource, adapter: Adapter, dimension: str | None, pairs, report: LoadReport):
    spec = source.relabel
    name = spec.score_name or (dimension.capitalize() if dimension and adapter.name == "helpsteer2" else "Overall")
    score_range = spec.score_range or adapter.score_range
    for index, pair in pairs:
        relabelled, ties = reward_augmented([pair], score_range=score_range, name=name, template=spec.template)
        report.relabel_dropped_ties += ties
        for new in relabelled:
            yield index, new


def iter_pairs(source: Any) -> tuple[Iterator[tuple[int, PreferencePair]], LoadReport]:
    """``(row index, pair)`` lazily (``pyalign data inspect`` stops after the first few), and the
    report that fills in as the iterator runs."""
    source = parse_source(source)
    table = read_rows(source)
    adapter, dimension = resolve_schema(source, table)
    if not adapter.has_pairs:
        raise ValueError(f"{source.label}: schema {adapter.name} holds rating records, not pairs")
    report = LoadReport(source.label, adapter.name, dimension)
    pairs = adapter.pairs(_counted(table.rows, report), dimension, _error_handler(source, table, report))
    if source.relabel is not None:
        pairs = _relabel(source, adapter, dimension, pairs, report)
    return pairs, report


def pairs_fingerprint(pairs: Iterable[PreferencePair]) -> str:
    """sha256 of what decides the token ids: each pair's prompt, system, chosen and rejected."""
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(json.dumps([prompt_json(pair.prompt), pair.system, pair.chosen, pair.rejected],
                                 ensure_ascii=False).encode())
        digest.update(b"\n")
    return "pairs-sha256:" + digest.hexdigest()


def _is_plain_jsonl_of_pairs(source: DataSource, schema: str) -> bool:
    return (source.path is not None and source.path.lower().endswith(".jsonl") and schema == "pairs"
            and source.relabel is None and source.limit is None)


_MEMO: dict[tuple, LoadedPairs] = {}


def _memo_key(source: DataSource) -> tuple:
    if source.path is None:
        return (source,)
    stats = [(str(p), p.stat().st_mtime_ns, p.stat().st_size)
             for p in ([Path(source.path)] if Path(source.path).is_file() else sorted(Path(source.path).rglob("*")))
             if p.is_file()]
    return (source, tuple(stats))


def load_source(source: Any) -> LoadedPairs:
    """All pairs of ``source``, the load report and the fingerprint of the pairs loaded. Memoised
    per process (a local file is re-read when it changes)."""
    source = parse_source(source)
    key = _memo_key(source)
    if key in _MEMO:
        return _MEMO[key]
    iterator, report = iter_pairs(source)
    pairs = [pair for _, pair in iterator]
    report.pairs = len(pairs)
    if report.skipped:
        shown = "\n  ".join(message for _, _, message in report.skipped[:3])
        logger.warning("%s: skipped %d bad row(s) of %d; the first:\n  %s", source.label, len(report.skipped),
                       report.rows, shown)
    if not pairs:
        raise ValueError(f"{source.label}: no preference pairs ({report.summary()})")
    # A plain JSONL file of pairs keeps the fingerprint it always had (its bytes), so caches and
    # finished rounds made before data sources existed stay valid; any other source is keyed by
    # the pairs it yielded.
    fingerprint = file_fingerprint(source.path) if _is_plain_jsonl_of_pairs(source, report.schema) \
        else pairs_fingerprint(pairs)
    loaded = LoadedPairs(pairs, report, fingerprint)
    _MEMO[key] = loaded
    return loaded


def load_pairs(source: Any) -> list[PreferencePair]:
    """The preference pairs of ``source`` (a path, a mapping or a :class:`DataSource`)."""
    return load_source(source).pairs


def fingerprint(source: Any) -> str:
    """Key of the data ``source`` yields now (changes when the loaded pairs change)."""
    return load_source(source).fingerprint


def load_ratings(source: Any) -> list[RatingRecord]:
    """Rating records ``{prompt, response, ratings}`` of ``source`` (helpsteer2 or ratings schema)."""
    source = parse_source(source)
    table = read_rows(source)
    adapter = schema_adapter(source, table)
    report = LoadReport(source.label, adapter.name, None)
    records = [r for _, r in adapter.ratings(_counted(table.rows, report), _error_handler(source, table, report))]
    if report.skipped:
        logger.warning("%s: skipped %d bad row(s) of %d", source.label, len(report.skipped), report.rows)
    if not records:
        raise ValueError(f"{source.label}: no rating records")
    return records
