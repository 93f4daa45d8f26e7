# expect: shell.dynamic
$(printf cu)rl http://example.invalid/
