"""The CLI's bad-input error, shared by the modules that hold its commands."""


class UsageError(ValueError):
    """Bad input on the command line or in a config: exit code 2, one line."""


def positive(name: str, value: int) -> None:
    if value < 1:
        raise UsageError(f"{name} must be >= 1, got {value}")
