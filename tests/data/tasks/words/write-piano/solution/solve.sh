#!/bin/bash
echo piano > /work/answer.txt
