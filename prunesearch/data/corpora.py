"""Text corpora through ``datasets``: built-in offline corpora, local files, hub datasets.

A source string is one of:

* a built-in corpus name (``wikipedia``, ``lee``, ``pydoc``): text that ships inside installed
  PyPI packages, so calibration and evaluation work with no network;
* a local file or directory (``.txt``, ``.json``/``.jsonl``, ``.parquet``, ``.csv``);
* a Hugging Face hub dataset: ``NAME``, ``NAME:CONFIG`` or ``NAME:CONFIG:SPLIT`` (split
  defaults to ``train``; ``NAME::SPLIT`` skips the config).

Built-in names win over a local file of the same name: write ``./lee`` for the file.
"""

from __future__ import annotations

import bz2
import importlib.util
import os
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING

from prunesearch.cache import cache_dir
from prunesearch.errors import UserError

if TYPE_CHECKING:
    import datasets

BUILTIN_CORPORA = {
    "wikipedia": "English Wikipedia excerpt from gensim's test data (~105 articles, ~480k words), markup stripped",
    "lee": "Lee news corpus from gensim's test data (300 short news documents, ~60k words)",
    "pydoc": "Python's built-in help topics (~80 documents, small fallback)",
}
FILE_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
                 ".csv": "csv"}
GENSIM_FILES = {"wikipedia": "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
                "lee": "lee_background.cor"}
PARSER_VERSION = "4"  # bump when the parsing below changes, so cached corpora are rebuilt
_OFFLINE_HINT = (f"use a built-in offline corpus ({', '.join(BUILTIN_CORPORA)}) or a local "
                 f"{'/'.join(sorted(set(FILE_BUILDERS)))} file")



def _datasets():
    """The ``datasets`` library, imported on first use: it costs a second, and a run whose token
    streams are cached (every check before a job starts) never needs it."""
    import datasets

    datasets.disable_progress_bars()
    return datasets


