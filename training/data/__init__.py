"""Shard bytes → batches: the data order (`order`), how a step is shared among datasets
(`mix`), reading a rank's partitions and cutting them into whole steps (`batches`), JPEG
decoding (`decode`), the local shard cache and the frozen backbone's feature cache.

Imports `training.model`, `training.config`, `cluster` and `data_prep`; never Ray's training
API, never `training.run` or `training.cli`.
"""
