"""Build the bundled sample, src/cudacnn/data/sample/cifar10-sample.tar.gz: a stratified subset of the shared
CIFAR-10 JPEG set (200 train + 50 test images per class, 2,500 in all), the JPEG bytes copied unchanged.

    python scripts/make_sample.py [--source ../shared/data/cifar10-jpeg.tar.gz] [--out src/cudacnn/data/sample/cifar10-sample.tar.gz]

The selection is deterministic: per split and class, the file names are sorted and a numpy Generator seeded
with SEED draws the subset (kept in name order). The archive is byte-for-byte reproducible as well: members in
sorted order with fixed owner, mode and modification time, and a gzip header without a timestamp. Running
the script again on the same source therefore rewrites the same file (tests/test_sample.py checks this where
the shared set is present)."""

from __future__ import annotations

import argparse
import gzip
import io
import tarfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
OUT = REPO / "src" / "cudacnn" / "data" / "sample" / "cifar10-sample.tar.gz"
PER_CLASS = {"train": 200, "test": 50}
SEED = 0
ROOT = "cifar10-sample"
MTIME = 1_700_000_000  # fixed, so the archive's bytes depend on the images alone


def select(names: list[str], per_class: dict[str, int] = PER_CLASS, seed: int = SEED) -> list[str]:
    """The chosen member names of <root>/<split>/<class>/<file>: per_class[split] of each class, drawn from
    the sorted names with a generator seeded by (seed, split, class index)."""
    groups: dict[tuple[str, str], list[str]] = {}
    for name in names:
        parts = name.split("/")
        if len(parts) == 4 and parts[1] in per_class and parts[3].endswith(".jpg"):
            groups.setdefault((parts[1], parts[2]), []).append(name)
    chosen = []
    classes = sorted({cls for _, cls in groups})
    for split in sorted(per_class):
        for index, cls in enumerate(classes):
            members = sorted(groups[(split, cls)])
            if len(members) < per_class[split]:
                raise SystemExit(f"{split}/{cls} has {len(members)} images, fewer than {per_class[split]}")
            rng = np.random.default_rng([seed, sorted(per_class).index(split), index])
            picked = rng.choice(len(members), per_class[split], replace=False)
            chosen += [members[i] for i in sorted(picked)]
    return chosen


def build(source: Path, out: Path) -> list[str]:
    with tarfile.open(source, "r:*") as tar:
        contents = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    chosen = select(list(contents))
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(chosen):
            _, split, cls, file = name.split("/")
            info = tarfile.TarInfo(f"{ROOT}/{split}/{cls}/{file}")
            info.size, info.mtime, info.mode = len(contents[name]), MTIME, 0o644
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(contents[name]))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".part")
    with open(tmp, "wb") as handle, gzip.GzipFile(fileobj=handle, mode="wb", compresslevel=9, mtime=0,
                                                  filename="") as gz:
        gz.write(raw.getvalue())
    tmp.replace(out)
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=SOURCE)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    chosen = build(args.source, args.out)
    print(f"{args.out}: {len(chosen)} images, {args.out.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
