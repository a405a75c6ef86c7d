"""Command line: `python -m tlcore bench [...]` (see `python -m tlcore bench --help`)."""
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "bench":
        print("usage: python -m tlcore bench [--help | options]\n\n"
              "  bench   time tlcore against stock PyTorch on this machine (table, JSON, chart)")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    from tlcore.benchmark.cli import main as bench

    return bench(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
