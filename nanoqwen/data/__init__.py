"""Data: corpora (`sources`), tokenized train/val shards (`prepare`), and batches for training (`loader`).

The Python API: `nanoqwen.data.prepare.prepare(...)` and `nanoqwen.data.prepare.load_meta(folder)`;
`nanoqwen.data.sources.open_corpus(spec)` for the documents themselves (texts, and ChatRecords for chat
records).
"""
