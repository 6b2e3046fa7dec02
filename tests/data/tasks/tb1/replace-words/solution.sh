#!/bin/bash
find /app/docs -name '*.txt' -exec sed -i 's/\bfoo\b/bar/g' {} +
