#!/bin/bash
[ -x /app/greet.sh ] || { echo "FAILED not executable"; exit 1; }
diff "$TEST_DIR/expected_out.txt" /app/out.txt
