"""One writer per dataset: a lease object beside it, with an expiry and its holder's host and pid.

An embed or re-index run takes the lease before it writes and gives it back when it ends; a
second run meanwhile refuses with an error naming the holder, instead of doubling rows. The
holder renews the lease while it works; a crashed holder stops renewing and its lease expires,
after which the next run takes it over (at once, when the holder was a process of the same host
that no longer runs). Taking the lease is an exclusive create
(``objectstore.create_new``), so of two runs racing for a free or expired lease exactly one wins.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from mrl_core import objectstore

logger = logging.getLogger(__name__)

LEASE_SECONDS = 600.0
"""How long a lease lasts without renewal; the holder renews it every third of that."""


class LeaseHeldError(RuntimeError):
    """Another run holds the dataset's writer lease."""


class LeaseLostError(RuntimeError):
    """This run's lease expired and another run took it: stop before writing more."""


def lease_uri(dataset_uri: str) -> str:
    """Where a dataset's writer lease lives: ``<dataset>.lease/``, a sibling of the dataset holding
    one object per generation (``g000001``, ...): the newest unexpired one is the holder's."""
    return dataset_uri.rstrip("/") + ".lease"


@dataclass
class Lease:
    """A held writer lease; ``check`` before each commit, ``release`` when done (or use ``with``)."""

    root: str
    generation: str
    holder: dict
    seconds: float
    storage_options: Mapping[str, str] | None = None
    lost: bool = False
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """This generation's object."""
        return objectstore.join(self.root, self.generation)

    def check(self) -> None:
        """Raise ``LeaseLostError`` when the lease is no longer this run's."""
        newest = _generations(self.root, self.storage_options)
        mine = _read(self.url, self.storage_options).get("token") == self.holder["token"]
        if self.lost or not mine or (newest and newest[-1] != self.generation):
            self.lost = True
            raise LeaseLostError(f"the writer lease {self.url} expired and another run took the dataset; "
                                 f"this run stops before writing more (re-run it when that one ends)")

    def renew(self) -> None:
        """Push the expiry ``seconds`` ahead (only while the lease is still this run's)."""
        self.check()
        self.holder["expires_at"] = time.time() + self.seconds
        objectstore.write_bytes(self.url, json.dumps(self.holder).encode(), self.storage_options)

    def release(self) -> None:
        """Stop renewing and remove this generation's object."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            objectstore.remove(self.url, self.storage_options)
        except OSError as exc:  # it expires by itself; a failed clean-up must not fail the run
            logger.warning(f"could not remove the writer lease {self.url}: {exc}")

    def _keep_renewed(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                self.renew()
            except LeaseLostError:
                return
            except OSError as exc:  # a transient store error: the next renewal may succeed
                logger.warning(f"could not renew the writer lease {self.url}: {exc}")

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire_lease(dataset_uri: str, storage_options: Mapping[str, str] | None = None,
                  seconds: float = LEASE_SECONDS) -> Lease:
    """Take the writer lease of ``dataset_uri``, renewed in the background until released.

    Raises ``LeaseHeldError`` naming the holder (host, pid, since, expiry) when another run holds
    it. An expired lease is taken over by claiming the next generation (an exclusive create), so
    of two runs doing so at once exactly one wins; nothing of another run's is ever deleted first.
    """
    root = lease_uri(dataset_uri)
    now = time.time()
    holder = {"token": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
              "acquired_at": now, "expires_at": now + seconds}
    gens = _generations(root, storage_options)
    if gens:
        held = _read(objectstore.join(root, gens[-1]), storage_options)
        if held and held.get("expires_at", 0) > time.time() and not _holder_gone(held):
            raise LeaseHeldError(
                f"dataset {dataset_uri} is being written by another run (host {held.get('host')}, pid "
                f"{held.get('pid')}, since {_when(held.get('acquired_at'))}); its lease {root} expires at "
                f"{_when(held.get('expires_at'))} unless renewed. Wait for that run to end; if it is gone, "
                f"the lease expires by itself."
            )
        if held:
            logger.warning(f"taking over the expired writer lease of {dataset_uri} (host {held.get('host')}, "
                           f"pid {held.get('pid')})")
    generation = f"g{int(gens[-1][1:]) + 1 if gens else 1:06d}"
    if not objectstore.create_new(objectstore.join(root, generation), json.dumps(holder).encode(), storage_options):
        raise LeaseHeldError(f"another run took the writer lease of {dataset_uri} at this instant ({root})")
    for old in gens:  # expired generations: gone with their holders
        objectstore.remove(objectstore.join(root, old), storage_options)
    lease = Lease(root, generation, holder, seconds, storage_options)
    lease._thread = threading.Thread(target=lease._keep_renewed, name="mrl-lease", daemon=True)
    lease._thread.start()
    return lease


def _holder_gone(held: dict) -> bool:
    """Whether the holder is a process of this host that no longer runs (killed, crashed): its
    lease need not be waited out."""
    if held.get("host") != socket.gethostname() or not isinstance(held.get("pid"), int):
        return False
    try:
        os.kill(held["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _generations(root: str, storage_options: Mapping[str, str] | None) -> list[str]:
    return sorted(n for n in objectstore.list_names(root, storage_options) if n.startswith("g") and n[1:].isdigit())


def _read(url: str, storage_options: Mapping[str, str] | None) -> dict:
    """The lease object's JSON; {} when it is gone. One being written this instant counts as held."""
    try:
        return json.loads(objectstore.read_bytes(url, storage_options))
    except FileNotFoundError:
        return {}
    except ValueError:
        return {"expires_at": time.time() + 1, "host": "?", "pid": "?"}


def _when(timestamp: float | None) -> str:
    if not timestamp:
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))
