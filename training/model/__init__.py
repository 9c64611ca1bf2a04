"""Plain PyTorch: the network (frozen ResNet-50, adapters, heads), the meta-loss, one training
step, backbone weights, a checkpoint's typed state and adapters taken from another run.

Imports `training.config`, `cluster` and `data_prep.contract` only; never Ray, never the
other wings.
"""
