"""What feeds the streams: task sets (built-in, JSONL, Parquet), replay, chunk-level resampling."""
