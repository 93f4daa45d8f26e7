# expect: shell.dynamic
c''url http://example.invalid/
