"""`python -m dka data`: generate concept scenes, download real datasets."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    from dka.data.scenes import SCENE_PRESETS

    parser = argparse.ArgumentParser(prog="python -m dka data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sc = sub.add_parser("scenes", help="write a concept-scenes export in Broden format (reused when intact)")
    sc.add_argument("--preset", choices=sorted(SCENE_PRESETS), default="demo32")
    sc.add_argument("--out", required=True, help="output directory (replaced only if it holds an export)")
    sc.add_argument("--seed", type=int, default=0)
    sc.add_argument("--processes", type=int, default=2)
    sc.add_argument("--verify", action="store_true",
                    help="compare every file's sha256 with the export's manifest (by default: sizes); "
                         "a damaged export is written again")
    sc.add_argument("--force", action="store_true", help="write the export again even if it looks intact")
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


def _scenes(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dka.data.scenes import check_export, generate, is_export

    if args.processes < 1:
        raise SystemExit(f"--processes must be >= 1, got {args.processes}")
    force = args.force
    if args.verify and not force and is_export(Path(args.out)):
        check = check_export(Path(args.out), full=True)
        print(check.describe() + ("" if check.ok else "; writing it again"))
        force = not check.ok
    print(generate(args.preset, args.out, seed=args.seed, processes=args.processes, force=force))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "scenes":
        return _scenes(args)
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

