#!/usr/bin/env bash
# CI: the light client (and the cli extra) at exactly their declared minimum versions, in a
# separate throw-away venv, against the client tests. Catches a floor that no longer works.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
venv=$(mktemp -d)/floors
trap 'rm -rf "$(dirname "$venv")"' EXIT
"$PY" -m venv "$venv"
# Every `name>=x` of [project] dependencies and the cli extra, as `name==x`.
pins=$("$venv/bin/python" - <<'PY'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for req in project["dependencies"] + project["optional-dependencies"]["cli"]:
    m = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?>=([^,;\s]+)", req.strip())
    if not m:
        raise SystemExit(f"floors.sh: cannot read a floor from {req!r}")
    print(f"{m[1]}{m[2] or ''}=={m[3]}")
PY
)
echo "floors:" $pins
"$venv/bin/python" -m pip install -q --disable-pip-version-check $pins "pytest>=8" "pytest-asyncio>=0.23" "fakeredis[lua]>=2.23"
PYTHONPATH=$PWD HF_HUB_OFFLINE=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider \
  tests/test_client.py tests/test_schema.py tests/test_light_client.py \
  tests/test_cli_first_hour.py -k "not job_commands and not worker_checks"
