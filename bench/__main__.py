"""Dispatch ``python -m bench NAME`` to ``bench/NAME.py``'s ``main(argv)``."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import bench


def available() -> list[str]:
    return sorted(
        m.name.replace("_", "-")
        for m in pkgutil.iter_modules(bench.__path__)
        if not m.name.startswith("_") and m.name != "common"
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in {"-h", "--help"}:
        print("usage: python -m bench NAME [options]\n\nbenchmarks: " + ", ".join(available()))
        return 0 if args else 2
    name = args[0].replace("-", "_")
    if name.replace("_", "-") not in available():
        print(f"unknown benchmark {args[0]!r}; available: {', '.join(available())}",
              file=sys.stderr)
        return 2
    mod = importlib.import_module(f"bench.{name}")
    rc = mod.main(args[1:])
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
