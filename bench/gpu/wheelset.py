#!/usr/bin/env python3
"""Helpers for bench/gpu/prepare.sh: merge the wheel lists, prune stale wheels, check the set.

  wheelset.py merge DEVICE_LIST EXTRA_LIST IFMISSING_LIST OUTDIR
      writes OUTDIR/req-main.txt (device list + extras not already in it) and
      OUTDIR/req-ifmissing.txt (ifmissing entries in neither), one version per package.
  wheelset.py prune DIR REQ_FILE
      deletes wheels in DIR (not recursive) whose name/version is not pinned in REQ_FILE.
  wheelset.py check DIR [DIR...]
      lists the distribution names of all wheels; exits 1 if a name occurs twice.
  wheelset.py unmet DIR [DIR...]
      prints requirements (for CPython 3.12 on x86-64 Linux) that no carried wheel
      provides: those must already be on the GPU machine.

Runs on any Python 3 with pip (uses pip's vendored `packaging` when the real one is absent).
"""

from __future__ import annotations

import re
import sys
import zipfile
from pathlib import Path

try:  # pragma: no cover - depends on the interpreter
    from packaging.requirements import Requirement
    from packaging.version import InvalidVersion, Version
except ImportError:  # pragma: no cover
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef,assignment]
    from pip._vendor.packaging.version import InvalidVersion, Version  # type: ignore[no-redef,assignment]

TARGET_ENV = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "extra": "",
}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def same_version(a: str, b: str) -> bool:
    try:
        return Version(a) == Version(b)
    except InvalidVersion:
        return a == b


def read_list(path: str) -> list[tuple[str, str, str | None]]:
    """(normalized name, original line, pinned version or None) per requirement line."""
    out = []
    for raw in Path(path).read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        pin = None
        for spec in req.specifier:
            if spec.operator in ("==", "==="):
                pin = spec.version
        out.append((norm(req.name), line, pin))
    return out


def wheel_name_version(path: Path) -> tuple[str, str]:
    parts = path.name[: -len(".whl")].split("-")
    return norm(parts[0]), parts[1]


def wheels(dirs: list[str]) -> list[Path]:
    return sorted(p for d in dirs for p in Path(d).glob("*.whl"))


def cmd_merge(device: str, extra: str, ifmissing: str, outdir: str) -> int:
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    main: dict[str, str] = {}
    for name, line, _ in read_list(device):
        if name in main:
            print(f"ERROR: {name} appears twice in {device}", file=sys.stderr)
            return 1
        main[name] = line
    added, skipped = [], []
    for name, line, _ in read_list(extra):
        if name in main:
            skipped.append(f"{line} (device list has {main[name]})")
            continue
        main[name] = line
        added.append(line)
    cond: dict[str, str] = {}
    cond_skipped = []
    for name, line, _ in read_list(ifmissing):
        if name in main or name in cond:
            cond_skipped.append(f"{line} (already carried as {main.get(name, cond.get(name))})")
            continue
        cond[name] = line
    (out / "req-main.txt").write_text("".join(v + "\n" for v in main.values()))
    (out / "req-ifmissing.txt").write_text("".join(v + "\n" for v in cond.values()))
    print(f"device list: {len(main) - len(added)} wheels; extras added: {len(added)}")
    for a in added:
        print(f"  + {a}")
    for s in skipped:
        print(f"  = {s}")
    print(f"installed only where the machine lacks them: {len(cond)}")
    for c in cond.values():
        print(f"  ? {c}")
    for s in cond_skipped:
        print(f"  = {s}")
    return 0


def cmd_prune(d: str, req: str) -> int:
    pins = {name: pin for name, _, pin in read_list(req)}
    for whl in wheels([d]):
        name, ver = wheel_name_version(whl)
        if name not in pins:
            print(f"prune (not listed): {whl.name}")
            whl.unlink()
        elif (pin := pins[name]) is not None and not same_version(ver, pin):
            print(f"prune (other version): {whl.name}")
            whl.unlink()
    return 0


def cmd_check(dirs: list[str]) -> int:
    seen: dict[str, list[str]] = {}
    for whl in wheels(dirs):
        name, _ = wheel_name_version(whl)
        seen.setdefault(name, []).append(str(whl))
    dups = {n: f for n, f in seen.items() if len(f) > 1}
    for n, files in sorted(dups.items()):
        print(f"DUPLICATE {n}: {' '.join(files)}", file=sys.stderr)
    print(f"{len(seen)} distinct packages in {sum(len(f) for f in seen.values())} wheels")
    return 1 if dups else 0


def cmd_unmet(dirs: list[str]) -> int:
    have: dict[str, str] = {}
    reqs: list[tuple[str, Requirement]] = []
    for whl in wheels(dirs):
        name, ver = wheel_name_version(whl)
        have[name] = ver
        with zipfile.ZipFile(whl) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            text = z.read(meta).decode("utf-8", "replace").split("\n\n", 1)[0]
        for line in text.splitlines():
            if line.startswith("Requires-Dist:"):
                req = Requirement(line.split(":", 1)[1].strip())
                if req.marker is None or req.marker.evaluate(TARGET_ENV):
                    reqs.append((name, req))
    unmet: dict[str, set[str]] = {}
    bad: list[str] = []
    for who, req in reqs:
        n = norm(req.name)
        if n not in have:
            unmet.setdefault(n, set()).add(who)
        elif req.specifier and not req.specifier.contains(have[n], prereleases=True):
            bad.append(f"{who} wants {req} but {n} {have[n]} is carried")
    print(f"not carried, expected on the GPU machine ({len(unmet)}):")
    for n in sorted(unmet):
        print(f"  {n}  <- {', '.join(sorted(unmet[n]))}")
    if bad:
        print("carried version outside a declared range (--no-deps installs it anyway):")
        for b in bad:
            print(f"  {b}")
    return 0


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    cmd, args = argv[1], argv[2:]
    if cmd == "merge" and len(args) == 4:
        return cmd_merge(*args)
    if cmd == "prune" and len(args) == 2:
        return cmd_prune(*args)
    if cmd == "check" and args:
        return cmd_check(args)
    if cmd == "unmet" and args:
        return cmd_unmet(args)
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
