"""User-facing errors: the CLI prints these as one line, without a traceback."""


class CrackrayError(Exception):
    """A mistake the user can fix (bad path, bad config, bad data)."""


class ConfigError(CrackrayError):
    """A config file or override that does not validate; the message names the key."""


class DataError(CrackrayError):
    """A dataset on disk that cannot be read as asked; the message names the file."""
