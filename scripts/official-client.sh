#!/usr/bin/env bash
# Installs Instructure's official DAP client, the reference the emulator is tested against, into
# .venv-official/ (with pyarrow, the Parquet reader the tests open downloaded files with,
# python-tds, the independent client the TDS test server is checked with, and duckdb, which
# reads `dap archive`'s hive-partitioned Parquet as analysts would, and prometheus_client, whose
# OpenMetrics parser reads `--metrics-file`; the last two optional here, required by the tests
# under CI=true).
# Idempotent: does nothing when the right version is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-official
version=2.3.1
if "$venv/bin/dap" --version 2>/dev/null | grep -qx "dap $version" && "$venv/bin/python" -c 'import pyarrow, pytds' 2>/dev/null; then
  "$venv/bin/python" -c 'import duckdb' 2>/dev/null \
    || "$venv/bin/pip" install -q --disable-pip-version-check "duckdb>=1" 2>/dev/null \
    || echo "official-client.sh: duckdb could not be installed; the archive is read with pyarrow only" >&2
  "$venv/bin/python" -c 'import prometheus_client' 2>/dev/null \
    || "$venv/bin/pip" install -q --disable-pip-version-check "prometheus_client>=0.20" 2>/dev/null \
    || echo "official-client.sh: prometheus_client could not be installed" >&2
  exit 0
fi
python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check "instructure-dap-client[postgresql,mysql]==$version" "pyarrow>=15" "python-tds==1.17.1" \
  || { echo "official-client.sh: pip could not install instructure-dap-client $version" >&2; exit 1; }
"$venv/bin/pip" install -q --disable-pip-version-check "duckdb>=1" 2>/dev/null \
  || echo "official-client.sh: duckdb could not be installed; the archive is read with pyarrow only" >&2
"$venv/bin/pip" install -q --disable-pip-version-check "prometheus_client>=0.20" 2>/dev/null \
  || echo "official-client.sh: prometheus_client could not be installed" >&2
echo "[official-client] installed: $("$venv/bin/dap" --version)" >&2
