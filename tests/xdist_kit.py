"""pytest-xdist for this suite (a pytest plugin: ``pytest_plugins`` in tests/conftest.py):
the engine and fault tests form one group, which one worker runs in the usual order and for
which it boots each engine once (tests/conftest.py, ``_boot_with_group``); the other workers
run the rest."""

from __future__ import annotations

import pytest

ENGINE_GROUP = "engines"
"""The pytest-xdist group of the engine and fault tests: one worker runs them all, in the
usual order, and boots each engine once (``--dist loadgroup``)."""


def in_engine_group(item: pytest.Item) -> bool:
    return any(item.get_closest_marker(m) is not None for m in ("engine", "fault"))


def xdist_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``-n``) the engine group stays on one worker: the default ``load``
    becomes ``loadgroup`` (the same for every other test: no group), and the modes that
    would spread the group (each worker booting the engines) are refused."""
    dist = getattr(config.option, "dist", "no")  # absent: no xdist installed
    if xdist_worker(config):
        # A worker parses the command line again (``-n 2`` alone reads as no --dist), and
        # names each test's group only with this set.
        config.option.loadgroup = True
    elif dist == "load":
        config.option.dist = "loadgroup"
    elif dist not in ("no", "loadgroup"):
        raise pytest.UsageError(f"--dist {dist}: this suite runs with --dist loadgroup "
                                "(its engine and fault tests on one worker)")


@pytest.hookimpl(tryfirst=True)  # before xdist's, which names each test's group
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The group's marker, on xdist workers only (without xdist the marker is unknown)."""
    for item in items:
        if xdist_worker(config) and in_engine_group(item):
            item.add_marker(pytest.mark.xdist_group(ENGINE_GROUP))


@pytest.hookimpl(tryfirst=True)  # before xdist's, which sends the ids to the scheduler
def pytest_collection_finish(session: pytest.Session) -> None:
    """pytest-xdist tells the scheduler a test's group by a suffix on its node id, which
    pytest 9.2's structured ids no longer take (pytest-xdist issue 1386: the group is
    silently spread over the workers); until xdist sets it again, it is set here."""
    suffix = f"@{ENGINE_GROUP}"
    unnamed = [item for item in session.items if xdist_worker(session.config)
               and in_engine_group(item) and not item.nodeid.endswith(suffix)]
    if unnamed:  # only pytest >= 9.2 has the module
        from _pytest.nodeid import NodeId

        for item in unnamed:
            item._id = NodeId.parse(item.nodeid + suffix)
