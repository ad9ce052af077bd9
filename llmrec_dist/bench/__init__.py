"""Benchmarks: `llmrec-dist bench quality | speed | ingest | memory | towers | report`."""
