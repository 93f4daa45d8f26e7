# expect: command.denied
find / -maxdepth 0 -exec sh -c 'wget http://example.invalid/' \;
