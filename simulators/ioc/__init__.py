"""caproto IOCs serving the simulated facility over Channel Access, on 127.0.0.1 only.

One process per IOC, as at a facility (``python -m corrflow.simulators.ioc NAME --prefix P``):

==================  ===================  ==========================================================
name                PVs under            what
==================  ===================  ==========================================================
``stage``           ``<P>stage:``        motor records x, y, z, rot, tip, tilt (:mod:`.motor`)
``xray-detector``   ``<P>det:``          areaDetector-like camera + HDF5 plugin; frames of the
                                         phantom at the stage's geometry (:mod:`.xray_detector`)
``heater``          ``<P>tc:``           furnace controller on ``HeaterModel`` (:mod:`.heater`)
``source``          ``<P>src:``          ring current (beam loss on demand) and shutter (:mod:`.source`)
``microscope``      ``<M>``              microscope stage + detector (:mod:`.microscope`)
==================  ===================  ==========================================================

Every IOC counts the client writes it receives in ``<section>sim:PutCount``.
:mod:`corrflow.operations.sim_facility` starts them all with distinct ports and prints the environment.
Importing this package starts nothing and needs neither bluesky nor ophyd.
"""

from __future__ import annotations

from collections.abc import Callable


def _stage(argv: list[str]) -> None:
    from corrflow.simulators.ioc.motor import main

    main(argv)


def _xray_detector(argv: list[str]) -> None:
    from corrflow.simulators.ioc.xray_detector import main

    main(argv)


def _heater(argv: list[str]) -> None:
    from corrflow.simulators.ioc.heater import main

    main(argv)


def _source(argv: list[str]) -> None:
    from corrflow.simulators.ioc.source import main

    main(argv)


def _microscope(argv: list[str]) -> None:
    from corrflow.simulators.ioc.microscope import main

    main(argv)


IOC_MAINS: dict[str, Callable[[list[str]], None]] = {
    "stage": _stage,
    "xray-detector": _xray_detector,
    "heater": _heater,
    "source": _source,
    "microscope": _microscope,
}

__all__ = ["IOC_MAINS"]
