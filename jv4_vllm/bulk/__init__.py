"""Bulk jobs over whole inputs: ``jv4-vllm run-batch`` (OpenAI batch files) and ``jv4-vllm embed``
(corpora into Parquet and Qdrant). Both resume after a kill, shard by id and adapt their
concurrency to the service; see docs/bulk.md."""
