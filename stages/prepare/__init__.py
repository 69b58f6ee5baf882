"""prepare: read English instruction sets and EN<->AR parallel corpora in their many formats and
normalize them into two parquet schemas (conversations, pairs), with a quarantine for bad rows."""
