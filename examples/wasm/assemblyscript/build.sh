#!/usr/bin/env bash
# Rebuilds peer-deny.wasm from assembly/*.ts with the pinned AssemblyScript compiler.
set -euo pipefail
cd "$(dirname "$0")"
npm ci --no-audit --no-fund
npm run build
