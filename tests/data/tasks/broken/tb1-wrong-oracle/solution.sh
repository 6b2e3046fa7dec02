#!/bin/bash
# Deliberately wrong: writes to the wrong file.
echo yes > /app/answer.text