def _gensim_file(name: str) -> Path:
    """The file behind a gensim-hosted built-in corpus, found without importing gensim.test."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the built-in corpus '{name}' needs the package gensim: install it, or {_OFFLINE_HINT}")
    path = Path(spec.submodule_search_locations[0]) / "test" / "test_data" / GENSIM_FILES[name]
    if not path.is_file():
        raise UserError(f"the built-in corpus '{name}' is missing from the gensim install ({path}): reinstall gensim")
    return path


# Leftovers filter_wiki does not remove: image options, gallery lines, table cells.
_IMAGE_OPTS = re.compile(r"\|\s*(alt=.*|thumb(nail)?|frameless|upright[=\d.]*|left|right|center|\d+(x\d+)?px)\s*$")
_GALLERY = re.compile(r"^[^|]*\.(jpe?g|png|gif|svg|tiff?)\|", re.IGNORECASE)
_JUNK_LINE = re.compile(r"[\W\d_]*|:?\d+(x\d+)?px|(File|Image|Category):.*|[|!].*", re.IGNORECASE)


def _clean_wiki(raw: str) -> str:
    """Plain text of one article: markup stripped, one paragraph per line, junk lines dropped."""
    from gensim.corpora.wikicorpus import filter_wiki

    lines = []
    for line in re.sub(r"'{2,}", "", filter_wiki(raw)).splitlines():  # '' and ''' are italic/bold
        line = re.sub(r"^=+\s*(.*?)\s*=+$", r"\1", line.strip())  # == Heading == -> Heading
        line = _GALLERY.sub("", re.sub(r"^[*#:;]+\s*", "", line))  # list markers, gallery file names
        line = re.sub(r"\s+", " ", _IMAGE_OPTS.sub("", line)).strip()
        if len(line) > 1 and not _JUNK_LINE.fullmatch(line):
            lines.append(line)
    return "\n".join(lines)


def _wiki_articles(path: Path) -> list[str]:
    """Articles of a MediaWiki XML dump (bz2), redirects and stubs dropped."""
    docs = []
    with bz2.open(path, "rb") as fh:
        for _event, elem in ET.iterparse(fh):
            if elem.tag.rsplit("}", 1)[-1] != "page":  # namespace-agnostic
                continue
            raw = next((e.text or "" for e in elem.iter() if e.tag.rsplit("}", 1)[-1] == "text"), "")
            elem.clear()
            if raw.strip() and not raw.lstrip().upper().startswith("#REDIRECT"):
                text = _clean_wiki(raw)
                if len(text) > 200:
                    docs.append(text)
    return docs


def _builtin_documents(name: str) -> list[str]:
    if name == "pydoc":
        import pydoc_data.topics

        return list(pydoc_data.topics.topics.values())
    path = _gensim_file(name)
    if name == "lee":
        return [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    return _wiki_articles(path)


def _builtin(name: str) -> datasets.Dataset:
    """Parsed once (the Wikipedia dump takes seconds), then read back from a parquet cache."""
    cached = cache_dir("corpora") / f"{corpus_fingerprint(name).replace(':', '-')}.parquet"
    if not cached.exists():
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        _datasets().Dataset.from_dict({"text": _builtin_documents(name)}).to_parquet(str(tmp))
        tmp.replace(cached)
    return _datasets().Dataset.from_parquet(str(cached), cache_dir=str(cache_dir("datasets")))


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FILE_BUILDERS
                  and not p.name.startswith("."))


def _local(path: Path, text_field: str) -> datasets.Dataset:
    """A file or directory through the matching ``datasets`` builder. Text files hold one
    document per blank-line-separated paragraph, or one per line when they have no blank lines."""
    files = _local_files(path)
    if not files:
        raise UserError(f"no text files in directory {path}: put .txt, .json, .jsonl, .parquet or .csv files in it")
    builders = {FILE_BUILDERS.get(p.suffix.lower()) for p in files}
    if None in builders:
        raise UserError(f"cannot read {path}: rename it to .txt, .json, .jsonl, .parquet or .csv to say its format")
    if len(builders) > 1:
        raise UserError(f"{path} mixes file types ({', '.join(sorted(builders))}): keep one kind per directory")
    builder = builders.pop()
    kwargs = {}
    if builder == "text":
        contents = [p.read_bytes().replace(b"\r\n", b"\n") for p in files]
        if not any(c.strip() for c in contents):
            raise UserError(f"text source '{path}' holds no text: give a file with some documents in it")
        kwargs["sample_by"] = "paragraph" if any(b"\n\n" in c.strip() for c in contents) else "line"
    ds = _datasets().load_dataset(builder, data_files=[str(p) for p in files], split="train",
                               cache_dir=str(cache_dir("datasets")), **kwargs)
    return _text_column(ds, text_field, str(path))


def _text_column(ds: datasets.Dataset, text_field: str, where: str) -> datasets.Dataset:
    if text_field not in ds.column_names:
        raise UserError(f"{where} has no column '{text_field}' (it has: {', '.join(ds.column_names)}): "
                        f"pick one with text_field")
    return ds.select_columns([text_field]).rename_column(text_field, "text") if text_field != "text" else ds


def _looks_like_path(source: str) -> bool:
    """``owner/name`` is a hub name; ``./x``, ``/x``, ``~/x``, ``a/b/c`` or ``x.txt`` are paths."""
    return (source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source
            or Path(source).suffix.lower() in FILE_BUILDERS)


def _hub(source: str, text_field: str) -> datasets.Dataset:
    name, config, split = (source.split(":", 2) + [None, None])[:3]
    try:
        ds = _datasets().load_dataset(name, config or None, split=split or "train")
    except Exception as exc:  # offline, unknown name, gated, bad config: all the same to the user
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise UserError(f"text source '{source}' is not a built-in corpus or a local file, and the Hugging Face hub "
                        f"could not provide it (unreachable offline, or no such dataset: {reason}): "
                        f"{_OFFLINE_HINT}") from None
    return _text_column(ds, text_field, f"hub dataset '{source}'")


def corpus_fingerprint(source: str) -> str:
    """What the text of ``source`` depends on: caches keyed by it are rebuilt when the text changes."""
    if source == "pydoc":
        return f"pydoc-py{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    if source in BUILTIN_CORPORA:
        stat = _gensim_file(source).stat()
        return f"{source}-v{PARSER_VERSION}-{stat.st_size}-{int(stat.st_mtime)}"
    path = Path(source).expanduser()
    if path.exists():
        stats = [f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in _local_files(path)]
        return f"{path.resolve()}|" + "|".join(stats)
    return f"hub:{source}"


def load_corpus(source: str, text_field: str = "text") -> datasets.Dataset:
    """Documents of ``source`` as a Dataset with one column, ``text``, one document per row,
    empty documents dropped. ``text_field`` names the text column of local tables and hub datasets."""
    if source in BUILTIN_CORPORA:
        ds = _builtin(source)
    else:
        path = Path(source).expanduser()
        if path.exists():
            ds = _local(path, text_field)
        elif _looks_like_path(source):
            raise UserError(f"calibration text file not found: {source}: give an existing file or directory, "
                            f"or a built-in corpus ({', '.join(BUILTIN_CORPORA)})")
        else:
            ds = _hub(source, text_field)
    ds = ds.select_columns(["text"]).filter(lambda t: bool(t and t.strip()), input_columns="text")
    if len(ds) == 0:
        raise UserError(f"text source '{source}' holds no text: give a source with some documents in it")
    return ds
