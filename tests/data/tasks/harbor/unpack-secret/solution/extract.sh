#!/bin/bash
# Print the contents of the secret.txt inside the archive $1.
tar -xzOf "$1" --wildcards '*secret.txt'
