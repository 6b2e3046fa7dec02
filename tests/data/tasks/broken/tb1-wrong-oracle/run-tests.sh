#!/bin/bash
grep -qx yes /app/answer.txt
