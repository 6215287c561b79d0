"""Text for calibration and evaluation: built-in offline corpora, local files, hub datasets."""

from prunesearch.data.corpora import BUILTIN_CORPORA, load_corpus
from prunesearch.data.sequences import token_sequences

__all__ = ["BUILTIN_CORPORA", "load_corpus", "token_sequences"]
