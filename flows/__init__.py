"""Prefect flows of the pipeline (clean -> tokenizer -> shard -> pretrain -> evaluate) with MLflow
tracking of every stage, and the embedded demo (``flows.demo``) that runs it on a generated corpus."""

import os

# Prefect's server sends usage analytics unless told not to; a pipeline run stays offline. Set
# before any flow starts its server (which inherits the environment); a user's own setting wins.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Its temporary server gives up after 20 s by default; a busy 2-core machine needs longer.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
