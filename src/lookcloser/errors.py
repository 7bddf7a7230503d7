"""Exceptions with messages meant for users: each names the file, key or value at fault."""


class LookcloserError(Exception):
    """Base class for errors the CLI reports as one line, without a traceback."""


class ConfigError(LookcloserError, ValueError):
    """A config key or value is unknown or of the wrong type."""


class DataError(LookcloserError):
    """A dataset is missing, malformed or inconsistent."""


class BadImageError(DataError):
    """An image file cannot be decoded; the message names the file."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class BadImagesError(DataError):
    """Several image files cannot be decoded; the message names every one with its reason."""

    def __init__(self, bad: list[tuple[str, str]], total: int, hint: str = ""):
        self.bad = bad
        listed = "; ".join(f"{path} ({reason})" for path, reason in bad)
        super().__init__(f"{len(bad)} unreadable image(s) of {total}: {listed}{hint}")


class WeightsError(LookcloserError):
    """Pretrained or checkpoint weights cannot be found or do not fit the model."""


class ModelDirError(LookcloserError):
    """A model directory is missing, incomplete or corrupt."""


# How a user skips unreadable images, in both the CLI's and the API's words.
SKIP_BAD_IMAGES_HINT = (
    "; pass --on-bad-image skip (on_bad_image='skip' from Python) to predict the others"
)


def unwrapped(err: BaseException) -> BaseException:
    """The user's error inside one that a DataLoader worker re-raised, else `err` itself.

    torch re-raises an exception from a worker process as `Caught DataError in DataLoader
    worker process 0. Original Traceback ...` (a RuntimeError where the type cannot be
    rebuilt from one string, as BadImageError); the CLI should print the original line.
    """
    text = str(err)
    if not text.startswith("Caught ") or "\nOriginal Traceback" not in text:
        return err
    name, sep, message = text.rstrip().splitlines()[-1].partition(": ")
    cls = globals().get(name.rpartition(".")[2])
    if not sep or not isinstance(cls, type) or not issubclass(cls, LookcloserError):
        return err
    try:
        return cls(message)
    except TypeError:  # a constructor of several arguments (BadImageError)
        return DataError(message)
