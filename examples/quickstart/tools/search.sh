#!/bin/sh
# Lines matching a pattern under a folder of the workstream, as JSON.
set -eu
matches=$(grep -r -c -- "$2" "$1" | awk -F: '{ n += $NF } END { print n + 0 }')
printf '{"pattern": "%s", "matches": %d}\n' "$2" "$matches"
