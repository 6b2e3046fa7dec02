#!/bin/bash
echo done > /work/result.txt
