"""``make demo``: until the synthetic end-to-end demo exists, convert a data set and print its
statistics (see the README)."""
import sys


def main() -> int:
    from detector.cli.convert_to_coco import main as convert_main

    return convert_main(sys.argv[1:] or None)


if __name__ == "__main__":
    sys.exit(main())
