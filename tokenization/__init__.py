"""The data stages, without torch: clean raw text into ``documents.parquet``, train the byte-level
BPE tokenizer on it (recipe §4), and encode the documents into Arrow token shards for pretraining."""
