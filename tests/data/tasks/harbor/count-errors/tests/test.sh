#!/bin/bash
# No reward file: the exit code is the verdict.
expected=$(cat /tests/expected.txt)
[ "$(tr -d '[:space:]' < /app/answer.txt 2>/dev/null)" = "$expected" ]
