"""What a training start pays to prepare an unchanged folder, the first time and again.

    python benchmarks/second_start.py FOLDER [--rounds 2]

Runs `prepare_data` on an ImageFolder tree `rounds` times in one process, with a verification
cache of its own (a fresh folder under the system's temp dir, so the first round is cold), and
prints each round's wall time, images decoded and files read to hash (counted by wrapping the
decoder and the digest function), and the peak RSS. Issue 25: the second start on an
unchanged folder decodes nothing and reads no image.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    os.environ["LOOKCLOSER_CACHE"] = tempfile.mkdtemp(prefix="lookcloser-second-start-")

    import lookcloser.data.duplicates as duplicates
    import lookcloser.data.images as images
    from lookcloser.config import DataConfig
    from lookcloser.data.prepare import prepare_data

    calls = {"decodes": 0, "digests": 0}

    def counted(name, fn):
        def wrapper(*a, **k):
            calls[name] += 1
            return fn(*a, **k)

        return wrapper

    images.decode_bytes = counted("decodes", images.decode_bytes)
    duplicates._digest = counted("digests", duplicates._digest)
    cfg = DataConfig(source="imagefolder", root=args.folder)
    first = None
    for n in range(1, args.rounds + 1):
        calls.update(decodes=0, digests=0)
        start = time.perf_counter()
        data = prepare_data(cfg, progress=False)
        wall = time.perf_counter() - start
        first = first or wall
        images_total = len(data.train) + len(data.val) + len(data.test)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(
            f"start {n}: {wall:.1f} s ({wall / first:.2f}x the first), {images_total:,} images, "
            f"{calls['decodes']:,} decoded, {calls['digests']:,} read to hash, "
            f"peak RSS {rss:.0f} MB",
            flush=True,
        )


if __name__ == "__main__":
    main()
