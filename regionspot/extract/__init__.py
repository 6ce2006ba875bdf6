"""The extraction stage: run frozen SAM + CLIP once over a dataset and write shards."""
