# expect: shell.dynamic
cat payload.txt | python3
