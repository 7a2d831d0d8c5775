"""Pieces shared by the simulated facility's caproto IOCs.

- Loopback only: :func:`serve` binds every IOC to ``127.0.0.1`` and points its beacons there;
  nothing of the simulated facility is ever reachable from another host.
- A write counter: :class:`SimControl` serves ``<section>sim:PutCount`` and ``<section>sim:LastPut``;
  :func:`count_client_writes` makes every Channel Access write *from a client* to any PV of the
  IOC increment it, before the write is processed (a refused write counts too). Tests use it to
  prove that a rejected plan sent no write at all.
- Readbacks: :func:`mirror_readbacks` keeps each ``NAME_RBV`` equal to the committed value of
  ``NAME``, as areaDetector and most EPICS drivers do.
- Long strings (file paths) are ``CHAR`` waveforms as in areaDetector (a ``DBR_STRING`` holds 40
  characters); :func:`long_string` declares one.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import socket

import caproto.asyncio.server as _caproto_asyncio_server
from caproto import ChannelData, ChannelType
from caproto.server import PVGroup, pvproperty

__all__ = [
    "LOOPBACK",
    "SimControl",
    "count_client_writes",
    "enum_property",
    "ioc_argument_parser",
    "long_string",
    "loopback_environment",
    "mirror_readbacks",
    "run_repeater",
    "serve",
]

LOOPBACK = "127.0.0.1"
LONG_STRING_LENGTH = 1024


def long_string(name: str, *, value: str = "", read_only: bool = False, doc: str = "") -> pvproperty:
    """A string PV as a ``CHAR`` waveform (areaDetector's convention for paths and messages)."""
    return pvproperty(
        name=name,
        value=value,
        dtype=ChannelType.CHAR,
        max_length=LONG_STRING_LENGTH,
        string_encoding="utf-8",
        read_only=read_only,
        doc=doc,
    )


def enum_property(name: str, *, states: Sequence[str], value: str | None = None, read_only: bool = False, doc: str = "") -> pvproperty:
    """An ``ENUM`` PV with the given state strings (initial value: the first state)."""
    return pvproperty(
        name=name,
        value=value if value is not None else states[0],
        dtype=ChannelType.ENUM,
        enum_strings=tuple(states),
        read_only=read_only,
        doc=doc,
    )


class SimControl(PVGroup):
    """Bookkeeping PVs of a simulated IOC (prefix ``<section>sim:``).

    ``PutCount`` counts Channel Access writes from clients to any PV of this IOC since start;
    ``LastPut`` names the PV of the latest one.
    """

    put_count = pvproperty(name="PutCount", value=0, read_only=True, doc="client CA writes received since start")
    last_put = long_string("LastPut", read_only=True, doc="PV of the latest client write")


def count_client_writes(pvdb: Mapping[str, ChannelData], control: SimControl) -> None:
    """Make every client write to a PV of ``pvdb`` increment ``control.put_count`` first.

    caproto's server hands each client ``WriteRequest`` to ``ChannelData.auth_write``; the IOC's
    own updates use ``write`` and are not counted. Each channel is wrapped once, even when it is
    served under two names (a record's ``NAME`` and ``NAME.VAL``).
    """
    counter, last = control.put_count, control.last_put
    wrapped: set[int] = set()
    for pvname, channel in pvdb.items():
        if id(channel) in wrapped:
            continue
        wrapped.add(id(channel))
        original = channel.auth_write

        async def counted(*args: Any, _original: Callable[..., Any] = original, _pvname: str = pvname, **kwargs: Any) -> Any:
            await counter.write(counter.value + 1)
            await last.write(_pvname)
            return await _original(*args, **kwargs)

        channel.auth_write = counted  # type: ignore[method-assign]


def mirror_readbacks(pvdb: Mapping[str, ChannelData], *, suffix: str = "_RBV") -> None:
    """After each committed write of ``NAME``, write the same value to ``NAME_RBV`` (if served)."""
    for pvname, channel in list(pvdb.items()):
        readback = pvdb.get(pvname + suffix)
        if readback is None or readback is channel:
            continue
        original = channel.write

        async def write_and_mirror(
            *args: Any, _original: Callable[..., Any] = original, _channel: ChannelData = channel,
            _readback: ChannelData = readback, **kwargs: Any,
        ) -> Any:
            result = await _original(*args, **kwargs)
            if _readback.value != _channel.value:
                await _readback.write(_channel.value, verify_value=False)
            return result

        channel.write = write_and_mirror  # type: ignore[method-assign]


async def _create_bound_tcp_socket(addr: str, port: int) -> socket.socket:
    """caproto's listening socket, declared as TCP so asyncio sets TCP_NODELAY on each connection.

    caproto 1.3 creates it with protocol 0; asyncio only disables Nagle's algorithm on sockets
    whose protocol is ``IPPROTO_TCP``, and with Nagle on, a put-callback reply waits for the
    client's delayed ACK: about 40 ms per acknowledged write instead of well under 1 ms.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setblocking(False)
    sock.bind((addr, port))
    return sock


def loopback_environment(*, server_port: int | None = None) -> dict[str, str]:
    """EPICS variables that keep a caproto server on loopback (merged into ``os.environ`` by :func:`serve`)."""
    env = {
        "EPICS_CAS_INTF_ADDR_LIST": LOOPBACK,
        "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO",
        "EPICS_CAS_BEACON_ADDR_LIST": LOOPBACK,
        "EPICS_CA_AUTO_ADDR_LIST": "NO",
    }
    if server_port is not None:
        env["EPICS_CA_SERVER_PORT"] = str(int(server_port))
    return env


def ioc_argument_parser(description: str, *, default_section: str) -> argparse.ArgumentParser:
    """Arguments every simulated IOC takes: ``--prefix`` (instrument) and ``--port``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--prefix", required=True, help="instrument PV prefix, e.g. 'CF:BL:'")
    parser.add_argument(
        "--section",
        default=default_section,
        help=f"section of the instrument this IOC serves, appended to the prefix (default {default_section!r})",
    )
    parser.add_argument("--port", type=int, default=None, help="CA server port (default: $EPICS_CA_SERVER_PORT or 5064)")
    parser.add_argument("--list-pvs", action="store_true", help="print the PV names and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="log caproto at INFO")
    return parser


def serve(group: PVGroup, *, port: int | None = None, list_pvs: bool = False, verbose: bool = False) -> None:
    """Serve ``group`` (with its :class:`SimControl` write counter) on 127.0.0.1 until interrupted.

    The group must own a ``sim`` :class:`SimControl` sub-group. Loopback addresses are forced
    into the environment before the server starts (caproto reads them at start).
    """
    if list_pvs:
        for pvname in sorted(group.pvdb):
            print(pvname)
        return
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING)
    control = getattr(group, "sim", None)
    if not isinstance(control, SimControl):
        raise TypeError(f"{type(group).__name__} must have a `sim = SubGroup(SimControl, prefix='sim:')`")
    os.environ.update(loopback_environment(server_port=port))
    count_client_writes(group.pvdb, control)
    mirror_readbacks(group.pvdb)
    _caproto_asyncio_server._create_bound_tcp_socket = _create_bound_tcp_socket
    _caproto_asyncio_server.run(group.pvdb, interfaces=[LOOPBACK], startup_hook=_exit_with_parent)


def run_repeater() -> None:
    """A Channel Access repeater bound to 127.0.0.1 (port ``$EPICS_CA_REPEATER_PORT``).

    Exits with the process named by ``$CORRFLOW_SIM_PARENT_PID``, as the IOCs do.
    """
    import threading
    import time

    from caproto.sync.repeater import run

    parent = os.environ.get("CORRFLOW_SIM_PARENT_PID")
    if parent:

        def watch() -> None:
            while os.getppid() == int(parent):
                time.sleep(1.0)
            os._exit(0)

        threading.Thread(target=watch, daemon=True).start()
    run(host=LOOPBACK)


async def _exit_with_parent(async_lib: Any) -> None:
    """Exit when the process named by ``$CORRFLOW_SIM_PARENT_PID`` is gone (no orphaned IOCs).

    The facility launcher sets it; an IOC started by hand has no such parent and runs until stopped.
    """
    parent = os.environ.get("CORRFLOW_SIM_PARENT_PID")
    if not parent:
        return
    while os.getppid() == int(parent):
        await asyncio.sleep(1.0)
    logging.getLogger(__name__).warning("parent process %s is gone: exiting", parent)
    os._exit(0)
