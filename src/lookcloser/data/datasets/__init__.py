"""The standard FGVC benchmarks as data sources, each parsing its official release layout.

Importing this package registers cub200, nabirds, cars, aircraft, dogs, flowers102 and inat.
"""

from lookcloser.data.datasets import (  # noqa: F401
    aircraft,
    cars,
    cub,
    dogs,
    flowers,
    inat,
    nabirds,
)
