"""Prefect flows of the pipeline (clean -> tokenizer -> shard -> pretrain -> evaluate) with MLflow
tracking of every stage, and the embedded demo (``flows.demo``) that runs it on a generated corpus."""
