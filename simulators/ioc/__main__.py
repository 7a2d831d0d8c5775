"""``python -m corrflow.simulators.ioc NAME --prefix P [options]``: run one simulated IOC.

NAME is one of ``stage``, ``xray-detector``, ``heater``, ``source``, ``microscope``; ``--help``
after the name lists its options. Every IOC serves on 127.0.0.1 only.
"""

from __future__ import annotations

import sys

from corrflow.simulators.ioc import IOC_MAINS


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in IOC_MAINS:
        print(f"usage: python -m corrflow.simulators.ioc {{{','.join(IOC_MAINS)}}} --prefix P [options]", file=sys.stderr)
        raise SystemExit(2)
    IOC_MAINS[args[0]](args[1:])


if __name__ == "__main__":
    main()
