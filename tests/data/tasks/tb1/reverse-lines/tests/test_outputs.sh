#!/bin/bash
printf 'three\ntwo\none\n' | diff - /app/output.txt && echo "PASSED test_reversed"
