"""ImageFolder directories to WebDataset shards plus a manifest (the data contract)."""
