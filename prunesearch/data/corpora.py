"""Text corpora through ``datasets``: built-in offline corpora, local files, hub datasets.

The built-in corpora ship inside PyPI packages, so calibration works with no network:
``wikipedia`` (gensim's English Wikipedia test excerpt, markup stripped), ``lee`` (the Lee news
corpus beside it) and ``pydoc`` (the standard library's help topics, a small fallback).
"""

from __future__ import annotations

import bz2
import importlib.util
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import datasets

from prunesearch.cache import cache_dir
from prunesearch.errors import UserError

BUILTIN_CORPORA = {
    "wikipedia": "2016 English Wikipedia excerpt from gensim's test data (~105 articles, ~700k tokens)",
    "lee": "Lee news corpus from gensim's test data (300 short news documents, ~80k tokens)",
    "pydoc": "Python's built-in help topics (small fallback)",
}
FILE_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

datasets.disable_progress_bars()


def _gensim_test_data() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the built-in corpora need the package gensim (pip install gensim==4.4.0)")
    return Path(spec.submodule_search_locations[0]) / "test" / "test_data"


def _wiki_articles(path: Path) -> list[str]:
    from gensim.corpora.wikicorpus import filter_wiki

    docs = []
    with bz2.open(path, "rb") as fh:
        for _event, elem in ET.iterparse(fh):
            if not elem.tag.endswith("}page") and elem.tag != "page":
                continue
            text_el = next((e for e in elem.iter() if e.tag.endswith("text")), None)
            raw = (text_el.text or "") if text_el is not None else ""
            elem.clear()
            if not raw.strip() or raw.lstrip().upper().startswith("#REDIRECT"):
                continue
            text = re.sub(r"'{2,}", "", filter_wiki(raw))  # bold/italic quotes
            lines = [re.sub(r"[ \t]+", " ", re.sub(r"^=+\s*(.*?)\s*=+$", r"\1", line.strip())) for line in text.splitlines()]
            lines = [l for l in lines if len(l) > 1 and not re.fullmatch(r"[\W\d_]+", l) and not l.startswith(("|", "!"))]
            text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
            if len(text) > 200:
                docs.append(text)
    return docs


def _builtin_documents(name: str) -> tuple[list[str], str]:
    """Documents of a built-in corpus, and a fingerprint of the files it came from."""
    if name == "pydoc":
        import pydoc_data.topics as topics

        return [t for t in topics.topics.values() if t.strip()], "pydoc"
    path = _gensim_test_data() / (WIKI_FILE if name == "wikipedia" else "lee_background.cor")
    if not path.exists():
        raise UserError(f"built-in corpus '{name}' is missing from the gensim install ({path})")
    stat = path.stat()
    fingerprint = f"{name}-{stat.st_size}-{int(stat.st_mtime)}"
    if name == "lee":
        return [l.strip() for l in path.read_text(encoding="utf-8", errors="replace").splitlines() if l.strip()], fingerprint
    return _wiki_articles(path), fingerprint


def _builtin(name: str) -> datasets.Dataset:
    """Parsed once (the Wikipedia dump takes seconds), then read from a parquet cache."""
    if name == "pydoc":
        return datasets.Dataset.from_dict({"text": _builtin_documents(name)[0]})
    path = _gensim_test_data() / (WIKI_FILE if name == "wikipedia" else "lee_background.cor")
    stat = path.stat() if path.exists() else None
    cached = cache_dir("corpora") / f"{name}-v2-{stat.st_size if stat else 0}-{int(stat.st_mtime) if stat else 0}.parquet"
    if not cached.exists():
        docs, _ = _builtin_documents(name)
        tmp = cached.with_suffix(".tmp.parquet")
        datasets.Dataset.from_dict({"text": docs}).to_parquet(str(tmp))
        tmp.replace(cached)
    return datasets.Dataset.from_parquet(str(cached), cache_dir=str(cache_dir("datasets")))


def _local(path: Path, text_field: str) -> datasets.Dataset:
    files = sorted(p for p in path.rglob("*") if p.suffix in FILE_BUILDERS) if path.is_dir() else [path]
    if not files:
        raise UserError(f"no text files (.txt, .json, .jsonl, .parquet, .csv) in {path}")
    builders = {FILE_BUILDERS.get(p.suffix) for p in files}
    if None in builders:
        raise UserError(f"cannot read {path}: use .txt, .json, .jsonl, .parquet or .csv")
    if len(builders) > 1:
        raise UserError(f"{path} mixes file types ({', '.join(sorted(builders))}): use one kind per directory")
    builder = builders.pop()
    if all(p.stat().st_size == 0 or not p.read_bytes().strip() for p in files):
        raise UserError(f"text source '{path}' holds no text")
    kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
    ds = datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train",
                               cache_dir=str(cache_dir("datasets")), **kwargs)
    if builder != "text" and text_field not in ds.column_names:
        raise UserError(f"{path} has no column '{text_field}' (it has: {', '.join(ds.column_names)}): set text_field")
    return ds if builder == "text" else ds.rename_column(text_field, "text") if text_field != "text" else ds


def _looks_like_path(source: str) -> bool:
    return "/" in source and (source.startswith((".", "/", "~")) or Path(source).suffix in FILE_BUILDERS) or Path(source).suffix in FILE_BUILDERS


def _hub(source: str, text_field: str) -> datasets.Dataset:
    name, config, split = (source.split(":") + [None, None])[:3]
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train", cache_dir=str(cache_dir("datasets")))
    except Exception as exc:  # offline, unknown name, gated: all the same to the user
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"text source '{source}' is not a built-in corpus ({', '.join(BUILTIN_CORPORA)}), not a local "
                        f"file, and the hub could not provide it: {reason[:200]}") from None
    if text_field not in ds.column_names:
        raise UserError(f"hub dataset '{source}' has no column '{text_field}' (it has: {', '.join(ds.column_names)})")
    return ds.rename_column(text_field, "text") if text_field != "text" else ds


def load_corpus(source: str, text_field: str = "text") -> datasets.Dataset:
    """Documents of ``source`` as a Dataset with a ``text`` column, empty documents dropped."""
    if source in BUILTIN_CORPORA:
        ds = _builtin(source)
    else:
        path = Path(source).expanduser()
        if path.exists():
            ds = _local(path, text_field)
        elif _looks_like_path(source):
            raise UserError(f"text file not found: {source}")
        else:
            ds = _hub(source, text_field)
    ds = ds.select_columns(["text"]).filter(lambda t: bool(t and t.strip()), input_columns="text")
    if len(ds) == 0:
        raise UserError(f"text source '{source}' holds no text")
    return ds
