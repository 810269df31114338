#!/usr/bin/env bash
# Opens a report.html in headless Chromium, fails on any console message of level warning or
# error (or a page that does not load), and writes a full-page screenshot beside it.
#   scripts/check_report.sh RUN/report.html [WIDTH] [HEIGHT]
# Needs Debian's chromium (apt-get install -y chromium).
set -euo pipefail
html=$(realpath "$1")
width=${2:-1500}
height=${3:-9000}
shot="${html%.html}.png"
profile=$(mktemp -d)
log=$(mktemp)
trap 'rm -rf "$profile" "$log"' EXIT
flags=(--headless --no-sandbox --disable-gpu --disable-background-networking
       --disable-component-update --disable-sync --no-first-run --user-data-dir="$profile"
       --enable-logging=stderr --v=0 --hide-scrollbars)
chromium "${flags[@]}" --window-size="$width,$height" --screenshot="$shot" "file://$html" 2>"$log" >/dev/null
# the page's own console output is logged as CONSOLE lines; Chromium's own noise is not
if grep -E 'CONSOLE|Uncaught|Failed to load|ERR_FILE_NOT_FOUND' "$log"; then
    echo "report check FAILED: console messages above" >&2
    exit 1
fi
# self-contained: nothing loaded from elsewhere
if grep -Eq '<(img|script|link|iframe)[^>]*(src|href)=' "$html"; then
    echo "report check FAILED: the page loads an external resource" >&2
    exit 1
fi
dom=$(chromium "${flags[@]}" --dump-dom "file://$html" 2>/dev/null)
svgs=$(grep -o '<svg' <<<"$dom" | wc -l)
tables=$(grep -o '<table' <<<"$dom" | wc -l)
echo "report check ok: no console messages; $svgs inline SVG figures, $tables tables; screenshot $shot"
