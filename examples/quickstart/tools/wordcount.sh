#!/bin/sh
# Words and files under a folder of the workstream, as JSON.
set -eu
files=$(find "$1" -type f -name '*.md' | wc -l)
words=$(find "$1" -type f -name '*.md' -exec cat {} + | wc -w)
printf '{"files": %d, "words": %d}\n' "$files" "$words"
