"""The training stage: fit the fusion head from shards. Never imports the backbones."""
