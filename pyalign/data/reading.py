"""What a data source is (:class:`DataSource`) and reading its rows: JSONL line by line (errors
name the line), every other file or folder, and hub data sets, through ``datasets``."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyalign.data.pairs import read_jsonl_records
from pyalign.data.relabel import RelabelSpec

DATASETS_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".tsv": "csv",
                     ".arrow": "arrow"}
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4")


@dataclass(frozen=True)
class DataSource:
    path: str | None = None  # local file or folder (absolute)
    name: str | None = None  # hub data set
    config: str | None = None  # datasets config name (e.g. PKU-SafeRLHF "alpaca-7b")
    data_dir: str | None = None  # folder inside the data set (e.g. hh-rlhf "harmless-base")
    split: str = "train"
    revision: str | None = None
    schema: str | None = None  # None: guessed from the columns
    dimension: str | None = None
    relabel: RelabelSpec | None = None
    on_bad_row: str = "fail"
    limit: int | None = None  # first N rows only
    cache_dir: str | None = None  # datasets cache (default $HF_DATASETS_CACHE)

    @property
    def label(self) -> str:
        """How messages name the source: the file, or the folder / hub set with its split."""
        if self.path is not None and Path(self.path).is_file():
            return self.path
        extra = "".join(f", {k} {getattr(self, k)}" for k in ("config", "data_dir") if getattr(self, k))
        return f"{self.path or self.name} [{self.split}{extra}]"


@dataclass
class RowTable:
    rows: Iterable[tuple[int, Any]]  # (row index, row), lazily
    columns: list[str]
    first: Any
    describe: Callable[[int], str]  # where row i is, for messages


@contextlib.contextmanager
def _quiet_datasets():
    """No progress bars or info logs from ``datasets`` while pyalign reads (it reports itself)."""
    import datasets  # noqa: PLC0415

    bars_were_on = not datasets.utils.are_progress_bars_disabled()
    verbosity = datasets.utils.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    try:
        yield
    finally:
        datasets.utils.logging.set_verbosity(verbosity)
        if bars_were_on:
            datasets.enable_progress_bars()


def _datasets_builder(path: Path) -> tuple[str | None, dict]:
    """The ``datasets`` builder for a file (by its suffix, compression aside) and its options."""
    name = path.name.lower()
    for suffix in COMPRESSION_SUFFIXES:
        name = name.removesuffix(suffix)
    suffix = Path(name).suffix
    return DATASETS_SUFFIXES.get(suffix), ({"delimiter": "\t"} if suffix == ".tsv" else {})


def _load_with_datasets(source: DataSource):
    import datasets  # noqa: PLC0415

    from pyalign.data.hub import load_hub_dataset  # noqa: PLC0415

    with _quiet_datasets():
        if source.name is not None:
            return load_hub_dataset(source.name, config=source.config, data_dir=source.data_dir, split=source.split,
                                    revision=source.revision, cache_dir=source.cache_dir)
        path = Path(source.path)
        try:
            if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
                loaded = datasets.load_from_disk(str(path))
                if isinstance(loaded, datasets.DatasetDict):
                    if source.split not in loaded:
                        raise ValueError(f"{path}: split: no split {source.split!r} (splits: {', '.join(loaded)})")
                    loaded = loaded[source.split]
                return loaded
            if path.is_dir():
                return datasets.load_dataset(str(path), name=source.config, data_dir=source.data_dir,
                                             split=source.split, cache_dir=source.cache_dir)
            builder, options = _datasets_builder(path)
            if builder is None:
                raise ValueError(f"{path}: unknown file type; expected one of "
                                 f"{', '.join(DATASETS_SUFFIXES)} (optionally compressed), or a folder")
            return datasets.load_dataset(builder, data_files={"train": str(path)}, split="train",
                                         cache_dir=source.cache_dir, **options)
        except ValueError:
            raise
        except Exception as error:  # noqa: BLE001 - datasets raises many types; say which file failed
            raise ValueError(f"{path}: datasets could not read it ({type(error).__name__}: {error})") from None


def read_rows(source: DataSource) -> RowTable:
    """The rows of ``source`` (JSONL line by line, everything else through ``datasets``)."""
    if source.path is not None and Path(source.path).is_file() and Path(source.path).suffix.lower() == ".jsonl":
        records = list(read_jsonl_records(source.path))
        lines = [line for line, _ in records]
        rows = [(i, record) for i, (_, record) in enumerate(records)]
        first = rows[0][1] if rows else None
        columns = sorted(first) if isinstance(first, dict) else []
        if source.limit is not None:
            rows = rows[: source.limit]
        return RowTable(rows, columns, first, lambda i: f"{source.path}:{lines[i]} (row {i})")
    dataset = _load_with_datasets(source)
    count = len(dataset) if source.limit is None else min(len(dataset), source.limit)
    first = dataset[0] if count else None
    rows = enumerate(itertools.islice(iter(dataset), count))
    return RowTable(rows, list(dataset.column_names), first, lambda i: f"{source.label} row {i}")
