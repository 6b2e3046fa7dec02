#!/bin/bash
echo lemon > /work/answer.txt
