# expect: command.denied
busybox wget http://example.invalid/
