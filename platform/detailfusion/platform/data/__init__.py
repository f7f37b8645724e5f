"""Ray Data jobs: prepare (read, validate, decode -> canonical parquet shards), training input, feature cache."""
