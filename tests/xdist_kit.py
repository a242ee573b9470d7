"""pytest-xdist for this suite (a pytest plugin: ``pytest_plugins`` in tests/conftest.py):
the engine and fault tests form one group, which one worker runs in the usual order and for
which it boots each engine once (tests/conftest.py, ``_boot_with_group``); a fault module
marked ``own_worker`` (long, and no engine) is a group of its own beside it; the tests of a
module that starts servers for the whole module (a module-scoped fixture: a Redis Cluster,
worker processes) form a group of their own, so one worker starts them once; the other
workers run the rest."""

from __future__ import annotations

import pytest

ENGINE_GROUP = "engines"
"""The pytest-xdist group of the engine and fault tests: one worker runs them all, in the
usual order, and boots each engine once (``--dist loadgroup``)."""


def in_engine_group(item: pytest.Item) -> bool:
    return (any(item.get_closest_marker(m) is not None for m in ("engine", "fault"))
            and item.get_closest_marker("own_worker") is None)


def _uses_module_fixture(item: pytest.Item) -> bool:
    info = getattr(item, "_fixtureinfo", None)  # pytest's; absent: no grouping, still correct
    defs = getattr(info, "name2fixturedefs", {})
    return any(d.scope in ("module", "package") for ds in defs.values() for d in ds)


def group_of(item: pytest.Item) -> str | None:
    """The xdist group of ``item``: the engine group, its module's (a module marked
    ``own_worker``, or one with module-scoped servers), or none (any worker)."""
    if in_engine_group(item):
        return ENGINE_GROUP
    if item.get_closest_marker("own_worker") is not None or _uses_module_fixture(item):
        return item.path.stem
    return None


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
    """The groups' markers, on xdist workers only (without xdist the marker is unknown)."""
    if not xdist_worker(config):
        return
    for item in items:
        group = group_of(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.hookimpl(tryfirst=True)  # before xdist's, which sends the ids to the scheduler
def pytest_collection_finish(session: pytest.Session) -> None:
    """pytest-xdist tells the scheduler a test's group by a suffix on its node id, which
    pytest 9.2's structured ids no longer take (pytest-xdist issue 1386: the group is
    silently spread over the workers); until xdist sets it again, it is set here."""
    if not xdist_worker(session.config):
        return
    unnamed = [(item, suffix) for item in session.items
               if (group := group_of(item)) is not None
               and not item.nodeid.endswith(suffix := f"@{group}")]
    if unnamed:  # only pytest >= 9.2 has the module
        from _pytest.nodeid import NodeId

        for item, suffix in unnamed:
            item._id = NodeId.parse(item.nodeid + suffix)
