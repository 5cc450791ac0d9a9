"""`python -m prefixtuning.data download <dataset ...|all>`: fetch and verify the official data files
(data/download.py); `python -m prefixtuning.data list`: what each dataset holds and where it would go."""

from __future__ import annotations

import argparse
import sys

from ..errors import UserError
from .download import DATA_ENV, DATASETS, LICENSES, MIRROR_ENV, data_root, download, sources


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prefixtuning.data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("download", help="fetch and verify the official files of datasets")
    d.add_argument("datasets", nargs="+", choices=[*DATASETS, "all"], metavar="DATASET",
                   help=f"{', '.join(DATASETS)} or all")
    d.add_argument("--root", help=f"data root (default: ${DATA_ENV}, else ~/.cache/prefixtuning/data)")
    d.add_argument("--mirror", help=f"base URL of a mirror in the data root's layout (default: ${MIRROR_ENV})")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    sub.add_parser("list", help="datasets, files, sizes, licenses and the data root")
    args = parser.parse_args(argv)
    try:
        if args.command == "download":
            download(args.datasets, root=args.root, mirror=args.mirror, progress=not args.quiet)
        else:
            print(f"data root: {data_root()}")
            for name in DATASETS:
                files = sources(name)
                known = sum(f.bytes or 0 for f in files)
                print(f"{name:10s} {len(files):4d} files, {known / 2**20:6.1f} MiB+  license: {LICENSES[name]}")
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
