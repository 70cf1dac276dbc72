"""Preference data: records, data-set adapters, sources, tokenisation, CLAIR and relabeling.

- :mod:`pyalign.data.pairs`: the records (``PreferencePair``, ``RatingRecord``) and pyalign's JSONL;
- :mod:`pyalign.data.adapters`: data-set schemas (PKU-SafeRLHF, HelpSteer2, UltraFeedback,
  HH-RLHF, chat messages) -> records;
- :mod:`pyalign.data.sources`: where data comes from (local files of any format ``datasets``
  reads, hub names), ``load_pairs``, ``fingerprint``; :mod:`pyalign.data.reading` reads the rows
  and :mod:`pyalign.data.hub` loads hub data sets without hanging offline;
- :mod:`pyalign.data.tokenize`: chat-templated tokenisation, truncation, ``[2B, T]`` batches;
- :mod:`pyalign.data.relabel`: reward-augmented relabeling;
- :mod:`pyalign.data.clair`: CLAIR revision pairs (:mod:`pyalign.data.chat_client`: OpenAI-compatible
  endpoints); :mod:`pyalign.data.cli`: ``pyalign data inspect|export|clair``.

docs/data.md describes every schema mapping with examples.
"""

from pyalign.data.pairs import PreferencePair, RatingRecord, RowError, load_preference_pairs, write_preference_pairs
from pyalign.data.sources import (
    BadRowError, DataSource, LoadReport, check_data_source, fingerprint, load_pairs, load_ratings, load_source,
    parse_source,
)
from pyalign.data.tokenize import (
    IGNORE_INDEX, TOKENIZATION_VERSION, PreferenceDataset, TokenizedPair, check_token_ids, collate_pairs, encode_prompt,
    encode_response, file_fingerprint, pad_token_id, prompt_messages, tokenization_fingerprint, tokenize_pair,
    truncate_pair,
)

# The data fingerprint of a source, under the name the training code uses for it.
data_fingerprint = fingerprint

__all__ = [
    "IGNORE_INDEX", "TOKENIZATION_VERSION", "BadRowError", "DataSource", "LoadReport", "PreferenceDataset",
    "PreferencePair", "RatingRecord", "RowError", "TokenizedPair", "check_data_source", "check_token_ids",
    "collate_pairs",
    "data_fingerprint", "encode_prompt", "encode_response", "file_fingerprint", "fingerprint",
    "load_pairs", "load_preference_pairs", "load_ratings", "load_source", "pad_token_id", "parse_source",
    "prompt_messages", "tokenization_fingerprint", "tokenize_pair", "truncate_pair", "write_preference_pairs",
]
