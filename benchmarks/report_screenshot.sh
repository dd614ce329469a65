#!/usr/bin/env bash
# Render an `attnmaps report` page in headless Chromium (no network) and save a PNG screenshot.
#
#   benchmarks/report_screenshot.sh RUN/report.html docs/report.png [WIDTH,HEIGHT]
#
# Needs chromium (Debian: apt-get install -y chromium). tests/test_segment.py runs the same
# command on a tiny report when chromium is installed and skips otherwise.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 REPORT.html OUT.png [WIDTH,HEIGHT]" >&2
    exit 2
fi
page=$(realpath "$1")
out=$2
size=${3:-1150,2600}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [ -z "$browser" ]; then
    echo "chromium not found; install it (apt-get install -y chromium)" >&2
    exit 2
fi
mkdir -p "$(dirname "$out")"
"$browser" --headless --no-sandbox --disable-gpu --disable-background-networking \
    --hide-scrollbars --window-size="$size" --screenshot="$(realpath -m "$out")" "file://$page" \
    2>/dev/null
echo "screenshot written to $out"
