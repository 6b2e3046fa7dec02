#!/bin/bash
for f in a b c; do echo "$f" > "/app/out/$f.txt"; done
