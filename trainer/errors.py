"""User-facing errors: the CLI prints their message as one line and exits with status 2."""


class TrainerError(Exception):
    """A problem with the user's input (config, data, model name, files) rather than a bug."""


class ConfigError(TrainerError):
    pass


class DataError(TrainerError):
    pass
