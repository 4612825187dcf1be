"""Download and unpack PASCAL VOC into <dest>/VOCdevkit/VOC<year> (needs internet access).

    python scripts/download_voc.py --year 2007 --dest data
    python scripts/download_voc.py --year 2012 --dest data
"""

import argparse
import sys

from fasterrcnn.data.download import VOC_DOWNLOADS, download_voc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--year", choices=sorted(VOC_DOWNLOADS), required=True)
    parser.add_argument("--dest", default="data", help="folder that will hold VOCdevkit/ (the config's paths.data_dir)")
    args = parser.parse_args()
    try:
        root = download_voc(args.year, args.dest)
    except RuntimeError as err:
        sys.exit(f"error: {err}")
    print(f"VOC{args.year} is ready in {root}")


if __name__ == "__main__":
    main()
