"""The training side: turns data into adapter folders (and, later, exports). It never imports `server`.

Entry points: `run_training(TrainConfig)` (training.runner), `evaluate_adapter(...)` (training.evaluate),
and the `training` console script (training.cli). Imports stay lazy here so `training --help` is quick.
"""
