"""`python -m dka data`: generate concept scenes, download real datasets."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    from dka.data.scenes import PRESETS

    parser = argparse.ArgumentParser(prog="python -m dka data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sc = sub.add_parser("scenes", help="write a concept-scenes export in Broden format (cached)")
    sc.add_argument("--preset", choices=sorted(PRESETS), default="demo32")
    sc.add_argument("--out", required=True, help="output directory (replaced only if it is an older export)")
    sc.add_argument("--seed", type=int, default=0)
    sc.add_argument("--processes", type=int, default=2)
    dl = sub.add_parser("download", help="download a real dataset (needs the internet)")
    dl.add_argument("dataset", choices=["cifar10", "places365", "broden"])
    dl.add_argument("--root", required=True)
    dl.add_argument("--format", choices=["torchvision", "easy"], default="torchvision",
                    help="Places365 layout (default: torchvision's, md5-verified); a cut download resumes when "
                         "the same command runs again")
    dl.add_argument("--no-checksum", action="store_true",
                    help="accept an archive that differs from its recorded checksum (its sha256 is printed); "
                         "for a copy you trust when the recorded value is not the publisher's")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "scenes":
        from dka.data.scenes import generate

        if args.processes < 1:
            raise SystemExit(f"--processes must be >= 1, got {args.processes}")
        print(generate(args.preset, args.out, seed=args.seed, processes=args.processes))
        return 0
    import urllib.error

    from dka.data import download

    try:
        if args.dataset == "cifar10":
            path = download.download_cifar10(args.root, checksum=not args.no_checksum)
        elif args.dataset == "places365":
            path = download.download_places365(args.root, fmt=args.format, checksum=not args.no_checksum)
        else:
            path = download.download_broden(args.root, checksum=not args.no_checksum)
    except (download.DownloadError, download.ChecksumError, urllib.error.URLError) as err:
        # one line, no traceback: offline, unreachable server or a corrupt archive (nothing half-written is kept)
        if isinstance(err, urllib.error.URLError):  # from torchvision's own dataset downloaders
            err = f"cannot download: {err.reason} (offline, or the server is unreachable)"
        elif isinstance(err, download.ChecksumError):
            err = f"{err} (or accept a copy you trust with --no-checksum)"
        print(f"python -m dka data download {args.dataset}: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0

