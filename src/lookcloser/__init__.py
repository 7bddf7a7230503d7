"""lookcloser: fine-grained visual categorization with one clean interface."""

__version__ = "0.1.0"

from lookcloser.errors import (  # noqa: E402
    BadImageError,
    ConfigError,
    DataError,
    LookcloserError,
    ModelDirError,
    WeightsError,
)

__all__ = [
    "__version__",
    "BadImageError",
    "ConfigError",
    "DataError",
    "LookcloserError",
    "ModelDirError",
    "WeightsError",
]
