"""What a user runs: the `metatrainer` command (`main`) and a module per subcommand (train,
evaluate, demo, tune, predict, report; `data_prep.cli` has prep), with the training flags
(`flags`). Modules here import Ray, torch and the wings below lazily where they can, so that
`metatrainer --help` stays quick.
"""
