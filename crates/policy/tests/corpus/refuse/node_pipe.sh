# expect: shell.dynamic
echo 'console.log(1)' | node
