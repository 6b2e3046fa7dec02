#!/bin/bash
# Deliberately wrong: the verifier wants 42.
echo 41 > /app/answer.txt
