#!/bin/bash
echo apple > /work/answer.txt
