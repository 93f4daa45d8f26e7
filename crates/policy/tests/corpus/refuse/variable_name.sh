# expect: shell.dynamic
X=curl
$X http://example.invalid/
