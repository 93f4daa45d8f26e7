# expect: command.denied
echo http://example.invalid/ | xargs curl
