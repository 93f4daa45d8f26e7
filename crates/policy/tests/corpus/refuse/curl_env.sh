# expect: command.denied
env -i timeout 5 nice -n 1 /usr/bin/curl http://example.invalid/
