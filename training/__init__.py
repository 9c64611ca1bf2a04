"""Meta-training on prepared shards, in four wings whose imports go one way:

    cli    what a user runs: train, evaluate, demo, tune, predict, report, and the
           `metatrainer` entry point (`training.cli.main`)
      ↓
    run    the Ray Train wiring: the per-worker loop, the driver, resume, the evaluation pass
      ↓
    data   shard bytes → batches: the data order, the mix, reading, decoding, caches
      ↓
    model  plain PyTorch: the network, the meta-loss, a step, weights, checkpoint state

`training.config` (the run's settings) sits beside them and imports none of them. A wing may
import the wings below it, never one above (`tests/test_layout.py` checks it).
"""
