#!/bin/bash
echo stone > /work/answer.txt
