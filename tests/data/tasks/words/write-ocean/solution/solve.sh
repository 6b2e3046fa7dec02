#!/bin/bash
echo ocean > /work/answer.txt
