"""What feeds the streams: task families (``families/``), JSONL task files, the task producer,
expert seeding, replay, chunk-level resampling."""
