"""Errors a user can cause when training or evaluating; the CLI prints them on one line and exits 2."""


class TrainingError(ValueError):
    """Base class: the request cannot be carried out as given, and the message says why."""


class ConfigError(TrainingError):
    """A TrainConfig field is out of range or inconsistent with the base or data."""


class DatasetError(TrainingError):
    """A data set is unknown, missing, malformed or empty; the message names the file, line and reason."""

